"""`orch logs` for PyTorchJobs on a real API server. No kubelet runs here, so no container ever
starts: these tests check that orch picks exactly the job's pods (by the operator's labels and
owner reference) and says clearly why there is nothing to show yet."""
from __future__ import annotations

import threading

import pytest
from typer.testing import CliRunner

from orchestrator.backends.kubernetes import KubernetesBackend
from orchestrator.cli import app
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from tests.shared_env import REPO
from tests.test_kubernetes_backend import T0, cond, operator_pod

pytestmark = pytest.mark.kubernetes
runner = CliRunner()
EXAMPLE = str(REPO / "examples" / "tiny-gpt-zero2.yaml")


def submit() -> str:
    result = runner.invoke(app, ["submit", EXAMPLE, "--cluster", "kubernetes"])
    assert result.exit_code == 0, result.output
    return next(r.job_id for r in Registry().list(include_finished=True) if r.job_id in result.output)


def test_logs_before_the_operator_made_pods_say_so(k8s) -> None:
    job_id = submit()
    result = runner.invoke(app, ["logs", job_id])
    assert result.exit_code == 2
    assert f"job {job_id} has no pods yet" in result.output and "PENDING" in result.output
    assert "--follow" in result.output  # the hint says how to wait


def test_logs_pick_exactly_the_jobs_pods(k8s) -> None:
    job_id = submit()
    uid = k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["uid"]
    k8s.core.create_namespaced_pod(k8s.namespace, operator_pod("tiny-gpt-zero2", uid, "master", 0))
    k8s.core.create_namespaced_pod(k8s.namespace, operator_pod("tiny-gpt-zero2", uid, "worker", 0))
    # another job's pod, and a leftover pod of an older job that had the same name
    k8s.core.create_namespaced_pod(k8s.namespace, operator_pod("other-job", uid, "worker", 0))
    stale = operator_pod("tiny-gpt-zero2", "00000000-0000-0000-0000-000000000000", "worker", 1)
    k8s.core.create_namespaced_pod(k8s.namespace, stale)

    result = runner.invoke(app, ["logs", job_id])
    assert result.exit_code == 2
    assert f"job {job_id} has no logs yet" in result.output
    assert "master-0: pod tiny-gpt-zero2-master-0 is Pending, not scheduled to a node yet" in result.output
    assert "worker-0: pod tiny-gpt-zero2-worker-0 is Pending" in result.output
    assert "worker-1" not in result.output and "other-job" not in result.output

    only = runner.invoke(app, ["logs", job_id, "--node", "worker-0"])
    assert "worker-0:" in only.output and "master-0" not in only.output
    missing = runner.invoke(app, ["logs", job_id, "--node", "worker-7"])
    assert missing.exit_code == 2 and "has no node 'worker-7' (nodes: master-0, worker-0)" in missing.output


def test_a_scheduled_pod_whose_container_waits_is_reported_as_waiting(k8s) -> None:
    job_id = submit()
    uid = k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["uid"]
    k8s.core.create_namespaced_pod(k8s.namespace, operator_pod("tiny-gpt-zero2", uid, "master", 0, node="gpu-node-1"))
    k8s.core.patch_namespaced_pod_status("tiny-gpt-zero2-master-0", k8s.namespace, {"status": {
        "phase": "Pending", "containerStatuses": [{
            "name": "pytorch", "image": "img", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}})
    result = runner.invoke(app, ["logs", job_id])
    assert result.exit_code == 2
    assert "master-0: pod tiny-gpt-zero2-master-0: container pytorch is ImagePullBackOff" in result.output


def test_follow_waits_for_pods_and_stops_when_the_job_ends_without_any(k8s) -> None:
    job_id = submit()
    ref = Registry().get(job_id).ref
    lines = KubernetesBackend(poll_interval=0.1).logs(ref, follow=True)
    first = next(lines)
    assert first == f"[orch] waiting for the pods of job {job_id} to start (Ctrl-C to stop)"
    # the operator gives up on the job (e.g. pods could never be created)
    timer = threading.Timer(0.3, k8s.set_status, args=("tiny-gpt-zero2", {"conditions": [
        cond("Created"), cond("Failed", message="PyTorchJob tiny-gpt-zero2 is failed because 1 Master "
                                                "replica(s) failed.")], "completionTime": T0}))
    timer.start()
    try:
        with pytest.raises(UserError, match="finished without any pod logging anything"):
            list(lines)
    finally:
        timer.cancel()
