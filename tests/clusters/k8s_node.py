"""The test node (tests/clusters/k8s_node.sh) as the tests and benchmarks use it: its kubeconfig,
the orch image it runs, the PyTorchJob operator double beside it, and the faults tests inject
(a container killed the way a crashed process or an OOM kill ends it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "clusters" / "k8s_node.sh"
NODE_DIR = Path(os.environ.get("ORCH_K8S_NODE", "/tmp/orch-k8s-node"))
CACHE_DIR = Path(os.environ.get("ORCH_K8S_CACHE", "/var/cache/orch-k8s"))
IMAGE = os.environ.get("ORCH_K8S_IMAGE", "k8s.local/orch:dev")
ENABLE = ("run `sudo tests/clusters/k8s_node.sh up` once (Debian 12, root: builds Kubernetes 1.20 from Debian's "
          "source, ~5 min on 2 idle CPUs (far longer under load) and ~15 GB the first time; cached in /var/cache/orch-k8s), or set "
          "ORCH_TEST_NODE_KUBECONFIG (+ ORCH_TEST_NODE_IMAGE) to a disposable cluster that runs the Kubeflow "
          "training operator and can share a ReadWriteMany volume")


def script(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout)


def cache_ready() -> bool:
    """Binaries and the base image are built (starting then takes seconds, not half an hour)."""
    bins = ("kube-apiserver", "kubelet", "kube-scheduler", "kube-controller-manager", "pause")
    return all((CACHE_DIR / "bin" / b).exists() for b in bins) and any((CACHE_DIR / "images").glob("base-*.layer.tar"))


def wait_for_background_prepare() -> str:
    """Wait for a `.ci/k8s-node-up.sh prepare` that CI started beside the tests, if one runs.

    CI builds the node's binaries and base image (about 5 minutes on an idle machine the first time) while the rest of
    the suite runs, and puts the node tier last; .ci/run names the build's pid in
    ORCH_K8S_NODE_PREPARE_PID. Returns what happened, for a skip message."""
    pid = os.environ.get("ORCH_K8S_NODE_PREPARE_PID", "")
    if not pid.isdigit():
        return ""
    limit = float(os.environ.get("ORCH_K8S_NODE_PREPARE_TIMEOUT", "3600"))
    deadline = time.monotonic() + limit
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(5)
    if Path(f"/proc/{pid}").exists():
        return f"the background node build (pid {pid}) was still running after {limit:.0f} s"
    return "the background node build ended (log: /tmp/orch-ci-node-prepare.log)"


def node_ready() -> bool:
    try:
        return script("status", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class K8sNode:
    """A running node; ``operator`` is the double's process when this session runs it."""

    kubeconfig: Path
    image: str
    local: bool  # the node of tests/clusters/k8s_node.sh (faults can be injected through containerd)
    operator: subprocess.Popen[bytes] | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def core(self) -> Any:
        if "core" not in self._clients:
            from kubernetes import client, config

            api = config.new_client_from_config(str(self.kubeconfig))
            self._clients.update(core=client.CoreV1Api(api), custom=client.CustomObjectsApi(api), api=api)
        return self._clients["core"]

    @property
    def custom(self) -> Any:
        self.core  # noqa: B018 - builds both clients
        return self._clients["custom"]

    def start_operator(self) -> None:
        """The PyTorchJob operator double, logging to the node's log directory."""
        log = open(NODE_DIR / "logs" / "pytorchjob-operator.log", "ab")  # noqa: SIM115 - owned by the process
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "tests.clusters.pytorchjob_operator", "--kubeconfig", str(self.kubeconfig),
             "--init-container-image", self.image], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def stop_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            self.operator.wait(timeout=30)

    def pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        selector = f"training.kubeflow.org/job-name={job}"
        response = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def services(self, namespace: str, job: str) -> list[dict[str, Any]]:
        selector = f"training.kubeflow.org/job-name={job}"
        response = self.core.list_namespaced_service(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def kill_container(self, namespace: str, pod: str, container: str = "pytorch") -> None:
        """SIGKILL a running container's processes from the node, as a crash or the OOM killer does:
        the kubelet then restarts it in place (restartPolicy OnFailure) and counts the restart."""
        if not self.local:
            raise RuntimeError("killing a container needs the local test node (containerd on this machine)")
        status = self.core.read_namespaced_pod(pod, namespace).status
        (cid,) = [c.container_id for c in status.container_statuses or [] if c.name == container]
        sock = NODE_DIR / "ctrd" / "containerd.sock"
        subprocess.run(["ctr", "-a", str(sock), "-n", "k8s.io", "task", "kill", "-s", "SIGKILL",
                        cid.split("://", 1)[1]], check=True, capture_output=True, timeout=30)

    def wait_for(self, predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"{what}: not within {timeout:.0f} s")
