"""The PyTorchJob operator double (tests/clusters/pytorchjob_operator.py) gives orch's rendered jobs
the environment, names and conditions that kubeflow/training-operator release-1.9 gives them
(values below as its envvar.go/master.go/elastic.go, pytorch_defaults.go and util/status.go define
them). The node tier relies on the double; these checks need no cluster."""
from __future__ import annotations

import yaml

from orchestrator.backends.kubernetes.render import render
from orchestrator.spec import load_spec
from tests.clusters.pytorchjob_operator import pod_env, set_defaults, update_condition
from tests.shared_env import REPO


def job_of(example: str, **meta: str) -> dict:
    job = yaml.safe_load(render(load_spec(REPO / "examples" / f"{example}.yaml")).text)
    job["metadata"].update(namespace="team", uid="u-1", **meta)
    return set_defaults(job)


def env_of(job: dict, rtype: str, index: int) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod_env(job, rtype, index)}


def test_a_static_job_gets_master_address_world_size_and_node_ranks() -> None:
    job = job_of("tiny-gpt-zero2")  # Master + 1 Worker, 2 processes per node
    master, worker = env_of(job, "master", 0), env_of(job, "worker", 0)
    assert master == {"PYTHONUNBUFFERED": "1", "MASTER_PORT": "29500", "PET_MASTER_PORT": "29500",
                      "MASTER_ADDR": "tiny-gpt-zero2-master-0", "PET_MASTER_ADDR": "tiny-gpt-zero2-master-0",
                      "WORLD_SIZE": "4", "RANK": "0", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2",
                      "PET_NNODES": "2"}
    assert (worker["RANK"], worker["PET_NODE_RANK"], worker["MASTER_ADDR"]) == ("1", "1", "tiny-gpt-zero2-master-0")


def test_an_elastic_job_gets_the_rendezvous_of_worker_0_and_a_node_range() -> None:
    job = job_of("tiny-gpt-elastic")  # Worker-only, nodes 1:3
    env = env_of(job, "worker", 2)
    assert "MASTER_ADDR" not in env and "RANK" not in env  # no Master replica: the operator sets neither
    assert env["PET_RDZV_ENDPOINT"] == "tiny-gpt-elastic-worker-0:29500"
    assert (env["PET_RDZV_BACKEND"], env["PET_NNODES"], env["PET_MAX_RESTARTS"]) == ("c10d", "1:3", "5")
    assert env["PET_RDZV_ID"] == job["spec"]["elasticPolicy"]["rdzvId"]


def test_defaults_fill_what_the_operator_defaults() -> None:
    job = set_defaults({"metadata": {"name": "j"}, "spec": {"pytorchReplicaSpecs": {"worker": {
        "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}}}}})
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert (worker["replicas"], worker["restartPolicy"]) == (1, "OnFailure")
    assert worker["template"]["spec"]["containers"][0]["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
    assert (job["spec"]["runPolicy"]["cleanPodPolicy"], job["spec"]["nprocPerNode"]) == ("None", "auto")


def test_conditions_follow_the_operators_rules() -> None:
    status: dict = {}
    update_condition(status, "Created", "True", "PyTorchJobCreated", "created")
    update_condition(status, "Running", "True", "PyTorchJobRunning", "running")
    update_condition(status, "Restarting", "True", "PyTorchJobRestarting", "restarting")
    assert [c["type"] for c in status["conditions"]] == ["Created", "Restarting"]  # they replace each other
    update_condition(status, "Running", "True", "PyTorchJobRunning", "running")
    update_condition(status, "Succeeded", "True", "PyTorchJobSucceeded", "done")
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Created": "True", "Running": "False",
                                                                        "Succeeded": "True"}
    failed: dict = {}
    update_condition(failed, "Failed", "True", "PyTorchJobFailed", "failed")
    update_condition(failed, "Running", "True", "PyTorchJobRunning", "running")
    assert [c["type"] for c in failed["conditions"]] == ["Failed"]  # nothing changes after Failed
