"""The Kubernetes backend on a real node (tests/clusters/k8s_node.sh: kubelet + containerd, the
PyTorchJob operator double): time from `orch submit` to the first completed training step, and
from killing a worker pod's container to the first step after the resume, beside the local
backend's figures for the same jobs measured in the same run.

    sudo tests/clusters/k8s_node.sh up        # once (builds Kubernetes 1.20, ~30-60 min)
    python -m bench.k8s_backend [--quick]

The node and the image are the test tier's: the first-step figure includes scheduling, the
operator creating pods and Services, the workers' init container waiting for the master's name,
container start from the local image, rendezvous through the cluster DNS responder, and the
trainer's start-up. The pods share a hostPath volume (one node), where the run's metrics are read.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import REPO, Measurement, machine, print_table, train_records, wait_for

EXAMPLES = REPO / "examples"
SHARED_ROOT = Path(os.environ.get("ORCH_K8S_SHARED", "/var/tmp/orch-k8s-shared"))


class Session:
    """A namespace on the node, a kubeconfig pointing at it, an ORCH_HOME, a hostPath root."""

    def __init__(self, node, workdir: Path) -> None:
        self.node, self.workdir = node, workdir
        self.namespace = f"orch-bench-{secrets.token_hex(3)}"
        kc = yaml.safe_load(node.kubeconfig.read_text())
        next(c for c in kc["contexts"] if c["name"] == kc["current-context"])["context"]["namespace"] = self.namespace
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(kc))
        node.core.create_namespace({"metadata": {"name": self.namespace}})
        self.shared = SHARED_ROOT / self.namespace

    def close(self) -> None:
        self.node.core.delete_namespace(self.namespace)
        shutil.rmtree(self.shared, ignore_errors=True)

    def orch(self, *argv: str) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "ORCH_HOME": str(self.workdir / "home")}
        return subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True,
                              env=env, cwd=self.workdir, check=True, timeout=600).stdout

    def job(self, example: str, name: str, nodes: int | str, steps: int, every: int) -> Path:
        spec = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
        spec.update(name=name, nodes=nodes, args=["--model", "tiny", "--steps", str(steps), "--log-every", "1"],
                    checkpoint={"every_steps": every, "keep": 3}, ds_config=str(EXAMPLES / spec["ds_config"]))
        spec["kubernetes"] = {"image": self.node.image, "shm_size": "256Mi", "shared_volume": "shared",
                              "volumes": [{"name": "shared", "hostPath": {"path": str(self.shared),
                                                                          "type": "DirectoryOrCreate"}}]}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path


def k8s_first_step(node) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        s = Session(node, Path(tmp))
        try:
            spec = s.job("tiny-gpt-zero2", "bench-first", 2, 10, 0)
            t0 = time.time()
            s.orch("submit", str(spec), "--cluster", "kubernetes")
            run_dir = s.shared / "bench-first" / "run"
            first = wait_for(lambda: train_records(run_dir), 600, "first step on the node")[0]["time"]
            return first - t0
        finally:
            s.close()


def local_first_step() -> float:
    with tempfile.TemporaryDirectory() as home:
        spec = yaml.safe_load((EXAMPLES / "tiny-gpt-zero2.yaml").read_text())
        spec.update(args=["--model", "tiny", "--steps", "10", "--log-every", "1"],
                    ds_config=str(EXAMPLES / spec["ds_config"]))
        path = Path(home) / "job.yaml"
        path.write_text(yaml.safe_dump(spec))
        env = {**os.environ, "ORCH_HOME": home}
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(path), "--cluster", "local"],
                             capture_output=True, text=True, env=env, check=True, timeout=300).stdout
        job_id = out.split("submitted ")[1].split()[0]
        run_dir = Path(home) / "runs" / job_id
        first = wait_for(lambda: train_records(run_dir), 300, "first local step")[0]["time"]
        subprocess.run([sys.executable, "-m", "orchestrator", "cancel", job_id], env=env, capture_output=True)
        return first - t0


def k8s_recovery(node) -> float:
    """Elastic 1:3 on the node; kill worker-2's container after step 12 (checkpoint at 10): seconds
    until the first step re-done from the checkpoint is logged."""
    with tempfile.TemporaryDirectory() as tmp:
        s = Session(node, Path(tmp))
        try:
            spec = s.job("tiny-gpt-elastic", "bench-kill", "1:3", 60, 10)
            s.orch("submit", str(spec), "--cluster", "kubernetes")
            run_dir = s.shared / "bench-kill" / "run"
            wait_for(lambda: max((r["step"] for r in train_records(run_dir)), default=0) >= 12, 900, "step 12")
            last = max(r["step"] for r in train_records(run_dir))
            killed = time.time()
            node.kill_container(s.namespace, "bench-kill-worker-2")
            resumed = wait_for(lambda: [r for r in train_records(run_dir)
                                        if r["time"] > killed and r["step"] <= last], 900, "a resumed step")
            return resumed[0]["time"] - killed
        finally:
            s.close()


def local_recovery() -> float:
    from bench.local_backend import recovery_seconds

    return recovery_seconds()


def _node():
    from tests.clusters import k8s_node as nodes
    from tests.shared_env import install_pytorchjob_crd

    if not nodes.node_ready():
        raise RuntimeError(f"the test node is not running: {nodes.ENABLE}")
    node = nodes.K8sNode(nodes.NODE_DIR / "kubeconfig", nodes.IMAGE, local=True)
    install_pytorchjob_crd(node.kubeconfig)
    node.start_operator()
    return node


def run(quick: bool = False) -> list[dict]:
    rounds = 1 if quick else 3
    node = _node()
    try:
        first_k8s, first_local, rec_k8s, rec_local = [], [], [], []
        for _ in range(rounds):  # interleaved: the machine is shared and its load drifts
            first_k8s.append(k8s_first_step(node))
            first_local.append(local_first_step())
            rec_k8s.append(k8s_recovery(node))
            rec_local.append(local_recovery())
    finally:
        node.stop_operator()
    first = Measurement("submit -> first step (kubernetes node)", first_k8s)
    first_peer = Measurement("submit -> first step (local backend)", first_local)
    rec = Measurement("pod kill -> resumed step (kubernetes, elastic 1:3)", rec_k8s)
    rec_peer = Measurement("node kill -> step on survivors (local, elastic 1:3)", rec_local)
    print(f"machine: {machine()}")
    print_table("tiny GPT ZeRO-2, 2 nodes x 2 procs: submit -> first step", first, [first_peer])
    print_table("elastic 1:3, one node killed after step 12 (checkpoint every 10)", rec, [rec_peer])
    return [{"benchmark": "k8s_backend", "name": first.name, "median_s": first.median, "range_s": first.spread,
             "peer": first_peer.name, "peer_median_s": first_peer.median, "ratio": first.median / first_peer.median},
            {"benchmark": "k8s_backend", "name": rec.name, "median_s": rec.median, "range_s": rec.spread,
             "peer": rec_peer.name, "peer_median_s": rec_peer.median, "ratio": rec.median / rec_peer.median}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=1))
