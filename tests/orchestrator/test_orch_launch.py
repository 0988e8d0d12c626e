"""`orch launch`: a `deepspeed ...` command line with `deepspeed` replaced by `orch launch`.

The fast tests read what `--dry-run` builds and what is refused; the slow ones run a
DeepSpeed-style script (tests/orchestrator/ds_style_train.py, copied beside a ds_config like a
user's project) unchanged: on one machine with `--num_gpus 2`, and with `--hostfile` on the
3 ssh hosts of tests/clusters/ssh_hosts.sh.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.shared_env import REPO, SshLab, ssh_hosts  # noqa: F401  (session fixture)

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "optimizer": {"type": "Adam", "params": {"lr": 1e-2}}, "zero_optimization": {"stage": 2}}


def orch_launch(*argv: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "launch", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def dry_run_spec(result: subprocess.CompletedProcess) -> tuple[str, dict]:
    assert result.returncode == 0, result.stderr
    cluster = result.stdout.split("--cluster ", 1)[1].split()[0]
    return cluster, yaml.safe_load(result.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project directory: the training script and its ds_config."""
    shutil.copy(REPO / "tests" / "orchestrator" / "ds_style_train.py", tmp_path / "train.py")
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    return tmp_path


def test_one_machine_becomes_a_local_job(project: Path) -> None:
    cluster, spec = dry_run_spec(orch_launch("--dry-run", "--num_gpus", "2", "train.py", "--deepspeed_config",
                                             "ds.json", "--note", "a 'b' $c", cwd=project))
    assert cluster == "local"
    assert spec["program"] == "train.py" and spec["args"] == ["--deepspeed_config", "ds.json", "--note", "a 'b' $c"]
    assert (spec["nodes"], spec["procs_per_node"], spec["gpus_per_node"]) == (1, 2, 0)  # no GPU here: CPU procs


def test_a_hostfile_becomes_an_ssh_job_with_deepspeeds_selection(project: Path) -> None:
    (project / "hostfile").write_text("worker-0 slots=4\nworker-1 slots=4\nworker-2 slots=4\n")
    cluster, spec = dry_run_spec(orch_launch("--dry-run", "-H", "hostfile", "-i", "worker-0:0,1@worker-2:2,3",
                                             "--master_port=29600", "train.py", cwd=project, DS_ACCELERATOR="cpu"))
    assert cluster == "ssh"
    assert spec["ssh"] == {"hostfile": str(project / "hostfile"), "include": "worker-0:0,1@worker-2:2,3"}
    assert (spec["nodes"], spec["procs_per_node"], spec["rdzv_port"]) == (2, 2, 29600)
    assert spec["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(project)
    _, spec = dry_run_spec(orch_launch("--dry-run", "--hostfile", "hostfile", "--num_nodes", "2", "--num_gpus", "1",
                                       "--ssh_port", "2222", "train.py", cwd=project))
    assert spec["ssh"]["include"] == "worker-0:0@worker-1:0" and spec["ssh"]["ssh_options"] == ["-p", "2222"]
    assert spec["gpus_per_node"] == 1  # slots are GPUs, as in DeepSpeed
    cluster, spec = dry_run_spec(orch_launch("--dry-run", "--launcher", "slurm", "--num_nodes", "2", "--num_gpus",
                                             "4", "--set", "slurm.partition=gpu", "train.py", cwd=project))
    assert cluster == "slurm" and spec["nodes"] == 2 and spec["slurm"] == {"partition": "gpu"}
    cluster, spec = dry_run_spec(orch_launch("--dry-run", "--launcher", "SLURM", "-H", "hostfile", "-e", "worker-1",
                                             "train.py", cwd=project))
    assert cluster == "slurm" and spec["nodes"] == 2 and spec["procs_per_node"] == 4
    assert spec["slurm"] == {"sbatch_options": {"nodelist": "worker-0,worker-2"}}


@pytest.mark.parametrize("argv, message", [
    (["--num_gpu", "2", "train.py"], "unknown option --num_gpu; did you mean --num_gpus?"),
    (["--hostfle", "h", "train.py"], "did you mean --hostfile?"),
    (["--launcher", "openmpi", "train.py"], "--launcher openmpi: not supported; the nearest is --launcher"),
    (["--no_python", "train.py"], "--no_python is not supported"),
    (["--autotuning", "run", "train.py"], "--autotuning is not supported"),
    (["--include", "worker-0", "--num_gpus", "1", "train.py"], "cannot be combined with --include/--exclude"),
    (["--num_nodes", "2", "train.py"], "more than one node needs a --hostfile"),
    (["--hostfile", "uneven", "train.py"], "the selected slots differ (worker-0: 4, worker-1: 2)"),
    (["--hostfile", "missing", "train.py"], "hostfile"),
    (["--num_gpus", "2"], "no script given"),
])
def test_what_orch_launch_refuses_is_named(project: Path, argv: list[str], message: str) -> None:
    (project / "uneven").write_text("worker-0 slots=4\nworker-1 slots=2\n")
    result = orch_launch("--dry-run", *argv, cwd=project)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_accepted_no_op_options_are_said_not_dropped(project: Path) -> None:
    result = orch_launch("--dry-run", "--no_local_rank", "--force_multi", "train.py", cwd=project)
    assert "--no_local_rank: orch never appends --local_rank" in result.stdout
    assert "--force_multi" in result.stdout


@pytest.mark.slow
def test_num_gpus_2_runs_a_deepspeed_style_script_unchanged(project: Path) -> None:
    result = orch_launch("--num_gpus", "2", "train.py", "--deepspeed_config", "ds.json", "--out", "seen.json",
                         "--note", "a 'b' $c", cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads((project / "seen.json").read_text())
    assert seen["world_size"] == 2 and seen["deepspeed_config"] == "ds.json" and seen["argv_note"] == "a 'b' $c"
    assert seen["local_rank_arg"] == -1 and seen["LOCAL_RANK"] == "0"
    assert seen["losses"][-1] < seen["losses"][0]


@pytest.mark.slow
@pytest.mark.ssh
def test_hostfile_runs_a_deepspeed_style_script_on_the_ssh_hosts(project: Path, ssh_hosts: SshLab) -> None:  # noqa: F811
    (project / "hostfile").write_text("".join(f"{h} slots=1\n" for h in ssh_hosts.hosts))
    result = orch_launch("--hostfile", "hostfile", "--set", f"ssh.ssh_options=[{', '.join(ssh_hosts.ssh_options)}]",
                         "train.py", "--deepspeed_config", "ds.json", "--out", "seen.json", cwd=project,
                         timeout=900, DS_ACCELERATOR="cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads((project / "seen.json").read_text())
    assert seen["world_size"] == 3 and sorted(seen["hosts"]) == list(ssh_hosts.hosts)
    assert seen["deepspeed_config"] == "ds.json" and seen["losses"][-1] < seen["losses"][0]
