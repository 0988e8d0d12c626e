"""orch's PyTorchJobs and Helm releases run as pods on a real Kubernetes node: kubelet + containerd
(tests/clusters/k8s_node.sh), the Kubeflow CRD, and the PyTorchJob operator double
(tests/clusters/pytorchjob_operator.py, following training-operator release-1.9). The pods run the
orch image built from this tree and share one hostPath volume (the node is one machine), named
in the spec as `kubernetes.shared_volume`: checkpoints and the run directory live on it.

Each test reads like a user's session: write a job file, `orch submit ... --follow`, look at
`orch status`, `orch logs`, `orch plot`, kill a container, `orch cancel`."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.shared_env import REPO, k8s_node  # noqa: F401  (session fixture: the node)

pytestmark = [pytest.mark.kubernetes, pytest.mark.slow]

EXAMPLES = REPO / "examples"
SHARED_ROOT = Path(os.environ.get("ORCH_K8S_SHARED", "/var/tmp/orch-k8s-shared"))


class NodeSession:
    """A user's shell against the node: a namespace of its own, KUBECONFIG, ORCH_HOME, a job dir."""

    def __init__(self, node: Any, namespace: str, kubeconfig: Path, home: Path, workdir: Path) -> None:
        self.node, self.namespace, self.kubeconfig, self.home, self.workdir = node, namespace, kubeconfig, home, workdir
        self.shared = SHARED_ROOT / namespace

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "ORCH_HOME": str(self.home)}

    def orch(self, *argv: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True,
                                timeout=timeout, env=self.env(), cwd=self.workdir)
        if check:
            assert result.returncode == 0, f"orch {' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
        return result

    def orch_background(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env(), cwd=self.workdir)

    def job_file(self, example: str, name: str, **extra: Any) -> Path:
        """The example's spec, made to run on the node: the node's image, the shared volume."""
        spec = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
        spec["name"] = name
        spec["ds_config"] = str(EXAMPLES / spec["ds_config"])
        spec["kubernetes"] = {
            "image": self.node.image, "image_pull_policy": "IfNotPresent", "shm_size": "256Mi",
            "volumes": [{"name": "shared", "hostPath": {"path": str(self.shared), "type": "DirectoryOrCreate"}}],
            "shared_volume": "shared",
        }
        spec.update(extra)
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def job_ids(self) -> list[str]:
        """Job ids in this session's registry, newest first (ORCH_HOME is the test's own)."""
        from orchestrator.registry import Registry

        return [r.job_id for r in Registry().list(include_finished=True)]

    def created_job(self, timeout: float = 300) -> str:
        """The newest job's id once its PyTorchJob exists (the record carries namespace/name)."""
        from orchestrator.registry import Registry

        def created() -> str | None:
            records = Registry().list(include_finished=True)
            return records[0].job_id if records and "/" in records[0].native_id else None

        return self.node.wait_for(created, timeout, "the job's PyTorchJob in the registry")

    def run_dir(self, job_name: str) -> Path:
        return self.shared / job_name / "run"

    def checkpoints(self, job_name: str) -> Path:
        return self.shared / job_name / "checkpoints"


@pytest.fixture
def session(k8s_node: Any, tmp_path: Path) -> Any:
    namespace = f"orch-node-{secrets.token_hex(3)}"
    kc = yaml.safe_load(k8s_node.kubeconfig.read_text())
    current = next(c for c in kc["contexts"] if c["name"] == kc["current-context"])
    current["context"]["namespace"] = namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kc))
    k8s_node.core.create_namespace({"metadata": {"name": namespace, "labels": {"orch.dev/test": "true"}}})
    home = Path(os.environ["ORCH_HOME"])  # the autouse fixture's: the registry this process reads too
    s = NodeSession(k8s_node, namespace, kubeconfig, home, tmp_path)
    yield s
    k8s_node.core.delete_namespace(namespace)  # the namespace controller removes what is left
    shutil.rmtree(s.shared, ignore_errors=True)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run directory's metrics (the last record of a step wins: a resumed run)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind", "train") == "train" and "loss" in rec and "step" in rec:
            out[int(rec["step"])] = float(rec["loss"])
    return out


class LocalReference:
    """The same spec on the local backend (same world size, same ds_config), started when the test
    starts: it trains while the node schedules and starts the pods, and ``losses()`` waits for it."""

    def __init__(self, tmp_path: Path, example: str, name: str, *sets: str) -> None:
        spec = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
        spec["name"] = name
        spec["ds_config"] = str(EXAMPLES / spec["ds_config"])
        path = tmp_path / f"{name}-local.yaml"
        path.write_text(yaml.safe_dump(spec))
        self.home = tmp_path / f"{name}-home"
        env = {**os.environ, "ORCH_HOME": str(self.home)}
        argv = [sys.executable, "-m", "orchestrator", "submit", str(path), "--cluster", "local", "--follow"]
        for s in sets:
            argv += ["--set", s]
        self.output = tmp_path / f"{name}-submit.log"   # a file: a pipe nobody reads until the end could fill
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    def losses(self) -> dict[int, float]:
        self.proc.wait(timeout=900)
        assert self.proc.returncode == 0, self.output.read_text()
        (metrics,) = self.home.rglob("metrics.jsonl")
        return losses(metrics.parent)


@pytest.fixture
def local_reference(tmp_path: Path) -> Any:
    """Starts a LocalReference; a test that fails before reading it leaves no `orch submit` behind
    (the local job itself is a few steps long and ends on its own)."""
    started: list[LocalReference] = []

    def start(example: str, name: str, *sets: str) -> LocalReference:
        started.append(LocalReference(tmp_path, example, name, *sets))
        return started[-1]

    yield start
    for reference in started:
        if reference.proc.poll() is None:
            reference.proc.kill()
            reference.proc.wait()


def test_submit_follow_trains_to_succeeded_with_the_local_backends_losses(session: NodeSession, tmp_path: Path,
                                                                         local_reference: Any) -> None:
    job = session.job_file("tiny-gpt-zero2", "zero2-node")
    # the same spec on the local backend (4 ranks, same ds_config), training while the pods start
    reference = local_reference("tiny-gpt-zero2", "zero2-local")
    submit = session.orch_background("submit", str(job), "--cluster", "kubernetes", "--follow")
    job_id = session.created_job()
    follow_logs = session.orch_background("logs", job_id, "-f")
    submitted, _ = submit.communicate(timeout=1200)
    assert submit.returncode == 0 and "SUCCEEDED" in submitted, submitted

    # `orch logs -f` streamed both pods from the kubelet until the job finished
    streamed, _ = follow_logs.communicate(timeout=120)
    assert follow_logs.returncode == 0, streamed
    for pod in ("master-0", "worker-0"):
        assert any(line.startswith(f"[{pod}]") or pod in line.split(" ", 1)[0] for line in streamed.splitlines()), \
            f"no lines of {pod}:\n{streamed[-3000:]}"

    # the run directory is on the shared volume: metrics, plots and status read it through the API
    node_losses = losses(session.run_dir("zero2-node"))
    assert max(node_losses) == 60
    status = session.orch("status", job_id, "--metrics").stdout
    assert "SUCCEEDED" in status and "loss" in status, status
    plotted = session.orch("plot", job_id, "-o", str(tmp_path / "k8s.png"))
    assert (tmp_path / "k8s.png").stat().st_size > 0, plotted.stdout

    # the same spec on the local backend trains the same losses
    assert node_losses == pytest.approx(reference.losses(), rel=1e-6, abs=1e-7)


def latest_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_elastic_job_resumes_from_the_latest_checkpoint_after_a_worker_container_is_killed(
        session: NodeSession, local_reference: Any) -> None:
    name = "elastic-node"
    job = session.job_file("tiny-gpt-elastic", name, args=["--model", "tiny", "--steps", "16", "--log-every", "2"],
                           checkpoint={"every_steps": 4, "keep": 3})
    # an uninterrupted run of the same job, training while the pods start
    reference = local_reference("tiny-gpt-elastic", "elastic-ref", "nodes=3",
                                "args=[--model, tiny, --steps, '16', --log-every, '2']", "checkpoint.every_steps=4")
    submit = session.orch_background("submit", str(job), "--cluster", "kubernetes", "--follow")
    job_id = session.created_job()
    run_dir = session.run_dir(name)
    session.node.wait_for(lambda: latest_step(run_dir) >= 6, 900, "step 6")
    session.node.kill_container(session.namespace, f"{name}-worker-2")
    killed_at = latest_step(run_dir)

    submitted, _ = submit.communicate(timeout=900)
    assert submit.returncode == 0 and "SUCCEEDED" in submitted, submitted
    # one restart of the job: the killed container's, which made the other agents restart their workers
    status = session.orch("status", job_id).stdout
    assert "SUCCEEDED" in status and "restarts 1 " in status.splitlines()[0] + " ", status
    assert "node worker-2: " in status and "container restarted 1" in status, status

    # the killed container came back; every agent resumed from the latest complete checkpoint
    log_text = session.orch("logs", job_id).stdout
    assert "resum" in log_text.lower(), log_text[-3000:]
    resumed = losses(run_dir)
    assert max(resumed) == 16 and killed_at >= 6
    assert (session.checkpoints(name) / "latest").is_file()

    # the uninterrupted run gives the same losses after the checkpoint it resumed from
    after, uninterrupted = {s: v for s, v in resumed.items() if s > 12}, reference.losses()
    assert after == pytest.approx({s: uninterrupted[s] for s in after}, rel=1e-5, abs=1e-6)


# A program that reports nothing to orch (no status, no metrics): rank 1 exits once, torchrun restarts
# the workers inside their pods, and only torchrun's record on the run volume shows it.
EXIT_ONCE = """\
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
marker = os.path.join(os.environ["ORCH_CHECKPOINT_DIR"], "rank-1-exited")
if dist.get_rank() == 1 and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(3)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_silent_programs_rank_exiting_once_shows_one_restart(session: NodeSession) -> None:
    name = "silent-node"
    programs = session.shared / "programs"
    programs.mkdir(parents=True, exist_ok=True)
    (programs / "exit_once.py").write_text(EXIT_ONCE)
    job = session.job_file("tiny-gpt-elastic", name, program="/programs/exit_once.py", args=[], nodes="1:2",
                           max_restarts=2)
    spec = yaml.safe_load(job.read_text())
    spec["kubernetes"]["volume_mounts"] = [{"name": "shared", "mountPath": "/programs", "subPath": "programs",
                                            "readOnly": True}]
    job.write_text(yaml.safe_dump(spec, sort_keys=False))

    submitted = session.orch("submit", str(job), "--cluster", "kubernetes", "--follow", timeout=600).stdout
    assert "SUCCEEDED" in submitted, submitted
    assert (session.checkpoints(name) / "rank-1-exited").exists()
    job_id = session.job_ids()[0]
    status = session.orch("status", job_id).stdout
    assert "restarts 1 " in status.splitlines()[0] + " ", status
    assert "workers restarted 1 by torchrun" in status and "container restarted" not in status, status


def test_cancel_leaves_no_pod_and_no_service(session: NodeSession) -> None:
    job = session.job_file("tiny-gpt-zero2", "cancel-node", args=["--model", "tiny", "--steps", "100000"])
    session.orch("submit", str(job), "--cluster", "kubernetes")
    job_id = session.job_ids()[0]
    node = session.node
    node.wait_for(lambda: len(node.pods(session.namespace, "cancel-node")) == 2
                  and len(node.services(session.namespace, "cancel-node")) == 2, 300, "2 pods and 2 Services")
    session.orch("cancel", job_id)
    node.wait_for(lambda: not node.pods(session.namespace, "cancel-node")
                  and not node.services(session.namespace, "cancel-node"), 180, "no pod and no Service left")
    assert "CANCELLED" in session.orch("status", job_id).stdout


def test_helm_install_of_the_chart_trains_to_succeeded(session: NodeSession) -> None:
    try:
        import helm_python
    except ImportError:
        pytest.skip("installing the chart is tested through helm-python-sdk (pip install helm-python-sdk)")
    from orchestrator.backends.kubernetes.manifest import chart_values
    from orchestrator.spec import load_spec

    values = chart_values(load_spec(session.job_file("tiny-gpt-zero2", "zero2-helm")))
    with helm_python.Config(kubeconfig_path=str(session.kubeconfig), namespace=session.namespace) as cfg:
        release = cfg.install(str(REPO / "charts" / "orch-job"), "zero2", values, timeout=120)
        assert release["status"] == "deployed"

        def finished() -> str | None:
            job = session.node.custom.get_namespaced_custom_object("kubeflow.org", "v1", session.namespace,
                                                                   "pytorchjobs", "zero2-helm")
            done = [c["type"] for c in job.get("status", {}).get("conditions", [])
                    if c["status"] == "True" and c["type"] in ("Succeeded", "Failed")]
            return done[0] if done else None

        assert session.node.wait_for(finished, 1200, "the Helm release's job to finish", interval=2) == "Succeeded"
        assert max(losses(session.run_dir("zero2-helm"))) == 60
        cfg.uninstall("zero2", timeout=120)
