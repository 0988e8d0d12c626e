"""Shared storage and user volumes of Kubernetes jobs: a multi-pod job without a volume every pod
shares is refused by `orch check`, `orch render` and `orch submit` (and by the chart) with the key
to set; volumes and mounts are checked against the Kubernetes schema with errors naming the spec
key; checkpoints and the run directory go to <job>/checkpoints and <job>/run on the shared volume.
No cluster needed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.backends.kubernetes.render import render
from orchestrator.backends.kubernetes.run_reader import reader_pod, reader_timeout, unpack
from orchestrator.errors import UserError
from orchestrator.spec import spec_from_dict
from tests.shared_env import REPO

EXAMPLES = REPO / "examples"
HOST_VOLUME = {"name": "shared", "hostPath": {"path": "/srv/orch", "type": "DirectoryOrCreate"}}


def spec(nodes: object = 2, **kubernetes: object):
    return spec_from_dict({"name": "vol-job", "nodes": nodes, "ds_config": {"train_batch_size": 8},
                           "kubernetes": {"image": "img", **kubernetes}})


def pod_of(job_spec) -> dict:
    job = yaml.safe_load(render(job_spec).text)
    return next(iter(job["spec"]["pytorchReplicaSpecs"].values()))["template"]["spec"]


def orch(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("command", ["check", "render", "submit"])
def test_a_multi_pod_job_on_emptydir_is_refused_naming_the_keys_to_set(command: str, tmp_path: Path) -> None:
    job = yaml.safe_load((EXAMPLES / "tiny-gpt-zero2.yaml").read_text())
    job["ds_config"] = str(EXAMPLES / job["ds_config"])
    del job["kubernetes"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = orch(command, "job.yaml", "--cluster", "kubernetes", cwd=tmp_path)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "kubernetes.checkpoint_pvc" in text and "kubernetes.shared_volume" in text and "emptyDir" in text
    assert "Traceback" not in text


def test_a_single_pod_job_may_keep_emptydir_with_a_warning() -> None:
    from orchestrator.check import check_job

    pod = pod_of(spec(nodes=1))
    assert {"name": "checkpoints", "emptyDir": {}} in pod["volumes"]
    notes = check_job(spec(nodes=1)).notes
    assert any("emptyDir" in n and "rescheduled" in n for n in notes), notes


def test_the_shared_volume_holds_checkpoints_and_the_run_directory_per_job() -> None:
    pod = pod_of(spec(volumes=[HOST_VOLUME], shared_volume="shared"))
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/orch/checkpoints"] == {"name": "shared", "mountPath": "/orch/checkpoints",
                                           "subPath": "vol-job/checkpoints"}
    assert mounts["/orch/run"]["subPath"] == "vol-job/run"
    assert HOST_VOLUME in pod["volumes"] and not any("emptyDir" in v and v["name"] == "checkpoints"
                                                     for v in pod["volumes"])
    claim = pod_of(spec(checkpoint_pvc="team-rwx"))
    assert {"name": "orch-shared", "persistentVolumeClaim": {"claimName": "team-rwx"}} in claim["volumes"]


def test_the_1b_example_mounts_its_token_file() -> None:
    from orchestrator.spec import load_spec

    job = load_spec(EXAMPLES / "gpt-1b-gpu.yaml")
    assert "/data/tokens.bin" in job.args
    pod = pod_of(job)
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("kubernetes,expected", [
    ({"volumes": [{"name": "d", "hostPath": {}}]}, "kubernetes.volumes[0].hostPath: 'path' is a required property"),
    ({"volumes": [{"name": "d", "nfs": {"server": "s", "path": "/x"}, "hostPath": {"path": "/y"}}]},
     "kubernetes.volumes[0]: needs exactly one volume source"),
    ({"volumes": [{"name": "d", "persistentVolumeClaim": {"claim": "x"}}]},
     "kubernetes.volumes[0].persistentVolumeClaim"),
    ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "kubernetes.volumes[0].name: 'dshm' is used by orch"),
    ({"volume_mounts": [{"name": "data", "mountPath": "/data"}]},
     "kubernetes.volume_mounts[0].name: 'data' is not one of kubernetes.volumes"),
    ({"volumes": [HOST_VOLUME], "volume_mounts": [{"name": "shared", "mountpath": "/x"}]},
     "kubernetes.volume_mounts[0]"),
    ({"shared_volume": "nfs"}, "kubernetes.shared_volume: 'nfs' is not one of kubernetes.volumes"),
    ({"volumes": [HOST_VOLUME], "shared_volume": "shared", "checkpoint_pvc": "c"}, "set one of them"),
])
def test_volume_mistakes_name_the_spec_key(kubernetes: dict, expected: str) -> None:
    with pytest.raises(UserError) as err:
        render(spec(nodes=1, **kubernetes))
    assert expected in str(err.value)


def test_the_run_reader_pod_mounts_the_run_directory_read_only_and_unpacks_safely(tmp_path: Path) -> None:
    import base64
    import io
    import tarfile

    job = yaml.safe_load(render(spec(volumes=[HOST_VOLUME], shared_volume="shared")).text)
    job["metadata"].update(uid="u-1", namespace="team")
    pod = reader_pod(job)
    (container,) = pod["spec"]["containers"]
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/orch/run", "subPath": "vol-job/run",
                                          "readOnly": True}]
    assert pod["spec"]["volumes"] == [HOST_VOLUME] and pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert reader_pod(yaml.safe_load(render(spec(nodes=1)).text)) is None  # run dir on no volume

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in (("./metrics.jsonl", b'{"step": 1, "loss": 2.5}\n'), ("../escape.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert unpack(base64.b64encode(buf.getvalue()).decode(), tmp_path / "run") == 1
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 2.5
    assert not (tmp_path / "escape.txt").exists()


def test_the_reader_pods_time_limit_is_the_default_unless_the_user_sets_one(monkeypatch) -> None:
    monkeypatch.delenv("ORCH_K8S_READER_TIMEOUT_S", raising=False)
    assert (reader_timeout(), reader_timeout(60)) == (180, 60)  # image pulls may take minutes
    monkeypatch.setenv("ORCH_K8S_READER_TIMEOUT_S", "600")
    assert (reader_timeout(), reader_timeout(60)) == (600, 600)
    for bad in ("ten", "0", "-5", "nan"):
        monkeypatch.setenv("ORCH_K8S_READER_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="ORCH_K8S_READER_TIMEOUT_S=.* is not a number of seconds above 0"):
            reader_timeout()
