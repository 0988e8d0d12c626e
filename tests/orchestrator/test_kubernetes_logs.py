"""`orch logs` for PyTorchJobs on a real API server: orch picks exactly the job's pods (by the
operator's labels and owner reference), says clearly why there is nothing to show yet, and reads
or follows every node's log through the API server's pod-log proxy."""
from __future__ import annotations

import threading
import time

import pytest
from typer.testing import CliRunner

from orchestrator.backends.kubernetes.backend import KubernetesBackend
from orchestrator.cli import app
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from tests.shared_env import REPO
from tests.orchestrator.test_kubernetes_backend import T0, cond, operator_pod

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


@pytest.mark.timeout(120)
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


# -- logs of running pods, through the API server's real log proxy ----------------------------------
# No kubelet runs here, so a small HTTPS server stands in for one node's kubelet log endpoint
# (GET /containerLogs/NAMESPACE/POD/CONTAINER[?follow=true]); a Node object points the API
# server at it. Everything between orch and that endpoint is real: the client, the API server's
# pod-log subresource and its proxying, chunked streaming.

class FakeKubeletLogs:
    """Serves container logs the way a kubelet does; ``lines`` per pod, streamed with ``delay``."""

    def __init__(self, workdir, delay: float = 0.05) -> None:
        import http.server
        import shutil
        import ssl
        import subprocess

        if not shutil.which("openssl"):
            pytest.skip("openssl is needed to give the stand-in kubelet a TLS certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=fake-kubelet", "-keyout", str(workdir / "k.key"), "-out", str(workdir / "k.crt")],
                       check=True, capture_output=True, timeout=60)
        self.lines: dict[str, list[str]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                owner.requests.append(self.path)
                pod = path.split("/")[3] if path.startswith("/containerLogs/") else ""
                self.send_response(200 if pod in owner.lines else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in owner.lines.get(pod, []):
                    data = (line + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if "follow=true" in query:
                        time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(workdir / "k.crt"), str(workdir / "k.key"))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def node(k8s, tmp_path):
    """A Node whose kubelet endpoint is the stand-in log server; yields (node name, server)."""
    import secrets

    kubelet = FakeKubeletLogs(tmp_path)
    name = f"orch-test-node-{secrets.token_hex(3)}"
    k8s.core.create_node({"metadata": {"name": name}})
    k8s.core.patch_node_status(name, {"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port}}}})
    try:
        yield name, kubelet
    finally:
        kubelet.close()
        k8s.core.delete_node(name)


def start_pod(k8s, job: str, uid: str, rtype: str, index: int, node_name: str, restarts: int = 0) -> None:
    """A pod of the job, scheduled on ``node_name`` with its container running."""
    k8s.core.create_namespaced_pod(k8s.namespace, operator_pod(job, uid, rtype, index, node=node_name))
    k8s.core.patch_namespaced_pod_status(f"{job}-{rtype}-{index}", k8s.namespace, {"status": {
        "phase": "Running", "containerStatuses": [{
            "name": "pytorch", "image": "img", "imageID": "", "ready": True, "restartCount": restarts,
            "state": {"running": {"startedAt": T0}}}]}})


def test_logs_of_running_pods_are_prefixed_by_node(k8s, node) -> None:
    node_name, kubelet = node
    job_id = submit()
    uid = k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["uid"]
    kubelet.lines["tiny-gpt-zero2-master-0"] = ["step 1 loss 3.20", "step 2 loss 3.05"]
    kubelet.lines["tiny-gpt-zero2-worker-0"] = ["worker up"]
    start_pod(k8s, "tiny-gpt-zero2", uid, "master", 0, node_name)
    start_pod(k8s, "tiny-gpt-zero2", uid, "worker", 0, node_name)
    result = runner.invoke(app, ["logs", job_id])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["[master-0] step 1 loss 3.20", "[master-0] step 2 loss 3.05",
                                          "[worker-0] worker up"]
    assert f"/containerLogs/{k8s.namespace}/tiny-gpt-zero2-master-0/pytorch" in kubelet.requests
    one = runner.invoke(app, ["logs", job_id, "--node", "worker-0"])
    assert one.output.splitlines() == ["worker up"]


@pytest.mark.timeout(120)
def test_follow_streams_every_node_until_the_job_finishes(k8s, node) -> None:
    node_name, kubelet = node
    job_id = submit()
    uid = k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["uid"]
    kubelet.lines["tiny-gpt-zero2-master-0"] = [f"master step {i}" for i in range(5)]
    kubelet.lines["tiny-gpt-zero2-worker-0"] = [f"worker step {i}" for i in range(5)]
    start_pod(k8s, "tiny-gpt-zero2", uid, "master", 0, node_name)
    k8s.set_status("tiny-gpt-zero2", {"conditions": [cond("Created"), cond("Running")]})
    ref = Registry().get(job_id).ref
    got: list[str] = []
    lines = KubernetesBackend(poll_interval=0.1).logs(ref, follow=True)
    for line in lines:
        got.append(line)
        if line == "[master-0] master step 0":  # the worker's pod starts later, as pods do
            start_pod(k8s, "tiny-gpt-zero2", uid, "worker", 0, node_name)
        if line == "[worker-0] worker step 4":
            k8s.set_status("tiny-gpt-zero2", {"conditions": [cond("Created"), cond("Running", "False"),
                                                             cond("Succeeded")]})
    # every line of both nodes, each node's in order; the generator ended by itself
    assert [g for g in got if g.startswith("[master-0]")] == [f"[master-0] master step {i}" for i in range(5)]
    assert [g for g in got if g.startswith("[worker-0]")] == [f"[worker-0] worker step {i}" for i in range(5)]
    assert all("follow=true" in r for r in kubelet.requests)
