"""No value in a job spec can inject a shell command into the sbatch script or a field into the
PyTorchJob manifest. The sbatch script is really run by bash (with srun/scontrol replaced by
recorders on PATH) and the words srun receives must be exactly the spec's values."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from orchestrator.backends.kubernetes.render import render as render_manifest
from orchestrator.backends.slurm.render import render as render_sbatch
from orchestrator.spec import CONTROL_CHARS, spec_from_dict
from orchestrator.types import Placement

NASTY = ["; touch /tmp/orch-pwned", "$(touch /tmp/orch-pwned)", "`touch /tmp/orch-pwned`", "'", '"',
         "\n", "a\nb: c", ": {}", "- x", "#", "${HOME}", "\\", "&&", "|", "*", "{{ 7*7 }}", "\t", "\u2028", "]",
         "<script>&", "--set x=1"]
# NUL cannot travel in argv or the environment at all; the spec refuses it (tested below).
# Lone surrogates cannot be written to a UTF-8 file, so no spec can hold them.
nasty_text = st.lists(st.sampled_from(NASTY) | st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
                      min_size=1, max_size=5).map("".join)


def _spec(args: list[str], env_value: str, partition: str, image: str = "img"):
    return spec_from_dict({
        "name": "inject-test", "nodes": 2, "procs_per_node": 2, "args": args,
        "ds_config": {"train_batch_size": 8}, "env": {"USER_VALUE": env_value},
        "slurm": {"partition": partition},
        "kubernetes": {"image": image, "annotations": {"team": env_value}, "checkpoint_pvc": "ckpts"},
    })


def _run_sbatch_script(text: str, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """Run the script with recording srun/scontrol; return srun's argv and the exported env."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORD/argv"\n'
                                  'env -0 > "$RECORD/env"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho n1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp / "job.sbatch"
    script.write_text(text)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "n[1-2]", "HOME": str(tmp)}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = (tmp / "argv").read_bytes().split(b"\0")[:-1]
    envs = dict(item.split("=", 1) for item in (tmp / "env").read_bytes().decode().split("\0") if "=" in item)
    return [a.decode() for a in argv], envs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(nasty_text, min_size=1, max_size=4), env_value=nasty_text, partition=nasty_text)
def test_sbatch_runs_exactly_the_spec_values(args, env_value, partition, tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("sbatch")
    spec = _spec(args, env_value, CONTROL_CHARS.sub("", partition).strip() or "p")
    run_dir = str(tmp / "run")
    placement = Placement(run_dir=run_dir, ds_config_path=f"{run_dir}/ds_config.json",
                          checkpoint_dir=f"{run_dir}/ckpt", python="python3")
    text = render_sbatch(spec, placement).text
    argv, env = _run_sbatch_script(text, tmp)
    assert argv[-len(args):] == args
    assert env["USER_VALUE"] == env_value
    assert not Path("/tmp/orch-pwned").exists()
    # every #SBATCH line is still one option with the value intact
    header = [line for line in text.split("\n") if line.startswith("#SBATCH")]
    parsed = dict(shlex.split(line[len("#SBATCH "):])[0].lstrip("-").partition("=")[::2] for line in header)
    assert parsed["partition"] == spec.slurm.partition


@settings(max_examples=200, deadline=None)
@given(args=st.lists(nasty_text, min_size=1, max_size=4), env_value=nasty_text, image=nasty_text.filter(bool))
def test_manifest_structure_is_unchanged_by_values(args, env_value, image) -> None:
    spec = _spec(args, env_value, "p", image)
    job = yaml.safe_load(render_manifest(spec).text)
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert container["command"][-len(args):] == args
    assert {e["name"]: e.get("value") for e in container["env"]}["USER_VALUE"] == env_value
    assert container["image"] == image
    assert job["metadata"]["annotations"]["team"] == env_value


@pytest.mark.parametrize("name", ["a;b", "$(x)", "Bad", "a b", "-x", "x" * 64, "a\nb"])
def test_job_names_that_are_not_dns_labels_are_refused(name: str) -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="name: .*DNS-1035"):
        spec_from_dict({"name": name})


def test_nul_characters_are_refused_with_the_field_named() -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match=r"args\[1\]: a NUL character"):
        spec_from_dict({"name": "x", "args": ["ok", "a\x00b"]})
    with pytest.raises(UserError, match="env.*K: a NUL character"):
        spec_from_dict({"name": "x", "env": {"K": "a\x00b"}})


@pytest.mark.parametrize("value", ["gpu\n#SBATCH --x", "a\tb", "a\x1eb", ""])
def test_slurm_values_with_line_breaks_are_refused(value: str) -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="slurm.partition: .*control characters"):
        spec_from_dict({"name": "x", "slurm": {"partition": value}})


def test_kubernetes_labels_are_checked_when_the_spec_loads() -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="kubernetes.labels: .*not a valid label value"):
        spec_from_dict({"name": "x", "kubernetes": {"labels": {"team": "a b; c"}}})
    with pytest.raises(UserError, match="kubernetes.image: .*at least 1 character"):
        spec_from_dict({"name": "x", "kubernetes": {"image": ""}})
