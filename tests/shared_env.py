"""The one place tests reach outside the repository (../shared: Slurm and API-server scripts,
the Kubeflow CRD), and say how to enable a tier when it is absent.

In a user's clone there is no ../shared: those tiers skip, each with a message naming the
environment variable that points them at a real resource instead.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ORCH_SHARED_DIR", REPO.parent / "shared"))


def shared_path(relative: str, env_var: str) -> Path:
    """Where a file of ../shared is: the path in ``env_var`` if set, else ``SHARED/relative`` (may not exist)."""
    override = os.environ.get(env_var)
    return Path(override) if override else SHARED / relative


def shared_file(relative: str, env_var: str, what: str) -> Path:
    """A file from ../shared (or the path in ``env_var``), or skip the test saying how to get it."""
    path = shared_path(relative, env_var)
    if not path.exists():
        pytest.skip(f"{what} not found at {path}: set {env_var}=/path/to/it "
                    f"(or ORCH_SHARED_DIR to a checkout of the shared test tools)")
    return path


def pytorchjob_crd_path() -> Path:
    return shared_file("k8s/kubeflow.org_pytorchjobs.yaml", "ORCH_PYTORCHJOB_CRD",
                       "the Kubeflow PyTorchJob CRD (kubeflow.org_pytorchjobs.yaml)")


def slurm_cluster_script() -> Path:
    return shared_file("slurm/cluster.sh", "ORCH_SLURM_CLUSTER_SH", "the test Slurm cluster script")


def apiserver_script() -> Path:
    return shared_file("k8s/apiserver.sh", "ORCH_K8S_APISERVER_SH", "the test kube-apiserver script")


def start_or_skip(argv: list[str], ready: Callable[[], bool], enable: str, timeout: float,
                  env: dict[str, str] | None = None) -> None:
    """Run a test-cluster script's start command (``bash SCRIPT start ...``); unless it succeeds and
    ``ready()`` then holds, skip the test with the script's last output and how to enable the tier."""
    import subprocess

    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{' '.join(argv[1:])} did not finish in {timeout / 60:.0f} min; {enable}")
    if result.returncode != 0 or not ready():
        pytest.skip(f"{argv[1]} start failed (exit {result.returncode}): "
                    f"{(result.stderr or result.stdout)[-800:]}; {enable}")


# --------------------------------------------------------------------------------------------
# A real kube-apiserver with the PyTorchJob CRD (the `kubernetes` tier)
# --------------------------------------------------------------------------------------------

K8S_DIR = Path(os.environ.get("ORCH_K8S_DIR", "/tmp/orch-k8s"))  # where .ci/k8s-up.sh starts it too
K8S_ENABLE = ("set ORCH_TEST_KUBECONFIG=/path/to/kubeconfig of a disposable test cluster (no training "
              "operator running; allowed to install CRDs), or provide ../shared/k8s/apiserver.sh")


def _api_reachable(kubeconfig: Path) -> bool:
    from kubernetes import client, config

    if not kubeconfig.exists():
        return False
    try:
        api = config.new_client_from_config(str(kubeconfig))
        client.VersionApi(api).get_code(_request_timeout=5)
        return True
    except Exception:
        return False


def install_pytorchjob_crd(kubeconfig: Path) -> None:
    """Install the Kubeflow PyTorchJob CRD (if absent) with the Python client and wait until it
    is served (`kubectl apply` refuses this CRD: its last-applied annotation is too large)."""
    import time

    import yaml
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(config.new_client_from_config(str(kubeconfig)))
    name = "pytorchjobs.kubeflow.org"
    try:
        ext.read_custom_resource_definition(name)  # installed already (an earlier session, or CI)
    except ApiException as exc:
        if exc.status != 404:
            raise
        ext.create_custom_resource_definition(yaml.safe_load(pytorchjob_crd_path().read_text()))
    for _ in range(200):
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return
        time.sleep(0.05)
    raise RuntimeError(f"CRD {name} was not established within 10 s")


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[Path]:
    """The kubeconfig of a real kube-apiserver that serves kubeflow.org/v1 PyTorchJobs.

    ORCH_TEST_KUBECONFIG points at an existing test cluster; otherwise ../shared/k8s/apiserver.sh
    is started (unless it already runs in ORCH_K8S_DIR, e.g. from .ci/k8s-up.sh) and stopped again
    at the end of the session if this fixture started it.
    """
    import subprocess

    given = os.environ.get("ORCH_TEST_KUBECONFIG")
    script: Path | None = None
    if given:
        kubeconfig = Path(given)
        if not _api_reachable(kubeconfig):
            pytest.skip(f"ORCH_TEST_KUBECONFIG={given}: no API server answers with that kubeconfig")
    else:
        candidate = shared_path("k8s/apiserver.sh", "ORCH_K8S_APISERVER_SH")
        if not candidate.exists():
            pytest.skip(f"no Kubernetes API server for the kubernetes tier: {K8S_ENABLE}")
        kubeconfig = K8S_DIR / "kubeconfig"
        if not _api_reachable(kubeconfig):
            start_or_skip(["bash", str(candidate), "start", str(K8S_DIR)], lambda: _api_reachable(kubeconfig),
                          K8S_ENABLE, timeout=1800)
            script = candidate
    install_pytorchjob_crd(kubeconfig)
    try:
        yield kubeconfig
    finally:
        if script is not None:
            subprocess.run(["bash", str(script), "stop", str(K8S_DIR)], capture_output=True, timeout=120)


# --------------------------------------------------------------------------------------------
# A real multi-node Slurm cluster (the `slurm` tier)
# --------------------------------------------------------------------------------------------

SLURM_LAB = Path(os.environ.get("SLURM_LAB", "/tmp/orch-slurm"))  # where .ci/slurm-up.sh starts it too
SLURM_ENABLE = ("set ORCH_TEST_SLURM_CONF=/path/to/slurm.conf of an existing test cluster (3 idle nodes "
                "of 2 CPUs, a shared filesystem for $ORCH_HOME), or provide ../shared/slurm/cluster.sh "
                "(the lab cluster: `cluster.sh install` once, the tests start it)")


class SlurmLab:
    """The Slurm cluster the tests submit to; ``script`` is set for the lab cluster, whose nodes
    the tests may crash (``kill_node``) and bring back (``start_node``)."""

    def __init__(self, conf: Path, script: Path | None) -> None:
        self.conf, self.script = conf, script

    def _slurm(self, *argv: str) -> str:
        import subprocess

        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=env).stdout

    def node_states(self) -> dict[str, str]:
        lines = self._slurm("sinfo", "--noheader", "--Node", "--format=%N %T").split("\n")
        return dict(line.split(None, 1) for line in lines if line.strip())

    def up(self) -> bool:
        import subprocess

        if not self.conf.exists():  # scontrol would retry reading it for a minute
            return False
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        try:
            ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, env=env)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return ping.returncode == 0 and "UP" in ping.stdout and bool(self.node_states())

    def kill_node(self, node: str) -> None:
        """Hard crash: SIGKILL the node's slurmd and everything running on it."""
        self._cluster_sh("kill_node", node)

    def start_node(self, node: str, timeout: float = 60) -> None:
        """Bring a crashed node back and wait until Slurm has it in service again."""
        import time

        self._cluster_sh("start_node", node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_states().get(node) in ("idle", "mixed", "allocated"):  # no "*": responding
                return
            time.sleep(0.5)
        raise AssertionError(f"node {node} not back in service after {timeout:.0f} s: {self.node_states()}")

    def restore_nodes(self) -> None:
        """Every node that a test crashed is started again."""
        for node, state in self.node_states().items():
            if state.endswith("*") or state.startswith("down"):
                self.start_node(node)

    def _cluster_sh(self, *argv: str) -> None:
        import subprocess

        if self.script is None:
            pytest.skip("crashing nodes needs the lab cluster (../shared/slurm/cluster.sh), "
                        "not an ORCH_TEST_SLURM_CONF cluster")
        env = {**os.environ, "SLURM_CONF": str(self.conf), "SLURM_LAB": str(SLURM_LAB)}
        subprocess.run(["bash", str(self.script), *argv], check=True, capture_output=True, timeout=60, env=env)


def lab_lock(timeout_s: float = 1200) -> object | None:
    """An exclusive lock on the lab cluster for this process (tests crash its nodes: two test
    sessions or a benchmark at once would crash each other's jobs); None if not had in time."""
    return exclusive_lock(SLURM_LAB / "orch-users.lock", timeout_s)


_HELD_LOCKS: dict[Path, object] = {}


def exclusive_lock(path: Path, timeout_s: float) -> object | None:
    """An exclusive flock on ``path``, held until the process ends; None if not had in time.
    Re-entrant within the process: a session fixture imported by two test modules is two
    fixtures, and the second must not wait for the first."""
    import fcntl
    import time

    if path in _HELD_LOCKS and not _HELD_LOCKS[path].closed:  # type: ignore[attr-defined]
        return _HELD_LOCKS[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")  # noqa: SIM115 - held until the process ends
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _HELD_LOCKS[path] = handle
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            time.sleep(2)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmLab]:
    """A running Slurm cluster with SLURM_CONF pointing at it for the whole session: the one named
    by ORCH_TEST_SLURM_CONF, or the lab cluster of ../shared/slurm/cluster.sh (started here if it
    is not running, and stopped at the end only if this session started it)."""
    import shutil
    import subprocess

    given = os.environ.get("ORCH_TEST_SLURM_CONF")
    started: Path | None = None
    lock = None
    if given:
        lab = SlurmLab(Path(given), None)
        if not lab.conf.exists() or not lab.up():
            pytest.skip(f"ORCH_TEST_SLURM_CONF={given}: no Slurm controller answers with that slurm.conf")
    else:
        script = shared_path("slurm/cluster.sh", "ORCH_SLURM_CLUSTER_SH")
        if not script.exists():
            pytest.skip(f"no Slurm cluster for the slurm tier: {SLURM_ENABLE}")
        if not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch")):
            pytest.skip(f"Slurm is not installed: run `{script} install` (or .ci/slurm-up.sh); {SLURM_ENABLE}")
        lock = lab_lock()
        if lock is None:
            pytest.skip(f"the lab Slurm cluster in {SLURM_LAB} stayed busy for 20 min (another test session or "
                        "benchmark holds orch-users.lock)")
        lab = SlurmLab(SLURM_LAB / "etc" / "slurm.conf", script)
        if not lab.up():
            env = {**os.environ, "SLURM_LAB": str(SLURM_LAB), "SLURM_CONF": str(lab.conf)}
            start_or_skip(["bash", str(script), "start"], lab.up, SLURM_ENABLE, timeout=300, env=env)
            started = script
        lab.restore_nodes()  # a node an interrupted earlier session left crashed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(lab.conf))
        try:
            yield lab
        finally:
            if started is not None:
                env = {**os.environ, "SLURM_LAB": str(SLURM_LAB)}
                subprocess.run(["bash", str(started), "stop"], capture_output=True, timeout=120, env=env)
            if lock is not None:
                lock.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Three bare machines reachable over real OpenSSH (the `ssh` tier)
# --------------------------------------------------------------------------------------------

SSH_LAB = Path(os.environ.get("ORCH_SSH_LAB", "/tmp/orch-ssh"))  # where .ci/ssh-up.sh starts them too
SSH_HOSTS_SH = REPO / "tests" / "clusters" / "ssh_hosts.sh"
SSH_ENABLE = ("run the tests as root (tests/clusters/ssh_hosts.sh makes 3 hosts as network namespaces with "
              "their own sshd; it installs Debian's openssh-server if missing), or start them once with "
              "`sudo tests/clusters/ssh_hosts.sh start` and make $ORCH_SSH_LAB readable")


class SshLab:
    """The project's 3 ssh hosts: names, the client's ssh options, and crashing/reviving a host."""

    hosts = ("orch-h1", "orch-h2", "orch-h3")

    def __init__(self, lab: Path) -> None:
        self.lab = lab

    @property
    def ssh_options(self) -> list[str]:
        return ["-F", str(self.lab / "ssh_config")]

    def _script(self, *argv: str, check: bool = True) -> str:
        import subprocess

        env = {**os.environ, "ORCH_SSH_LAB": str(self.lab)}
        result = subprocess.run(["bash", str(SSH_HOSTS_SH), *argv], capture_output=True, text=True,
                                timeout=300, env=env)
        if check and result.returncode != 0:
            raise RuntimeError(f"ssh_hosts.sh {' '.join(argv)} failed: {result.stderr[-800:]}")
        return result.stdout

    def up(self) -> bool:
        if not (self.lab / "ssh_config").exists():
            return False
        lines = self._script("status", check=False).splitlines()
        return len(lines) == len(self.hosts) and all(line.endswith(" up") for line in lines)

    def kill(self, host: str) -> None:
        """The machine dies: every process on it is SIGKILLed and its network link goes down."""
        self._script("kill", host)

    def revive(self, host: str) -> None:
        self._script("revive", host)

    def pids(self, host: str) -> set[int]:
        """The processes running on ``host`` now (its sshd included)."""
        return {int(p) for p in self._script("pids", host).split()}

    def run(self, host: str, command: str) -> str:
        """Run a shell command on ``host`` over ssh; its stdout."""
        import subprocess

        return subprocess.run(["ssh", *self.ssh_options, host, command], capture_output=True, text=True,
                              timeout=60, check=True).stdout


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[SshLab]:
    """3 running ssh hosts (tests/clusters/ssh_hosts.sh), started here unless already up (and then
    stopped at the end of the session); killed hosts are revived after each use of ``kill``."""
    lab = SshLab(SSH_LAB)
    if os.geteuid() != 0 and not lab.up():
        pytest.skip(f"no ssh hosts for the ssh tier: {SSH_ENABLE}")
    lock = exclusive_lock(Path(f"{SSH_LAB}.lock"), 1200)
    if lock is None:
        pytest.skip(f"the ssh hosts in {SSH_LAB} stayed busy for 20 min (another test session holds {SSH_LAB}.lock)")
    started = False
    try:
        if not lab.up():
            for host in lab.hosts:  # a host an interrupted session left dead
                lab._script("revive", host, check=False)
        if not lab.up():
            lab._script("stop", check=False)
            start_or_skip(["bash", str(SSH_HOSTS_SH), "start"], lab.up, SSH_ENABLE, timeout=600,
                          env={**os.environ, "ORCH_SSH_LAB": str(SSH_LAB)})
            started = True
        yield lab
    finally:
        if started:
            lab._script("stop", check=False)
        lock.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# A real Kubernetes node (kubelet + containerd) that runs orch's pods (the `kubernetes` + `slow` tier)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def k8s_node() -> Iterator[object]:
    """A node that runs pods: the project's own (tests/clusters/k8s_node.sh, with the PyTorchJob
    operator double running beside it for the session), or the cluster of ORCH_TEST_NODE_KUBECONFIG
    (which must run the real Kubeflow training operator). The local node is started here when it is
    built but not running (its orch image refreshed from the working tree first), and stopped at
    the end only if this session started it."""
    from tests.clusters import k8s_node as node

    given = os.environ.get("ORCH_TEST_NODE_KUBECONFIG")
    if given:
        if not _api_reachable(Path(given)):
            pytest.skip(f"ORCH_TEST_NODE_KUBECONFIG={given}: no API server answers with that kubeconfig")
        yield node.K8sNode(Path(given), os.environ.get("ORCH_TEST_NODE_IMAGE", node.IMAGE), local=False)
        return
    if os.geteuid() != 0:
        pytest.skip(f"the test Kubernetes node needs root; {node.ENABLE}")
    background = node.wait_for_background_prepare()
    if not node.cache_ready():
        pytest.skip(f"the test Kubernetes node is not built{'; ' + background if background else ''}; {node.ENABLE}")
    started = False
    if not node.node_ready():  # a running node (.ci/k8s-node-up.sh) has the image of this tree already
        images = node.script("images", timeout=1800)
        if images.returncode != 0:
            pytest.skip(f"k8s_node.sh images failed: {images.stderr[-800:]}; {node.ENABLE}")
        start_or_skip(["bash", str(node.SCRIPT), "start"], node.node_ready, node.ENABLE, timeout=600)
        started = True
    kubeconfig = node.NODE_DIR / "kubeconfig"
    install_pytorchjob_crd(kubeconfig)
    running = node.K8sNode(kubeconfig, node.IMAGE, local=True)
    running.start_operator()
    try:
        yield running
    finally:
        running.stop_operator()
        if started:
            node.script("stop", timeout=300)
