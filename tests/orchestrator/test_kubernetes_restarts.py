"""How `orch status` counts a Kubernetes job's restarts: from the pods' statuses (as recorded from the
test node's elastic job, tests/orchestrator/test_kubernetes_node.py) and from the torchrun record each
pod keeps on the run volume (<run>/torchelastic/<pod>/<rdzv id>_<random>/attempt_<n>). One failure
counts once, however many pods it shows on; a finished job's pods may be gone, its record is not."""
from __future__ import annotations

from pathlib import Path

from orchestrator.backends.kubernetes import restarts
from orchestrator.backends.kubernetes.backend import KubernetesBackend
from orchestrator.backends.kubernetes.status import pod_states
from orchestrator.types import JobRef

JOB = "elastic-node"
RDZV = "elastic-node-20261206-080900-84ee"


def pod(index: int, restart_count: int = 0, last: dict | None = None, phase: str = "Running") -> dict:
    """A worker pod as the API server returned it on the test node (the fields orch reads)."""
    return {
        "metadata": {"name": f"{JOB}-worker-{index}", "labels": {
            "training.kubeflow.org/job-name": JOB, "training.kubeflow.org/replica-type": "worker",
            "training.kubeflow.org/replica-index": str(index)}},
        "status": {"phase": phase, "containerStatuses": [{
            "name": "pytorch", "restartCount": restart_count,
            "state": {"running": {"startedAt": "2026-12-06T08:00:44Z"}},
            "lastState": {"terminated": last} if last else {}}]},
    }


KILLED = {"exitCode": 137, "reason": "Error", "startedAt": "2026-12-06T07:56:44Z",
          "finishedAt": "2026-12-06T08:00:43Z"}
AGENT_FAILED = {"exitCode": 1, "reason": "Error", "startedAt": "2026-12-06T07:56:43Z",
                "finishedAt": "2026-12-06T08:02:05Z"}


def record(run_dir: Path, pod_name: str, *agents: int) -> None:
    """Pod ``pod_name``'s torchrun record: one agent directory per torchrun start, with attempts 0..n."""
    for i, highest in enumerate(agents):
        for n in range(highest + 1):
            (run_dir / "torchelastic" / pod_name / f"{RDZV}_{i:08d}" / f"attempt_{n}" / "0").mkdir(parents=True)


def count(pods: list[dict], run_dir: Path) -> tuple[dict[str, str], int]:
    phases, seen = pod_states(pods)
    per_node = restarts.merged(seen, restarts.recorded(run_dir, JOB))
    return restarts.node_lines(phases, per_node), restarts.job_restarts(per_node)


def test_a_killed_worker_container_is_one_restart_of_the_job(tmp_path: Path) -> None:
    # worker-2's container was SIGKILLed and restarted by the kubelet; the other two agents
    # restarted their workers (attempt_1) when their collectives failed
    record(tmp_path, f"{JOB}-worker-0", 1)
    record(tmp_path, f"{JOB}-worker-1", 1)
    record(tmp_path, f"{JOB}-worker-2", 0, 0)
    nodes, total = count([pod(0), pod(1), pod(2, 1, KILLED)], tmp_path)
    assert total == 1
    assert nodes == {
        "worker-0": "Running, restarts 1: workers restarted 1 by torchrun",
        "worker-1": "Running, restarts 1: workers restarted 1 by torchrun",
        "worker-2": "Running, restarts 1: container restarted 1 (last exit 137 (SIGKILL))",
    }


def test_before_the_record_is_copied_the_pods_statuses_count(tmp_path: Path) -> None:
    nodes, total = count([pod(0), pod(1), pod(2, 1, KILLED)], tmp_path / "no-copy-yet")
    assert total == 1 and nodes["worker-0"] == "Running"


def test_one_failure_on_every_pod_counts_once_and_a_second_failure_twice(tmp_path: Path) -> None:
    # what the node showed before pods shared their PID namespace: worker-2 killed (1), then every
    # agent failed in the stalled rendezvous and every container restarted (1 more each)
    nodes, total = count([pod(0, 1, AGENT_FAILED), pod(1, 1, AGENT_FAILED), pod(2, 2, AGENT_FAILED)], tmp_path)
    assert total == 2, nodes
    assert nodes["worker-0"] == "Running, restarts 1: container restarted 1 (last exit 1)"


def test_a_rank_exiting_inside_a_pod_counts_from_torchruns_record_alone(tmp_path: Path) -> None:
    # a program that reports nothing; rank 1 exited once and torchrun restarted the workers in place
    record(tmp_path, f"{JOB}-worker-0", 1)
    record(tmp_path, f"{JOB}-worker-1", 1)
    nodes, total = count([pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], tmp_path)
    assert total == 1
    assert nodes["worker-1"] == "Succeeded, restarts 1: workers restarted 1 by torchrun"


def test_a_recreated_pod_counts_from_its_record(tmp_path: Path) -> None:
    # the operator deleted a failed pod and made a new one of the same name: its status starts at 0
    record(tmp_path, f"{JOB}-worker-1", 0, 0)
    nodes, total = count([pod(0), pod(1)], tmp_path)
    assert total == 1 and nodes["worker-1"] == "Running, restarts 1: container restarted 1"


def test_a_finished_jobs_restarts_per_pod_come_from_its_run_directory(tmp_path: Path) -> None:
    record(tmp_path, f"{JOB}-worker-0", 1)
    record(tmp_path, f"{JOB}-worker-2", 0, 0)
    (tmp_path / "torchelastic" / "other-job-worker-0" / f"{RDZV}_00000000" / "attempt_3").mkdir(parents=True)
    ref = JobRef("j-1", "kubernetes", f"ns/{JOB}", str(tmp_path))
    assert KubernetesBackend().recorded_nodes(ref) == {
        "worker-0": "restarts 1: workers restarted 1 by torchrun",
        "worker-2": "restarts 1: container restarted 1",
    }


def test_exit_text_names_the_signal_or_the_kubelets_reason() -> None:
    assert restarts.exit_text({"exitCode": 137, "reason": "OOMKilled"}) == "exit 137 (OOMKilled)"
    assert restarts.exit_text({"exitCode": 143, "reason": "Error"}) == "exit 143 (SIGTERM)"
    assert restarts.exit_text({"exitCode": 2}) == "exit 2"
    assert restarts.exit_text({}) == ""
