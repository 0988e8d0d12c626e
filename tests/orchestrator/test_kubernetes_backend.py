"""`orch submit/status/cancel --cluster kubernetes` against a real kube-apiserver with the Kubeflow
PyTorchJob CRD. No operator or kubelet runs: the tests write the status subresource exactly as the
training operator does (its conditions and replicaStatuses) and check what orch makes of it."""
from __future__ import annotations

import json
import socket

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import jobs
from orchestrator.types import JobRef, JobState, Submission
from orchestrator.backends.kubernetes.backend import KubernetesBackend
from orchestrator.cli import app
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from tests.shared_env import REPO

pytestmark = pytest.mark.kubernetes
runner = CliRunner()
EXAMPLES = REPO / "examples"
T0 = "2026-11-25T10:00:00Z"


def orch(*args: str):
    return runner.invoke(app, list(args))


def submit(example: str = "gpt-1b-gpu", *sets: str) -> str:
    """`orch submit` as a user types it; returns the job id."""
    argv = ["submit", str(EXAMPLES / f"{example}.yaml"), "--cluster", "kubernetes"]
    for s in ("kubernetes.namespace=null", *sets):  # the example's namespace would override the context's
        argv += ["--set", s]
    result = orch(*argv)
    assert result.exit_code == 0, result.output
    (record,) = [r for r in Registry().list(include_finished=True) if r.job_id in result.output]
    return record.job_id


def cond(ctype: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    """A condition as the operator writes it (it always sets reason and message)."""
    return {"type": ctype, "status": status, "reason": reason or f"PyTorchJob{ctype}",
            "message": message or f"PyTorchJob is {ctype.lower()}.", "lastUpdateTime": T0, "lastTransitionTime": T0}


def test_submit_creates_the_pytorchjob_and_its_configmap_in_the_context_namespace(k8s) -> None:
    job_id = submit("gpt-1b-gpu")
    job = k8s.pytorchjob("gpt-1b")
    meta = job["metadata"]
    assert meta["namespace"] == k8s.namespace  # the kubeconfig context's namespace
    assert meta["annotations"]["orch.dev/job-id"] == job_id
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "orch", "orch.dev/job": "gpt-1b"}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "ghcr.io/orch-dev/orch:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["command"][:5] == ["python", "-m", "torch.distributed.run", "--nproc-per-node=8",
                                        "--max-restarts=3"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # the server adds the CRD's defaults (suspend: false) to what orch sent
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "ttlSecondsAfterFinished": 86400, "suspend": False}

    cmap = k8s.core.read_namespaced_config_map("gpt-1b-orch", k8s.namespace)
    spec = load_spec(EXAMPLES / "gpt-1b-gpu.yaml")
    assert json.loads(cmap.data["ds_config.json"]) == json.loads(spec.ds_config_path().read_text())
    assert json.loads(cmap.data["job.json"])["name"] == "gpt-1b"
    (owner,) = cmap.metadata.owner_references  # deleting the job deletes the ConfigMap (GC)
    assert (owner.kind, owner.api_version, owner.name, owner.uid) == ("PyTorchJob", "kubeflow.org/v1", "gpt-1b",
                                                                      meta["uid"])
    assert owner.block_owner_deletion is True
    record = Registry().get(job_id)
    assert record.native_id == f"{k8s.namespace}/gpt-1b" and record.state is JobState.PENDING
    sent = yaml.safe_load((REPO / record.run_dir / "pytorchjob.yaml").read_text())
    assert sent["metadata"]["name"] == "gpt-1b"  # what was sent is kept in the run dir


def test_elastic_jobs_get_a_rendezvous_id_unique_to_the_submission(k8s) -> None:
    job_id = submit("tiny-gpt-elastic")
    policy = k8s.pytorchjob("tiny-gpt-elastic")["spec"]["elasticPolicy"]
    assert policy["rdzvId"] == job_id  # the name plus this submission's time and random suffix
    assert (policy["minReplicas"], policy["maxReplicas"], policy["rdzvBackend"], policy["maxRestarts"]) == \
        (1, 3, "c10d", 5)


def test_the_spec_namespace_overrides_the_context_namespace(k8s) -> None:
    other = f"{k8s.namespace}-b"
    k8s.core.create_namespace({"metadata": {"name": other}})
    try:
        result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes",
                      "--set", f"kubernetes.namespace={other}")
        assert result.exit_code == 0, result.output
        assert f"native id {other}/tiny-gpt-zero2" in result.output
        assert k8s.custom.get_namespaced_custom_object("kubeflow.org", "v1", other, "pytorchjobs",
                                                       "tiny-gpt-zero2")["metadata"]["namespace"] == other
    finally:
        k8s.custom.delete_namespaced_custom_object("kubeflow.org", "v1", other, "pytorchjobs", "tiny-gpt-zero2")
        k8s.core.delete_collection_namespaced_config_map(other)
        k8s.core.delete_namespace(other)


# The operator's condition sequence (pkg/util/status.go): Running and Restarting replace each
# other; Succeeded/Failed set Running to False; the last condition is the job's state.
LIFECYCLE = [
    ({"conditions": [cond("Created", message="PyTorchJob gpt-1b is created.")]}, JobState.PENDING, "is created"),
    ({"conditions": [cond("Created"), cond("Running", message="PyTorchJob gpt-1b is running.")],
      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 3}}}, JobState.RUNNING,
     "Master: 1 active; Worker: 3 active"),
    ({"conditions": [cond("Created"), cond("Restarting", message="PyTorchJob gpt-1b is restarting because 1 "
                                                                  "Worker replica(s) failed.")],
      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2, "failed": 1}}}, JobState.RESTARTING,
     "1 Worker replica(s) failed"),
    ({"conditions": [cond("Created"), cond("Running")],
      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 3}}}, JobState.RUNNING,
     "is running. (Master: 1 active; Worker: 3 active)"),
    ({"conditions": [cond("Created"), cond("Running", "False"),
                     cond("Succeeded", message="PyTorchJob gpt-1b is successfully completed.")],
      "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 3}},
      "completionTime": T0}, JobState.SUCCEEDED, "successfully completed"),
]


def test_status_follows_the_conditions_the_operator_writes(k8s) -> None:
    job_id = submit("gpt-1b-gpu")
    for status, state, detail in LIFECYCLE:
        k8s.set_status("gpt-1b", status)
        result = orch("status", job_id)
        assert result.exit_code == 0, result.output
        assert f"kubernetes  {state.value}" in result.output and detail in result.output, result.output
        assert Registry().get(job_id).state is state
    history = [e.state for e in Registry().history(job_id)]
    assert history[-5:] == [s for _, s, _ in LIFECYCLE]


@pytest.mark.parametrize("conditions,state,detail", [
    ([cond("Created"), cond("Running", "False"),
      cond("Failed", message="PyTorchJob f is failed because 1 Worker replica(s) failed.")],
     JobState.FAILED, "1 Worker replica(s) failed"),
    ([cond("Created"), cond("Failed", reason="PyTorchJobFailed",
                            message="Job f has failed because it was active longer than specified deadline")],
     JobState.TIMEOUT, "longer than specified deadline"),
    ([cond("Created"), cond("Suspended", reason="PyTorchJobSuspended", message="PyTorchJob f is suspended.")],
     JobState.PENDING, "suspended: PyTorchJob f is suspended."),
])
def test_final_and_suspended_states(k8s, conditions, state: JobState, detail: str) -> None:
    job_id = submit("tiny-gpt-zero2")
    k8s.set_status("tiny-gpt-zero2", {"conditions": conditions})
    record, st = jobs.status(job_id)
    assert (st.state, record.state) == (state, state)
    assert detail in st.detail


def test_status_shows_each_pod_and_its_restarts(k8s) -> None:
    job_id = submit("tiny-gpt-zero2")
    uid = k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["uid"]
    for rtype, restarts in (("master", 0), ("worker", 2)):
        name = f"tiny-gpt-zero2-{rtype}-0"
        k8s.core.create_namespaced_pod(k8s.namespace, operator_pod("tiny-gpt-zero2", uid, rtype, 0))
        k8s.core.patch_namespaced_pod_status(name, k8s.namespace, {"status": {
            "phase": "Running", "containerStatuses": [{
                "name": "pytorch", "image": "img", "imageID": "", "ready": True, "restartCount": restarts,
                "state": {"running": {"startedAt": T0}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": T0, "finishedAt": T0}}
                if restarts else {}}]}})
    k8s.set_status("tiny-gpt-zero2", {"conditions": [cond("Created"), cond("Running")],
                                      "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}}})
    result = orch("status", job_id)
    assert "RUNNING  restarts 2" in result.output, result.output
    assert "node master-0: Running\n" in result.output, result.output
    assert "node worker-0: Running, restarts 2: container restarted 2 (last exit 137 (SIGKILL))" in result.output
    metrics = orch("status", job_id, "--metrics")
    assert metrics.exit_code == 0 and f"orch logs {job_id}" in metrics.output, metrics.output
    # no kubelet here: the run-directory reader pod never runs, and status says so instead of hanging
    assert "reader pod" in metrics.output and "did not finish in 1 s" in metrics.output, metrics.output


def operator_pod(job: str, uid: str, rtype: str, index: int, *, node: str | None = None) -> dict:
    """A pod as the training operator creates it: name, labels and controller owner reference."""
    labels = {"training.kubeflow.org/operator-name": "pytorchjob-controller",
              "training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": rtype,
              "training.kubeflow.org/replica-index": str(index)}
    if rtype == "master":
        labels["training.kubeflow.org/job-role"] = "master"
    spec: dict = {"containers": [{"name": "pytorch", "image": "img"}], "restartPolicy": "OnFailure"}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": f"{job}-{rtype}-{index}", "labels": labels,
                         "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": job,
                                              "uid": uid, "controller": True, "blockOwnerDeletion": True}]},
            "spec": spec}


def test_cancel_deletes_the_job_with_foreground_propagation_and_its_configmap(k8s) -> None:
    job_id = submit("tiny-gpt-zero2")
    result = orch("cancel", job_id)
    assert result.exit_code == 0 and "CANCELLED" in result.output, result.output
    job = k8s.pytorchjob("tiny-gpt-zero2")
    # Foreground: the job stays until the garbage collector has removed its pods (this test
    # server has no collector, so it stays); orch shows it as CANCELLED meanwhile.
    assert job["metadata"]["deletionTimestamp"] and "foregroundDeletion" in job["metadata"]["finalizers"]
    assert [c.metadata.name for c in k8s.core.list_namespaced_config_map(k8s.namespace).items
            if c.metadata.name.endswith("-orch")] == []
    assert Registry().get(job_id).state is JobState.CANCELLED
    # submitting the same name again says the old job is still stopping
    again = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes")
    assert again.exit_code == 2 and "is still being deleted" in again.output, again.output


def test_cancel_with_background_propagation_removes_the_job_at_once(k8s) -> None:
    job_id = submit("tiny-gpt-zero2")
    KubernetesBackend(propagation="Background").cancel(Registry().get(job_id).ref)
    assert k8s.custom.list_namespaced_custom_object("kubeflow.org", "v1", k8s.namespace, "pytorchjobs")["items"] == []
    st = KubernetesBackend().status([Registry().get(job_id).ref])[job_id]
    assert st.state is JobState.UNKNOWN and "no longer exists" in st.detail


def test_a_name_already_taken_is_refused_and_recorded(k8s) -> None:
    first = submit("tiny-gpt-zero2")
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes")
    assert result.exit_code == 2
    assert f"PyTorchJob {k8s.namespace}/tiny-gpt-zero2 already exists" in result.output
    assert "--set name=NEW-NAME" in result.output
    failed = [r for r in Registry().list(include_finished=True) if r.job_id != first]
    assert failed[0].state is JobState.FAILED and "already exists" in failed[0].detail
    # the other job's objects are untouched, and orch will not cancel it under the wrong id
    with pytest.raises(UserError, match=f"is not job {failed[0].job_id}"):
        KubernetesBackend().cancel(JobRef(failed[0].job_id, "kubernetes", f"{k8s.namespace}/tiny-gpt-zero2",
                                          failed[0].run_dir))
    assert k8s.pytorchjob("tiny-gpt-zero2")["metadata"]["annotations"]["orch.dev/job-id"] == first


def test_a_manifest_the_server_rejects_is_reported_with_the_field(k8s) -> None:
    big = "x" * 300_000  # annotations may hold 256 KiB in all; only the API server checks that
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes",
                  "--set", f"kubernetes.annotations.notes={big}")
    assert result.exit_code == 2
    assert f"the API server rejected PyTorchJob {k8s.namespace}/tiny-gpt-zero2 as invalid" in result.output
    assert "metadata.annotations: Too long" in result.output and "hint:" in result.output
    assert k8s.core.list_namespaced_config_map(k8s.namespace).items == []


def test_labels_kubernetes_would_refuse_are_caught_before_anything_is_sent(k8s) -> None:
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes",
                  "--set", "kubernetes.labels.team=ml research")
    assert result.exit_code == 2 and "kubernetes.labels" in result.output and "labels.team" in result.output
    assert k8s.custom.list_namespaced_custom_object("kubeflow.org", "v1", k8s.namespace, "pytorchjobs")["items"] == []


def test_a_missing_namespace_is_named_with_the_fix(k8s) -> None:
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes",
                  "--set", "kubernetes.namespace=no-such-namespace")
    assert result.exit_code == 2
    assert "namespace 'no-such-namespace' does not exist" in result.output
    assert "kubectl create namespace no-such-namespace" in result.output


def test_a_user_without_rights_is_told_which_permission_is_missing(k8s, tmp_path, monkeypatch) -> None:
    """A real 403: a service account with no Role, its token from the TokenRequest API."""
    k8s.core.create_namespaced_service_account(k8s.namespace, {"metadata": {"name": "intern"}})
    token = k8s.core.create_namespaced_service_account_token(
        "intern", k8s.namespace, {"spec": {"audiences": [], "expirationSeconds": 600}}).status.token
    kc = yaml.safe_load(k8s.kubeconfig.read_text())
    kc["users"] = [{"name": "intern", "user": {"token": token}}]
    kc["contexts"][0]["context"]["user"] = "intern"
    path = tmp_path / "intern.kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    monkeypatch.setenv("KUBECONFIG", str(path))
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes")
    assert result.exit_code == 2
    assert f"not allowed to create PyTorchJob {k8s.namespace}/tiny-gpt-zero2" in result.output
    assert f"system:serviceaccount:{k8s.namespace}:intern" in result.output
    assert "pytorchjobs.kubeflow.org" in result.output  # the hint names what to grant


def test_an_unreachable_api_server_is_named(k8s, tmp_path, monkeypatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = yaml.safe_load(k8s.kubeconfig.read_text())
    kc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path = tmp_path / "down.kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    monkeypatch.setenv("KUBECONFIG", str(path))
    backend = KubernetesBackend(timeout=3)
    with pytest.raises(UserError, match=rf"cannot reach the Kubernetes API server \(context orch-test, "
                                        rf"server https://127.0.0.1:{port}\)"):
        backend.submit(load_spec(EXAMPLES / "tiny-gpt-zero2.yaml"), Submission("tiny-gpt-zero2-x", str(tmp_path)))


def test_a_foreign_configmap_of_the_same_name_is_not_overwritten(k8s) -> None:
    k8s.core.create_namespaced_config_map(k8s.namespace, {"metadata": {"name": "tiny-gpt-zero2-orch"},
                                                          "data": {"mine": "yes"}})
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes")
    assert result.exit_code == 2 and "already exists and was not made by orch" in result.output
    assert k8s.core.read_namespaced_config_map("tiny-gpt-zero2-orch", k8s.namespace).data == {"mine": "yes"}
    # the PyTorchJob, useless without its ConfigMap, was taken back
    remaining = k8s.custom.list_namespaced_custom_object("kubeflow.org", "v1", k8s.namespace, "pytorchjobs")["items"]
    assert all(j["metadata"].get("deletionTimestamp") for j in remaining)


def test_values_with_yaml_and_shell_metacharacters_reach_the_server_intact(k8s) -> None:
    nasty = ["; rm -rf /", "$(id)", "a\nb: c", "{x: 1}", "- item", "#", "'\"", "\u2028", "{{ 7*7 }}"]
    result = orch("submit", str(EXAMPLES / "tiny-gpt-zero2.yaml"), "--cluster", "kubernetes",
                  "--set", f"args={json.dumps(nasty)}", "--set", f"env.NOTE={json.dumps(' | '.join(nasty))}")
    assert result.exit_code == 0, result.output
    job = k8s.pytorchjob("tiny-gpt-zero2")
    assert set(job["spec"]) == {"nprocPerNode", "runPolicy", "pytorchReplicaSpecs"}
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["command"][-len(nasty):] == nasty
    assert {e["name"]: e.get("value") for e in container["env"]}["NOTE"] == " | ".join(nasty)
    cmap = k8s.core.read_namespaced_config_map("tiny-gpt-zero2-orch", k8s.namespace)
    assert json.loads(cmap.data["job.json"])["args"] == nasty
