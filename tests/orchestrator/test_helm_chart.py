"""charts/orch-job: the Helm chart creates the same PyTorchJob and ConfigMap as `orch render
--cluster kubernetes` / `orch submit`, from values derived from the same job spec.

Rendering, linting and installing use real Helm: the helm-python-sdk package (Helm's Go SDK,
loaded in-process; no binary needed) or a helm binary named by ORCH_HELM. Without either, those
tests skip saying so; the chart's files are still checked with ordinary parsers.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from orchestrator.backends.kubernetes.manifest import chart_values, config_map
from orchestrator.backends.kubernetes.render import render as render_manifest
from orchestrator.spec import JobSpec, load_spec, spec_from_dict
from tests.shared_env import REPO
from tests.orchestrator.test_injection import nasty_text  # the injection tests' metacharacters (UTF-8-writable text)

CHART = REPO / "charts" / "orch-job"
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.yaml"))
NO_HELM = ("no Helm to render the chart with: pip install helm-python-sdk (Helm's Go SDK in-process), "
           "or set ORCH_HELM=/path/to/helm")


class Helm:
    """The few Helm actions the tests need, through the SDK or a helm binary."""

    def __init__(self) -> None:
        self.binary = os.environ.get("ORCH_HELM")
        if self.binary:
            if not Path(self.binary).is_file():
                pytest.skip(f"ORCH_HELM={self.binary} is not a file; {NO_HELM}")
            self.sdk = None
        else:
            try:
                import helm_python
            except ImportError:
                pytest.skip(NO_HELM)
            self.sdk = helm_python

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=120)

    def render(self, values: dict[str, Any], *, release: str = "orch-test", namespace: str = "default",
               tmp: Path | None = None) -> dict[str, dict]:
        """{kind: object} of what the chart renders with ``values`` (NOTES.txt left out)."""
        if self.sdk is not None:
            with self.sdk.Chart.load(str(CHART)) as chart:
                files = chart.render(values, name=release, namespace=namespace)
            texts = [text for path, text in files.items() if path.endswith(".yaml")]
        else:
            assert tmp is not None
            vf = tmp / "values.json"
            vf.write_text(json.dumps(values))
            out = self._run("template", release, str(CHART), "-f", str(vf), "--namespace", namespace)
            assert out.returncode == 0, out.stderr
            texts = [out.stdout]
        docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
        return {d["kind"]: d for d in docs}

    def lint_strict(self) -> list[str]:
        if self.sdk is not None:
            report = self.sdk.lint(str(CHART), strict=True)
            return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        out = self._run("lint", "--strict", str(CHART))
        return [] if out.returncode == 0 else [out.stdout + out.stderr]


@pytest.fixture(scope="module")
def helm() -> Helm:
    return Helm()


# -- the chart's files, with ordinary parsers (no Helm needed) ------------------------------------

def test_chart_files_are_well_formed() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "orch-job" and meta["type"] == "application"
    assert all(part.isdigit() for part in meta["version"].split("."))
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    for name in ("pytorchjob.yaml", "configmap.yaml", "pvc.yaml", "NOTES.txt", "_helpers.tpl"):
        assert (CHART / "templates" / name).is_file(), name


def test_values_keys_mirror_the_job_spec() -> None:
    """The chart's values are the job spec's keys (less slurm/local/ssh), plus the chart-only pvc."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    spec_keys = {n for n, f in JobSpec.model_fields.items() if not f.exclude} - {"slurm", "local", "ssh"}
    assert set(schema) == set(defaults) == spec_keys | {"pvc"}
    for section in ("checkpoint", "kubernetes"):
        model = JobSpec.model_fields[section].annotation
        assert set(schema[section]["properties"]) == set(defaults[section]) == set(model.model_fields), section


@pytest.mark.parametrize("example", EXAMPLES)
def test_values_derived_from_every_example_satisfy_the_chart_schema(example: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(chart_values(load_spec(REPO / "examples" / f"{example}.yaml")), schema)


# -- rendered by Helm, compared with orch's own rendering ------------------------------------------

def normalised(obj: dict) -> dict:
    """What may differ between the chart and orch by design: Helm labels objects managed-by Helm,
    and the elastic rendezvous id is unique per release revision / per orch submission."""
    obj = json.loads(json.dumps(obj))
    labelled = [obj["metadata"]] + [r["template"]["metadata"] for r in
                                    obj.get("spec", {}).get("pytorchReplicaSpecs", {}).values()]
    for meta in labelled:
        if meta.get("labels", {}).get("app.kubernetes.io/managed-by") in ("Helm", "orch"):
            meta["labels"]["app.kubernetes.io/managed-by"] = "<manager>"
    if "elasticPolicy" in obj.get("spec", {}):
        obj["spec"]["elasticPolicy"]["rdzvId"] = "<unique>"
    if obj["kind"] == "ConfigMap":
        obj["data"] = {k: _without_nulls(json.loads(v)) for k, v in obj["data"].items()}
    return obj


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


RICH_SPEC = {  # every option the chart templates handle
    "name": "rich-job", "nodes": 3, "procs_per_node": 4, "gpus_per_node": 2, "program": "train/my_script.py",
    "args": ["--lr", "3e-4", "--note", "a: b"], "checkpoint": {"dir": "/ckpt", "every_steps": 7, "keep": 2,
                                                               "async_save": True},
    "max_restarts": 0, "rdzv_port": 23456, "python": "/opt/conda/bin/python",
    "env": {"ZZ": "last", "AA": "first", "ORCH_RUN_DIR": "/mine", "CUDA_VISIBLE_DEVICES": "0,1"},
    "ds_config": {"train_batch_size": 24, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "eps": 1e-8}}},
    "kubernetes": {"namespace": "research", "image": "registry.local/orch:dev", "image_pull_policy": "Always",
                   "service_account": "trainer", "checkpoint_pvc": "ckpts", "shm_size": "32Gi",
                   "resources": {"requests": {"cpu": "8", "nvidia.com/gpu": 1}, "limits": {"memory": "64Gi"}},
                   "node_selector": {"pool": "a100"},
                   "tolerations": [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule",
                                    "tolerationSeconds": 3600}],
                   "labels": {"team": "nlp"}, "annotations": {"owner": "me@example.com"},
                   "clean_pod_policy": "Running", "backoff_limit": 0, "ttl_seconds_after_finished": 600,
                   "active_deadline_seconds": 86400},
}
NO_DS_CONFIG = {"name": "bare", "nodes": "2:4", "kubernetes": {
    "image": "img", "volumes": [{"name": "scratch", "nfs": {"server": "nfs.local", "path": "/export/orch"}}],
    "shared_volume": "scratch", "volume_mounts": [{"name": "scratch", "mountPath": "/scratch", "readOnly": True}]}}


def _specs() -> list[tuple[str, JobSpec]]:
    out = [(ex, load_spec(REPO / "examples" / f"{ex}.yaml")) for ex in EXAMPLES]
    return out + [("rich", spec_from_dict(RICH_SPEC)), ("no-ds-config", spec_from_dict(NO_DS_CONFIG))]


@pytest.mark.parametrize("label,spec", _specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_chart_renders_the_same_objects_as_orch(helm: Helm, label: str, spec: JobSpec, tmp_path: Path) -> None:
    ours = render_manifest(spec)
    ours_job = yaml.safe_load(ours.text)
    ours_cm = config_map(spec, ours.files, namespace=spec.kubernetes.namespace)
    theirs = helm.render(chart_values(spec), tmp=tmp_path)
    assert set(theirs) == {"PyTorchJob", "ConfigMap"}
    assert normalised(theirs["PyTorchJob"]) == normalised(ours_job)
    assert normalised(theirs["ConfigMap"]) == normalised(ours_cm)
    assert theirs["PyTorchJob"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_chart_creates_the_checkpoint_pvc_when_asked(helm: Helm, tmp_path: Path) -> None:
    values = {**chart_values(spec_from_dict(NO_DS_CONFIG)),
              "pvc": {"create": True, "size": "500Gi", "storage_class": "fast"}}
    objs = helm.render(values, tmp=tmp_path)
    pvc = objs["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "bare-checkpoints"
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}  # checkpoints outlive the job
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "500Gi"}},
                           "storageClassName": "fast"}
    volumes = objs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"]
    assert {"name": "orch-shared", "persistentVolumeClaim": {"claimName": "bare-checkpoints"}} in volumes


def test_chart_refuses_a_multi_pod_job_without_shared_storage(helm: Helm, tmp_path: Path) -> None:
    values = {**chart_values(spec_from_dict(NO_DS_CONFIG)),
              "kubernetes": {**chart_values(spec_from_dict(NO_DS_CONFIG))["kubernetes"], "shared_volume": None}}
    with pytest.raises(Exception, match="checkpoint_pvc|shared_volume"):
        helm.render(values, tmp=tmp_path)


def test_chart_volume_schemas_are_the_kubernetes_schemas_orch_checks_against() -> None:
    from orchestrator.backends.kubernetes.storage import _pod_schema

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["kubernetes"]["properties"]
    pod = _pod_schema()
    assert schema["volumes"]["items"] == pod["volumes"]["items"]
    assert schema["volume_mounts"]["items"] == pod["containers"]["items"]["properties"]["volumeMounts"]["items"]


def test_helm_lint_strict_passes(helm: Helm) -> None:
    assert helm.lint_strict() == []


@pytest.mark.parametrize("values,message", [
    ({"name": "Not_A_Label"}, "name"),
    ({"nodes": "3:1"}, "nodes"),
    ({"kubernetes": {"clean_pod_policy": "Sometimes"}}, "clean_pod_policy"),
    ({"kubernetes": {"imagePullPolicy": "Always"}}, "imagePullPolicy"),
])
def test_chart_refuses_bad_values_naming_them(helm: Helm, values: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:  # HelmValuesError/HelmRenderError, or helm's exit status
        helm.render(values, tmp=tmp_path)
    assert message in str(err.value)




@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(nasty_text, min_size=1, max_size=3), env_value=nasty_text, image=nasty_text.filter(bool))
def test_chart_values_with_yaml_and_template_metacharacters_keep_the_structure(helm: Helm, tmp_path: Path,
                                                                               args, env_value, image) -> None:
    spec = spec_from_dict({"name": "inject-test", "nodes": 2, "args": args, "env": {"USER_VALUE": env_value},
                           "ds_config": {"note": env_value}, "kubernetes": {"image": image, "checkpoint_pvc": "c"}})
    objs = helm.render(chart_values(spec), tmp=tmp_path)
    job = objs["PyTorchJob"]
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["command"][-len(args):] == args
    assert {e["name"]: e.get("value") for e in container["env"]}["USER_VALUE"] == env_value
    assert container["image"] == (image or "ghcr.io/orch-dev/orch:latest")
    assert json.loads(objs["ConfigMap"]["data"]["ds_config.json"]) == {"note": env_value}


@pytest.mark.kubernetes
def test_helm_install_creates_the_job_on_the_api_server(helm: Helm, k8s) -> None:
    if helm.sdk is None:
        pytest.skip("installing is tested through helm-python-sdk (pip install helm-python-sdk)")
    spec = load_spec(REPO / "examples" / "tiny-gpt-elastic.yaml")
    with helm.sdk.Config(kubeconfig_path=str(k8s.kubeconfig), namespace=k8s.namespace) as cfg:
        release = cfg.install(str(CHART), "tiny", chart_values(spec), timeout=60)
        assert (release["status"], release["revision"]) == ("deployed", 1)
        job = k8s.pytorchjob("tiny-gpt-elastic")
        ours = yaml.safe_load(render_manifest(spec).text)
        assert job["spec"]["elasticPolicy"]["rdzvId"] == "tiny-gpt-elastic-r1"
        del job["spec"]["runPolicy"]["suspend"]  # a default the server adds
        assert normalised({"kind": "PyTorchJob", "metadata": {"labels": job["metadata"]["labels"]},
                           "spec": job["spec"]}) == \
            normalised({"kind": "PyTorchJob", "metadata": {"labels": ours["metadata"]["labels"]},
                        "spec": ours["spec"]})
        cmap = k8s.core.read_namespaced_config_map("tiny-gpt-elastic-orch", k8s.namespace)
        assert json.loads(cmap.data["ds_config.json"]) == spec.ds_config_dict()
        cfg.uninstall("tiny", timeout=60)
    assert k8s.custom.list_namespaced_custom_object("kubeflow.org", "v1", k8s.namespace, "pytorchjobs")["items"] == []
