"""The Kubernetes backend: a job is a Kubeflow PyTorchJob plus a ConfigMap, through the API server.

``dryrun`` renders the manifest (and the ConfigMap's files) without contacting a cluster; for a
submission it also builds the two objects and validates the PyTorchJob client-side (strict CRD
schema, the training operator's webhook rules, label syntax) in the kubeconfig context's
namespace (or the spec's ``kubernetes.namespace``). ``schedule`` creates the job, then the
ConfigMap with the job as its owner, so Kubernetes' garbage collector removes it with the job.
``status`` reads the conditions the operator writes; ``logs`` reads the pods the operator creates;
``cancel`` deletes the job (foreground propagation by default: the job stays visible, as CANCELLED,
until its pods are gone, so a resubmit under the same name cannot collide with pods still stopping).

The job carries its orch id in the ``orch.dev/job-id`` annotation: status, logs and cancel act on
a PyTorchJob only if it is the one this orch job created, not a later one with the same name.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ...errors import UserError
from ...launch import job_token
from ...spec import JobSpec
from ...types import JobRef, JobState, JobStatus, Rendered, Submission
from ..base import BackendBase
from . import logs as k8s_logs
from .client import REQUEST_TIMEOUT_S, Connection, api_error, connect
from .manifest import (GROUP, JOB_FILE, JOB_ID_ANNOTATION, JOB_LABEL, KIND, MANAGED_BY, PLURAL, VERSION,
                       config_map, config_map_name, job_file_text, owner_reference, pod_placement)
from .render import render
from . import restarts
from .status import job_status, pod_states
from .validate import check_job

T = TypeVar("T")
CONFIGMAP_LIMIT = 1024 * 1024  # the API server refuses larger ConfigMaps (etcd value limit)
# a job that ended this way gets its run directory copied once: its restart record outlives its pods
FINAL_COPY_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.TIMEOUT)
FINAL_COPY_TIMEOUT_S = 60.0


class KubernetesBackend(BackendBase):
    """PyTorchJobs on the cluster of the current kubeconfig context."""

    cluster = "kubernetes"

    def __init__(self, *, kubeconfig: str | None = None, context: str | None = None,
                 propagation: str = "Foreground", poll_interval: float = 2.0,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        if propagation not in ("Foreground", "Background"):
            raise ValueError("propagation must be Foreground or Background")
        self.kubeconfig, self.context = kubeconfig, context
        self.propagation, self.poll_interval, self.timeout = propagation, poll_interval, timeout
        self._connection: Connection | None = None

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def conn(self) -> Connection:
        if self._connection is None:
            self._connection = connect(self.kubeconfig, self.context)
        return self._connection

    def _call(self, fn: Callable[[], T], *, action: str, kind: str, name: str, namespace: str) -> T:
        """Run one API call; any refusal or connection failure becomes a clear UserError."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise api_error(exc, action=action, kind=kind, name=name, namespace=namespace,
                            conn=self.conn) from None

    @staticmethod
    def _where(ref: JobRef) -> tuple[str, str]:
        namespace, _, name = ref.native_id.partition("/")
        if not name:
            raise UserError(f"job {ref.job_id} has no PyTorchJob recorded (its submit did not complete)")
        return namespace, name

    def _get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(lambda: self.conn.custom().get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout),
            action="read", kind=KIND, name=name, namespace=namespace)

    def _own_job(self, ref: JobRef) -> dict[str, Any]:
        """The PyTorchJob this orch job created; refuses a same-named job from another submit."""
        namespace, name = self._where(ref)
        obj = self._get_job(namespace, name)
        owner = ((obj.get("metadata") or {}).get("annotations") or {}).get(JOB_ID_ANNOTATION)
        if owner != ref.job_id:
            raise UserError(f"PyTorchJob {namespace}/{name} is not job {ref.job_id}: it was created by "
                            f"{'orch job ' + owner if owner else 'something other than orch'}",
                            hint="job " + ref.job_id + " itself no longer exists; orch leaves the other job alone")
        return obj

    # -- Backend ---------------------------------------------------------------------------------
    def dryrun(self, spec: JobSpec, submission: Submission | None = None) -> Rendered:
        """The PyTorchJob manifest and the ConfigMap's files (ds_config.json, job.json). For a
        submission, also the two objects to create, checked as the cluster would check them (its
        namespace comes from the kubeconfig context unless the spec names one)."""
        token = job_token(submission.job_id, spec.name) if submission else ""
        rendered = render(spec, pod_placement(spec, token))
        rendered = dataclasses.replace(rendered, files={**rendered.files, JOB_FILE: job_file_text(spec)},
                                       submission=submission, spec=spec)
        if submission is None:
            return rendered
        return dataclasses.replace(rendered, request=self._objects(spec, rendered, submission.job_id))

    def _objects(self, spec: JobSpec, rendered: Rendered, job_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The PyTorchJob (in its namespace, carrying its orch id) and its ConfigMap."""
        namespace = spec.kubernetes.namespace or self.conn.namespace
        job = yaml.safe_load(rendered.text)
        job["metadata"]["namespace"] = namespace
        job["metadata"].setdefault("annotations", {})[JOB_ID_ANNOTATION] = job_id
        check_job(job, metadata=True)
        cmap = config_map(spec, rendered.files, namespace=namespace, job_id=job_id)
        size = sum(len(v.encode()) for v in cmap["data"].values())
        if size > CONFIGMAP_LIMIT - 16 * 1024:
            raise UserError(f"ds_config and job spec of {spec.name} take {size} bytes; a ConfigMap holds "
                            "at most 1 MiB", hint="keep large data out of the ds_config and the job spec")
        return job, cmap

    def schedule(self, rendered: Rendered) -> JobRef:
        submission, spec = self.submission_of(rendered)
        job, cmap = copy.deepcopy(rendered.request)
        namespace = job["metadata"]["namespace"]
        Path(submission.run_dir, rendered.filename).write_text(yaml.safe_dump(job, sort_keys=False),
                                                               encoding="utf-8")
        created = self._create_job(job, namespace, spec.name)
        cmap["metadata"]["ownerReferences"] = [owner_reference(created)]
        try:
            self._create_config_map(cmap, namespace, spec)
        except BaseException:
            # without its ConfigMap the job's pods could never start: take the job back
            self._delete_quietly(namespace, spec.name, created["metadata"]["uid"])
            raise
        return JobRef(submission.job_id, "kubernetes", f"{namespace}/{spec.name}", submission.run_dir)

    def _create_job(self, job: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call(lambda: self.conn.custom().create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, job, _request_timeout=self.timeout),
                action="create", kind=KIND, name=name, namespace=namespace)
        except UserError as exc:
            cause = exc.__context__
            if not (isinstance(cause, ApiException) and cause.status == 409):
                raise
            try:  # say whether the old job is merely still stopping
                old = self._get_job(namespace, name)
            except UserError:
                raise exc from None
            if (old.get("metadata") or {}).get("deletionTimestamp"):
                raise UserError(f"PyTorchJob {namespace}/{name} is still being deleted (waiting for its pods "
                                "to stop)", hint="submit again once it is gone (`kubectl get pytorchjob "
                                f"{name} -n {namespace}`), or use another name with --set name=NEW-NAME") from None
            raise

    def _create_config_map(self, cmap: dict[str, Any], namespace: str, spec: JobSpec) -> None:
        from kubernetes.client.exceptions import ApiException

        core, name = self.conn.core(), cmap["metadata"]["name"]
        try:
            core.create_namespaced_config_map(namespace, cmap, _request_timeout=self.timeout)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, action="create", kind="ConfigMap", name=name, namespace=namespace,
                                conn=self.conn) from None
        # A ConfigMap of that name exists. If orch made it for an earlier job of this name that is
        # gone (a cluster without a garbage collector, or a crash between the two creates), it is
        # stale: replace it. Anything else is the user's, and orch does not touch it.
        old = self._call(lambda: core.read_namespaced_config_map(name, namespace, _request_timeout=self.timeout),
                         action="read", kind="ConfigMap", name=name, namespace=namespace)
        labels = old.metadata.labels or {}
        if labels.get(MANAGED_BY) != "orch" or labels.get(JOB_LABEL) != spec.name:
            raise UserError(f"ConfigMap {namespace}/{name} already exists and was not made by orch",
                            hint=f"orch keeps job {spec.name}'s ds_config in it: rename the job "
                                 "(--set name=NEW-NAME) or remove that ConfigMap")
        cmap = {**cmap, "metadata": {**cmap["metadata"], "resourceVersion": old.metadata.resource_version}}
        self._call(lambda: core.replace_namespaced_config_map(name, namespace, cmap, _request_timeout=self.timeout),
                   action="replace", kind="ConfigMap", name=name, namespace=namespace)

    def _delete_quietly(self, namespace: str, name: str, uid: str) -> None:
        from kubernetes import client

        try:
            self.conn.custom().delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout,
                body=client.V1DeleteOptions(propagation_policy="Background",
                                            preconditions=client.V1Preconditions(uid=uid)))
        except Exception:  # the original error is the one to report
            pass

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        """One list call per namespace for the jobs (and one for their pods)."""
        by_namespace: dict[str, list[JobRef]] = {}
        out: dict[str, JobStatus] = {}
        for ref in refs:
            if "/" not in ref.native_id:
                out[ref.job_id] = JobStatus(JobState.UNKNOWN, "no PyTorchJob recorded (submit did not complete)")
            else:
                by_namespace.setdefault(ref.native_id.partition("/")[0], []).append(ref)
        for namespace, group in by_namespace.items():
            names = sorted({r.native_id.partition("/")[2] for r in group})
            selector = f"{JOB_LABEL} in ({','.join(names)})"
            listed = self._call(lambda: self.conn.custom().list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, label_selector=selector, _request_timeout=self.timeout),
                action="list", kind=KIND, name="", namespace=namespace)
            jobs = {j["metadata"]["name"]: j for j in listed.get("items", [])}
            pods = self._pods_by_job(namespace, names)
            for ref in group:
                out[ref.job_id] = self._one_status(ref, jobs.get(ref.native_id.partition("/")[2]), pods)
        return out

    def _one_status(self, ref: JobRef, obj: dict[str, Any] | None, pods: dict[str, list[Any]]) -> JobStatus:
        if obj is None:
            return JobStatus(JobState.UNKNOWN, f"PyTorchJob {ref.native_id} no longer exists (deleted, or "
                                               "removed by ttlSecondsAfterFinished)")
        meta = obj["metadata"]
        owner = (meta.get("annotations") or {}).get(JOB_ID_ANNOTATION)
        if owner != ref.job_id:
            return JobStatus(JobState.UNKNOWN, f"PyTorchJob {ref.native_id} now belongs to "
                                               f"{'orch job ' + owner if owner else 'another submitter'}")
        st = job_status(obj)
        if st.state in FINAL_COPY_STATES:
            self._copy_finished_run(ref, obj)
        mine = [p for p in pods.get(meta["name"], [])
                if any(r.get("controller") and r.get("uid") == meta.get("uid")
                       for r in p["metadata"].get("ownerReferences") or [])]
        phases, seen = pod_states(mine)
        per_node = restarts.merged(seen, restarts.recorded(ref.run_dir, meta["name"]))
        if phases or per_node:
            st.nodes, st.restarts = restarts.node_lines(phases, per_node), restarts.job_restarts(per_node)
        return st

    def _copy_finished_run(self, ref: JobRef, obj: dict[str, Any]) -> None:
        """Copy a job's run directory once it ended (run_reader.py), so that its restart record
        (and metrics) stay readable after its pods and the job are gone. Best effort: a cluster
        that refuses the reader pod still shows the restarts its pods' statuses show."""
        from .run_reader import FINAL_COPY_MARK, fetch_run_dir, reader_timeout

        mark = Path(ref.run_dir, FINAL_COPY_MARK)
        if mark.exists():
            return
        try:
            fetch_run_dir(self.conn.core(), self._where(ref)[0], obj, Path(ref.run_dir),
                          timeout=reader_timeout(FINAL_COPY_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - any refusal leaves the live view, never breaks status
            return
        mark.touch()

    def _pods_by_job(self, namespace: str, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The operator's pods of these jobs (API JSON); empty if pods may not be listed (status still works)."""
        import json

        import urllib3
        from kubernetes.client.exceptions import ApiException

        selector = (f"{k8s_logs.OPERATOR_LABEL}={k8s_logs.OPERATOR_NAME},"
                    f"{k8s_logs.JOB_NAME_LABEL} in ({','.join(names)})")
        try:
            response = self.conn.core().list_namespaced_pod(namespace, label_selector=selector,
                                                            _request_timeout=self.timeout, _preload_content=False)
            items = json.loads(response.data)["items"]
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError, KeyError):
            return {}
        out: dict[str, list[dict[str, Any]]] = {}
        for pod in items:
            out.setdefault((pod["metadata"].get("labels") or {}).get(k8s_logs.JOB_NAME_LABEL, ""), []).append(pod)
        return out

    def recorded_nodes(self, ref: JobRef) -> dict[str, str]:
        """A finished job's restarts per pod, from its run directory's copy (its pods may be gone)."""
        return restarts.node_lines({}, restarts.recorded(ref.run_dir, ref.native_id.partition("/")[2]))

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None) -> Iterator[str]:
        namespace, name = self._where(ref)
        obj = self._own_job(ref)
        uid = obj["metadata"]["uid"]
        core = self.conn.core()

        def list_pods() -> list[Any]:
            return self._call(lambda: k8s_logs.job_pods(core, namespace, name, uid, self.timeout),
                              action="list", kind="Pod", name="", namespace=namespace)

        if follow:
            def finished() -> bool:
                return job_status(self._get_job(namespace, name)).state.finished

            return k8s_logs.follow_logs(core, namespace, list_pods, finished, node=node, job=ref.job_id,
                                        poll_interval=self.poll_interval)
        pods = list_pods()
        if not pods:
            st = job_status(obj)
            raise UserError(f"job {ref.job_id} has no pods yet: PyTorchJob {ref.native_id} is "
                            f"{st.state.value} ({st.detail})",
                            hint="the training operator creates the pods once the job is accepted; "
                                 "`orch logs JOB_ID --follow` waits for them")
        chosen = k8s_logs.pick(pods, node, ref.job_id)
        return k8s_logs.read_logs(core, namespace, chosen, prefix=node is None, timeout=self.timeout,
                                  job=ref.job_id)

    def fetch_run_files(self, ref: JobRef) -> int:
        """Copy the job's run directory from its shared volume into ``ref.run_dir`` (run_reader.py:
        a short-lived reader pod; needs pods create/get/delete and pods/log get)."""
        from .run_reader import fetch_run_dir

        namespace, _ = self._where(ref)
        job = self._own_job(ref)
        return self._call(lambda: fetch_run_dir(self.conn.core(), namespace, job, Path(ref.run_dir)),
                          action="create", kind="Pod", name=f"{job['metadata']['name']}-run-reader",
                          namespace=namespace)

    def cancel(self, ref: JobRef) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        namespace, name = self._where(ref)
        uid = self._own_job(ref)["metadata"]["uid"]
        body = client.V1DeleteOptions(propagation_policy=self.propagation,
                                      preconditions=client.V1Preconditions(uid=uid))
        self._call(lambda: self.conn.custom().delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=body, _request_timeout=self.timeout),
            action="delete", kind=KIND, name=name, namespace=namespace)
        # The garbage collector deletes the ConfigMap with its owner; deleting it here as well
        # keeps clusters without one clean, and is harmless where the collector runs first.
        cm = config_map_name(name)
        core = self.conn.core()
        try:
            old = core.read_namespaced_config_map(cm, namespace, _request_timeout=self.timeout)
            if (old.metadata.annotations or {}).get(JOB_ID_ANNOTATION) == ref.job_id:
                core.delete_namespaced_config_map(
                    cm, namespace, _request_timeout=self.timeout,
                    body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=old.metadata.uid)))
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or replaced meanwhile
                raise api_error(exc, action="delete", kind="ConfigMap", name=cm, namespace=namespace,
                                conn=self.conn) from None


def make_backend() -> KubernetesBackend:
    return KubernetesBackend()
