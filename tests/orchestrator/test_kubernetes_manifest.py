"""The PyTorchJob manifest before it reaches a cluster: the packaged strict CRD schema, the training
operator's webhook rules, the ConfigMap beside the job, and clear errors for what a user wrote.
No API server is needed here (the `kubernetes` tier is in test_kubernetes_backend.py)."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from orchestrator.backends.kubernetes.crd_schema import PACKAGED_SCHEMA, compact_schema_text
from orchestrator.backends.kubernetes.manifest import chart_values, config_map
from orchestrator.backends.kubernetes.render import render as render_manifest
from orchestrator.backends.kubernetes.validate import check_job, metadata_problems, operator_rules
from orchestrator.errors import UserError
from orchestrator.spec import load_spec, spec_from_dict
from tests.shared_env import REPO, pytorchjob_crd_path

EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.yaml"))


def _job(example: str = "gpt-1b-gpu") -> dict:
    return yaml.safe_load(render_manifest(load_spec(REPO / "examples" / f"{example}.yaml")).text)


def test_packaged_schema_is_what_the_crd_generates() -> None:
    """Users do not have the CRD file: orch ships a compact copy, regenerated from the CRD with
    `python -m orchestrator.backends.kubernetes.crd_schema CRD.yaml > orchestrator/backends/kubernetes/pytorchjob_v1.schema.json`."""
    crd = yaml.safe_load(pytorchjob_crd_path().read_text())
    assert PACKAGED_SCHEMA.read_text() == compact_schema_text(crd), \
        "the CRD changed: regenerate orchestrator/backends/kubernetes/pytorchjob_v1.schema.json (command in crd_schema.py)"
    schema = json.loads(PACKAGED_SCHEMA.read_text())
    assert "status" not in schema["properties"] and "description" not in json.dumps(schema)[:2000]
    assert schema["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_passes_the_schema_and_the_operator_rules(example: str) -> None:
    job = _job(example)
    check_job(job, metadata=True)  # raises on any problem
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500, "protocol": "TCP"}]
        volumes = {v["name"]: v for v in replica["template"]["spec"]["volumes"]}
        assert volumes["orch-config"]["configMap"]["name"] == f"{job['metadata']['name']}-orch"


def _mutated(change) -> list[str]:
    job = copy.deepcopy(_job())
    change(job)
    return operator_rules(job)


MASTER = ("spec", "pytorchReplicaSpecs", "Master")


def _at(job: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        job = job[key]
    return job


@pytest.mark.parametrize("change,expected", [
    (lambda j: _at(j, MASTER).update(replicas=2), "Master.replicas: must be 1"),
    (lambda j: _at(j, MASTER).pop("replicas"), "Master.replicas: must be 1"),
    (lambda j: _at(j, MASTER)["template"]["spec"]["containers"][0].update(name="trainer"),
     "a container named 'pytorch' is required"),
    (lambda j: _at(j, MASTER)["template"]["spec"]["containers"].append({"name": "sidecar"}),
     "containers[1].image: is required"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]),
     "replica type must be Master or Worker"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0), "Worker.replicas: must be at least 1"),
    (lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8}), "must not be used with spec.nprocPerNode"),
    (lambda j: (j["spec"].update(elasticPolicy={"minReplicas": 1}), j["spec"]["pytorchReplicaSpecs"].pop("Worker")),
     "Worker: must be configured if elasticPolicy is used"),
    (lambda j: j["metadata"].update(name="gpt.1b"), "must be a DNS-1035 label"),
    (lambda j: j["spec"]["runPolicy"].update(managedBy="me"), "runPolicy.managedBy: 'me' is not one of"),
])
def test_operator_webhook_rules(change, expected: str) -> None:
    problems = _mutated(change)
    assert any(expected in p for p in problems), problems


def test_a_valid_job_breaks_no_operator_rule() -> None:
    assert operator_rules(_job()) == [] and operator_rules(_job("tiny-gpt-elastic")) == []


def _spec(**kubernetes) -> dict:
    return {"name": "k8s-errors", "nodes": 2, "ds_config": {"train_batch_size": 8},
            "kubernetes": {"image": "img", "checkpoint_pvc": "shared", **kubernetes}}


def test_a_misspelled_toleration_field_names_the_spec_key() -> None:
    spec = spec_from_dict(_spec(tolerations=[{"key": "gpu", "operater": "Exists"}]))
    with pytest.raises(UserError) as err:
        render_manifest(spec)
    text = str(err.value)
    assert "tolerations[0]" in text and "'operater' was unexpected" in text and "kubernetes.tolerations" in text


def test_a_resource_quantity_that_is_not_one_names_the_spec_key() -> None:
    spec = spec_from_dict(_spec(resources={"limits": {"memory": "lots"}}))
    with pytest.raises(UserError, match=r"resources.limits.memory: 'lots' does not match.*kubernetes.resources"):
        render_manifest(spec)


@pytest.mark.parametrize("labels,bad", [({"team": "ml research"}, "metadata.labels.team"),
                                        ({"team": "x" * 64}, "metadata.labels.team"),
                                        ({"a/b/c": "x"}, "key 'a/b/c'"),
                                        ({"-team": "x"}, "key '-team'")])
def test_labels_kubernetes_refuses_are_caught_before_submitting(labels: dict, bad: str) -> None:
    job = _job()
    job["metadata"]["labels"].update(labels)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        replica["template"]["metadata"]["labels"].update(labels)
    problems = metadata_problems(job)
    assert any(bad in p and "kubernetes.labels" in p for p in problems), problems
    with pytest.raises(UserError, match="would be refused by the cluster"):
        check_job(job, metadata=True)


def test_the_configmap_carries_the_ds_config_and_the_job_spec() -> None:
    spec = load_spec(REPO / "examples" / "gpt-1b-gpu.yaml")
    rendered = render_manifest(spec)
    cmap = config_map(spec, rendered.files, namespace="training", job_id="gpt-1b-x")
    assert cmap["metadata"] == {"name": "gpt-1b-orch", "namespace": "training",
                                "labels": {"app.kubernetes.io/managed-by": "orch", "orch.dev/job": "gpt-1b"},
                                "annotations": {"orch.dev/job-id": "gpt-1b-x"}}
    ds_file = json.loads(spec.ds_config_path().read_text())
    assert json.loads(cmap["data"]["ds_config.json"]) == ds_file
    job = json.loads(cmap["data"]["job.json"])
    assert job == chart_values(spec)
    assert job["ds_config"] == ds_file and job["nodes"] == 4 and "slurm" not in job
    assert job["kubernetes"]["checkpoint_pvc"] == "gpt-1b-checkpoints"


def test_user_env_follows_orchs_variables_sorted_and_may_replace_them() -> None:
    spec = spec_from_dict({"name": "env-order", "env": {"ZED": "1", "ALPHA": "2", "ORCH_RUN_DIR": "/mine"},
                           "kubernetes": {"image": "img"}})
    job = yaml.safe_load(render_manifest(spec).text)
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names == ["PYTHONUNBUFFERED", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "ORCH_JOB_NAME", "ORCH_CHECKPOINT_DIR", "ORCH_CHECKPOINT_EVERY",
                     "ORCH_CHECKPOINT_KEEP", "ALPHA", "ORCH_RUN_DIR", "ZED", "ORCH_POD_IP", "ORCH_POD_NAME"]
    assert {e["name"]: e.get("value") for e in env}["ORCH_RUN_DIR"] == "/mine"
    assert "CUDA_VISIBLE_DEVICES" not in names  # a CPU job just requests no GPU on Kubernetes


def _mutations() -> list[tuple[str, dict]]:
    """Valid jobs and jobs broken in each way the schema can object to."""
    out = [(f"{ex} as rendered", _job(ex)) for ex in EXAMPLES]

    def broken(label: str, change) -> None:
        job = copy.deepcopy(_job())
        change(job)
        out.append((label, job))

    pod = lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]  # noqa: E731
    broken("unknown field", lambda j: pod(j).update(nodeSelecter={"a": "b"}))
    broken("two unknown fields", lambda j: j["spec"]["runPolicy"].update(a=1, b=2))
    broken("wrong type", lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="3"))
    broken("missing required", lambda j: pod(j)["containers"][0].pop("name"))
    broken("pattern", lambda j: pod(j)["containers"][0]["resources"]["limits"].update(memory="lots"))
    broken("int-or-string given a list", lambda j: pod(j)["volumes"][0]["emptyDir"].update(sizeLimit=[1]))
    broken("item of wrong type", lambda j: pod(j)["containers"][0]["command"].append(7))
    broken("map value of wrong type", lambda j: pod(j).update(nodeSelector={"a": 1}))
    broken("boolean is not an integer", lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=True))
    return out


@pytest.mark.parametrize("label,job", _mutations(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_built_in_schema_check_agrees_with_jsonschema(label: str, job: dict) -> None:
    """orch checks the schema without the jsonschema package (it would slow `orch render` down);
    on every case here both must find the same places wrong."""
    import jsonschema

    from orchestrator.backends.kubernetes.crd_schema import pytorchjob_schema, schema_errors

    ours = sorted({tuple(map(str, p)) for p, _ in schema_errors(job, pytorchjob_schema())})
    theirs = sorted({tuple(map(str, e.absolute_path))
                     for e in jsonschema.Draft7Validator(pytorchjob_schema()).iter_errors(job)})
    assert ours == theirs
    assert bool(ours) == ("rendered" not in label)


def test_the_schema_check_refuses_keywords_it_does_not_implement() -> None:
    from orchestrator.backends.kubernetes.crd_schema import schema_errors

    with pytest.raises(ValueError, match="oneOf"):
        schema_errors({}, {"type": "object", "oneOf": [{}]})


def test_dryrun_shows_the_manifest_and_the_configmap_files_without_a_cluster(tmp_path, monkeypatch) -> None:
    from orchestrator.backends import get_backend

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    spec = load_spec(REPO / "examples" / "tiny-gpt-elastic.yaml")
    rendered = get_backend("kubernetes").dryrun(spec)
    assert rendered.kind == "manifest" and rendered.text == render_manifest(spec).text
    assert set(rendered.files) == {"ds_config.json", "job.json"}
    assert json.loads(rendered.files["job.json"])["nodes"] == "1:3"


@pytest.mark.parametrize("example", ["tiny-gpt-zero2", "tiny-gpt-elastic"])
def test_each_pod_keeps_its_torchrun_attempts_on_the_run_volume_under_a_name_no_restart_repeats(example: str) -> None:
    """torchrun's --log-dir is the pod's own directory on the run volume (where orch counts worker
    restarts of any program); its rendezvous name is the pod IP plus a PID that a restarted
    container does not repeat (the pod's shared PID namespace)."""
    job = _job(example)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["shareProcessNamespace"] is True
        assert "--local-addr=$(ORCH_POD_IP)" in container["command"]
        assert "--log-dir=/orch/run/torchelastic/$(ORCH_POD_NAME)" in container["command"]
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
        assert fields == {"ORCH_POD_IP": "status.podIP", "ORCH_POD_NAME": "metadata.name"}
        assert {"mountPath": "/orch/run"}.items() <= next(
            m for m in container["volumeMounts"] if m["mountPath"] == "/orch/run").items()
