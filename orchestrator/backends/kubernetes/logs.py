"""Logs of a PyTorchJob: find its pods by the training operator's labels, read or follow them.

The operator (release-1.9) names pods ``<job>-<master|worker>-<index>`` and labels them with
``training.kubeflow.org/operator-name=pytorchjob-controller``, ``.../job-name``,
``.../replica-type`` (lowercase) and ``.../replica-index``; it also makes the job their
controller owner, which tells apart the pods of an older job that had the same name.
Following starts one reader per pod container (a restarted container is a new log), so lines
from every node are interleaved as they come, each prefixed with its node (``[worker-1]``).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import UserError

OPERATOR_LABEL = "training.kubeflow.org/operator-name"
OPERATOR_NAME = "pytorchjob-controller"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
CONTAINER = "pytorch"
_ORDER = {"master": 0, "worker": 1}


def pod_selector(job_name: str) -> str:
    """The label selector of a job's pods, as the operator sets the labels."""
    return f"{OPERATOR_LABEL}={OPERATOR_NAME},{JOB_NAME_LABEL}={job_name}"


def node_name(pod: Any) -> str:
    """``master-0`` / ``worker-2``: what ``orch logs --node`` and ``orch status`` call a pod."""
    labels = pod.metadata.labels or {}
    return f"{labels.get(REPLICA_TYPE_LABEL, 'pod')}-{labels.get(REPLICA_INDEX_LABEL, '?')}"


def job_pods(core: Any, namespace: str, job_name: str, job_uid: str | None,
             timeout: float) -> list[Any]:
    """The job's pods, Master first then Workers by index; pods owned by another job are skipped."""
    pods = core.list_namespaced_pod(namespace, label_selector=pod_selector(job_name),
                                    _request_timeout=timeout).items
    if job_uid:
        pods = [p for p in pods if any(ref.controller and ref.uid == job_uid
                                       for ref in (p.metadata.owner_references or []))]

    def order(p: Any) -> tuple[int, int, str]:
        labels = p.metadata.labels or {}
        index = labels.get(REPLICA_INDEX_LABEL, "")
        return (_ORDER.get(labels.get(REPLICA_TYPE_LABEL, ""), 2), int(index) if index.isdigit() else 0,
                p.metadata.name)

    return sorted(pods, key=order)


def pick(pods: list[Any], node: str | None, job: str) -> list[Any]:
    """The pods ``--node`` names (``worker-1`` or a pod name); all of them without it."""
    if node is None:
        return pods
    chosen = [p for p in pods if node in (node_name(p), p.metadata.name)]
    if not chosen:
        have = ", ".join(node_name(p) for p in pods) or "none yet"
        raise UserError(f"job {job} has no node {node!r} (nodes: {have})",
                        hint="name a node as master-0 or worker-N, or leave out --node")
    return chosen


def _not_started(pod: Any) -> str | None:
    """Why a pod has no log yet, or None when its container has started."""
    phase = (pod.status.phase if pod.status else None) or "Pending"
    if not pod.spec.node_name:
        return f"pod {pod.metadata.name} is {phase}, not scheduled to a node yet"
    for s in (pod.status.container_statuses or []) if pod.status else []:
        if s.name == CONTAINER and s.state and s.state.waiting and not (s.last_state and s.last_state.terminated):
            reason = s.state.waiting.reason or "waiting"
            return f"pod {pod.metadata.name}: container {CONTAINER} is {reason}"
    if phase == "Pending":
        return f"pod {pod.metadata.name} is Pending"
    return None


def read_logs(core: Any, namespace: str, pods: list[Any], *, prefix: bool, timeout: float,
              job: str) -> Iterator[str]:
    """Everything each pod has logged so far; pods without a log yet are named, not skipped silently."""
    from kubernetes.client.exceptions import ApiException

    waiting = []
    for pod in pods:
        tag = f"[{node_name(pod)}] " if prefix else ""
        why = _not_started(pod)
        text = None
        if why is None:
            try:
                text = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER,
                                                    _request_timeout=timeout)
            except ApiException as exc:
                why = f"pod {pod.metadata.name}: {exc.reason} ({exc.status})"
        if text is None:
            waiting.append(f"{node_name(pod)}: {why}")
            continue
        for line in text.splitlines():
            yield tag + line
    if waiting and len(waiting) == len(pods):
        raise UserError(f"job {job} has no logs yet:\n  " + "\n  ".join(waiting),
                        hint="`orch logs JOB_ID --follow` waits for the containers to start")
    for w in waiting:
        yield f"[orch] no log yet from {w}"


def follow_logs(core: Any, namespace: str, list_pods: Callable[[], list[Any]],
                job_finished: Callable[[], bool], *, node: str | None, job: str,
                poll_interval: float) -> Iterator[str]:
    """Stream every container of the job as it runs, until the job finishes and the streams end.

    Pods are listed again every ``poll_interval`` so pods created later (elastic scale-up, a
    pod recreated after a failure) and restarted containers are picked up.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    stop = threading.Event()
    started: set[tuple[str, int]] = set()
    readers: list[threading.Thread] = []
    announced_wait = False
    try:
        while True:
            pods = list_pods()
            if node is not None:  # it may not exist yet: wait for it rather than refuse
                pods = [p for p in pods if node in (node_name(p), p.metadata.name)]
            for pod in pods:
                key = (pod.metadata.uid, _restart_count(pod))
                if key in started or _not_started(pod) is not None:
                    continue
                started.add(key)
                tag = f"[{node_name(pod)}] " if node is None else ""
                t = threading.Thread(target=_stream, args=(core, namespace, pod.metadata.name, tag, lines, stop),
                                     daemon=True)
                t.start()
                readers.append(t)
            if not started and not announced_wait:
                announced_wait = True
                yield f"[orch] waiting for the pods of job {job} to start (Ctrl-C to stop)"
            deadline = time.monotonic() + poll_interval
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = lines.get(timeout=left)
                except queue.Empty:
                    break
                if item is not None:
                    yield item
            if job_finished() and not any(t.is_alive() for t in readers):
                while not lines.empty():
                    item = lines.get_nowait()
                    if item is not None:
                        yield item
                if not started:
                    raise UserError(f"job {job} finished without any pod logging anything",
                                    hint="`orch status JOB_ID` says why; `kubectl describe pytorchjob` shows events")
                return
    finally:
        stop.set()


def _restart_count(pod: Any) -> int:
    for s in (pod.status.container_statuses or []) if pod.status else []:
        if s.name == CONTAINER:
            return int(s.restart_count or 0)
    return 0


def _stream(core: Any, namespace: str, pod: str, tag: str, out: queue.Queue[str | None],
            stop: threading.Event) -> None:
    """Copy one container's log, line by line, into ``out`` until it ends or ``stop`` is set."""
    from kubernetes.client.exceptions import ApiException

    try:
        # no timeout: a training log may stay silent for a long time (loading, compiling); the
        # stream ends when the container stops
        resp = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                            _preload_content=False)
    except ApiException as exc:
        out.put(f"{tag}[orch] cannot follow pod {pod}: {exc.reason} ({exc.status})")
        return
    except Exception as exc:  # connection dropped: say so in the stream rather than dying silently
        out.put(f"{tag}[orch] cannot follow pod {pod}: {exc}")
        return
    pending = b""
    try:
        for chunk in resp.stream(4096, decode_content=True):
            if stop.is_set():
                return
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                out.put(tag + raw.decode("utf-8", errors="replace"))
        if pending:
            out.put(tag + pending.decode("utf-8", errors="replace"))
    except Exception as exc:
        if not stop.is_set():
            out.put(f"{tag}[orch] log stream of pod {pod} ended: {exc}")
    finally:
        resp.release_conn()
        out.put(None)
