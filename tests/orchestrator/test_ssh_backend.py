"""The ssh cluster as a team with a few bare machines meets it: a DeepSpeed hostfile, `orch submit
--cluster ssh`, status/logs/cancel, a machine dying mid-run, and bad hosts refused before anything
starts. Real OpenSSH on both sides: the 3 hosts of tests/clusters/ssh_hosts.sh (network
namespaces with their own sshd), real torchrun agents and gloo workers on them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import jobs
from orchestrator.backends.ssh.supervisor import read_state
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import load_spec
from orchestrator.types import JobState
from tests.polling import wait_until
from tests.shared_env import REPO, SshLab, ssh_hosts  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
EXAMPLES = REPO / "examples"
# The 3 hosts share this machine's 2 cores: one compute thread per worker, as torchrun gives each of
# several workers on one machine (unset, each worker's OpenMP team spins on both cores and a step of
# the tiny GPT takes ~1 s instead of ~0.1 s). The local reference runs get the same, so losses agree.
ONE_THREAD = "env.OMP_NUM_THREADS='1'"


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    yield
    for record in Registry().list():
        if not record.state.finished:
            try:
                jobs.cancel(record.job_id)
            except Exception:  # noqa: BLE001 - best-effort cleanup; the test already failed
                pass


@pytest.fixture
def hostfile(tmp_path: Path, ssh_hosts: SshLab) -> Path:  # noqa: F811
    path = tmp_path / "hostfile"
    path.write_text("# the lab's machines\n" + "".join(f"{h} slots=1\n" for h in ssh_hosts.hosts))
    return path


def ssh_spec(example: str, hostfile: Path, lab: SshLab, *overrides: str):
    return load_spec(EXAMPLES / example, [f"ssh.hostfile={hostfile}",
                                          f"ssh.ssh_options=[{', '.join(lab.ssh_options)}]", ONE_THREAD, *overrides])


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("kind", "train") == "train" and "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in train_records(run_dir)}  # a recomputed step keeps its last


def wait_finished(job_id: str, timeout: float = 600) -> JobState:
    def done():
        record, _ = jobs.status(job_id)
        return record.state if record.state.finished else None
    return wait_until(done, timeout, f"job {job_id} to finish", poll=0.25)


def job_pids(lab: SshLab, idle: dict[str, set[int]]) -> dict[str, set[int]]:
    """The processes the job runs on each host (everything but what ran there before it)."""
    return {host: lab.pids(host) - idle[host] for host in lab.hosts}


def test_tiny_gpt_zero2_on_3_hosts_equals_the_local_run(hostfile: Path, ssh_hosts: SshLab) -> None:  # noqa: F811
    args = "args=[--model, tiny, --steps, '12', --log-every, '1']"
    spec = ssh_spec("tiny-gpt-zero2.yaml", hostfile, ssh_hosts, "nodes=3", "procs_per_node=1", args)
    result = subprocess.run([sys.executable, "-m", "orchestrator", "render", str(EXAMPLES / "tiny-gpt-zero2.yaml"),
                             "--cluster", "ssh", "--set", f"ssh.hostfile={hostfile}", "--set", "nodes=3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" -- orch-h") == 3 and "is_host=true" in result.stdout

    ours = jobs.submit(spec, "ssh")
    reference = jobs.submit(load_spec(EXAMPLES / "tiny-gpt-zero2.yaml", ["nodes=3", "procs_per_node=1", args,
                                                                          ONE_THREAD]), "local")
    assert wait_finished(ours.job_id) == JobState.SUCCEEDED, Registry().get(ours.job_id).detail
    assert wait_finished(reference.job_id) == JobState.SUCCEEDED

    run = Path(ours.run_dir)
    assert read_state(run)["hosts"].keys() == set(ssh_hosts.hosts)
    assert {r["world_size"] for r in train_records(run)} == {3}
    assert losses(run) == losses(Path(reference.run_dir)) and len(losses(run)) == 12
    for host in ssh_hosts.hosts:  # each host's own output, as `orch logs --node HOST` shows it
        text = "\n".join(jobs.logs(ours.job_id, node=host))
        assert f"orch-ssh-agent started host={host}" in text and "orch-ssh-agent exit=0" in text
    assert "step     12/12" in "\n".join(jobs.logs(ours.job_id, node="orch-h1"))
    followed = list(jobs.logs(ours.job_id, follow=True))  # `orch logs -f` of a finished job: all, then ends
    assert {line.split("]")[0] + "]" for line in followed} == {f"[{h}]" for h in ssh_hosts.hosts}
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status", ours.job_id], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "ssh  SUCCEEDED" in result.stdout, result.stdout + result.stderr


def test_cancel_stops_every_process_on_every_host(hostfile: Path, ssh_hosts: SshLab) -> None:  # noqa: F811
    idle = {host: ssh_hosts.pids(host) for host in ssh_hosts.hosts}
    spec = ssh_spec("tiny-gpt-zero2.yaml", hostfile, ssh_hosts, "nodes=3", "procs_per_node=1",
                    "args=[--model, tiny, --steps, '100000']")
    job = jobs.submit(spec, "ssh")
    wait_until(lambda: train_records(Path(job.run_dir)), 300, "the first training step", poll=1.0)
    running = job_pids(ssh_hosts, idle)
    # each host runs the ssh session, orch's host agent, torchrun and a worker at least
    assert all(len(pids) >= 3 for pids in running.values()), running

    result = subprocess.run([sys.executable, "-m", "orchestrator", "cancel", job.job_id],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for host, pids in running.items():
        assert not pids & ssh_hosts.pids(host), f"left running on {host}: {pids & ssh_hosts.pids(host)}"
    assert Registry().get(job.job_id).state == JobState.CANCELLED
    assert {h["state"] for h in read_state(Path(job.run_dir))["hosts"].values()} == {"CANCELLED"}


def test_a_dead_host_leaves_the_elastic_job_training_on_the_others(tmp_path: Path, hostfile: Path,
                                                                   ssh_hosts: SshLab) -> None:  # noqa: F811
    """Elastic 1:3 over the 3 hosts; orch-h3 dies (every process SIGKILLed, its link down) at step
    ~8, past the checkpoint of step 5. The others re-form within 60 s from that checkpoint, `orch
    status` names the lost host, and the resumed steps equal a 2-host run started from that same
    checkpoint. (40 steps of ~0.1 s: a checkpoint, a kill after it that lands seconds before the end
    even when the machine is busy, and 30-odd resumed steps to compare.)"""
    steps, every = 40, 5
    args = f"args=[--model, tiny, --steps, '{steps}', --log-every, '1']"
    spec = ssh_spec("tiny-gpt-elastic.yaml", hostfile, ssh_hosts, args, f"checkpoint.every_steps={every}",
                    f"checkpoint.keep={steps // every}")  # the one resumed from stays for the reference
    job = jobs.submit(spec, "ssh")
    run = Path(job.run_dir)
    wait_until(lambda: max(losses(run), default=0) >= every + 3, 600, f"step {every + 3}", poll=0.25)
    ssh_hosts.kill("orch-h3")
    killed = time.time()
    try:
        status = wait_until(lambda: (s := jobs.status(job.job_id)[1]).nodes.get("orch-h3") == "NODE_FAIL" and s,
                            60, "orch status to see the lost host")
        # RESTARTING: "restarting after host orch-h3 was lost; ...", or already "continuing without lost host"
        assert "host orch-h3 was lost" in status.detail or "lost host orch-h3" in status.detail, status
        resumed = wait_until(lambda: [r for r in train_records(run) if r["world_size"] == 2], 90,
                             "a step on the 2 surviving hosts", poll=0.25)
        assert resumed[0]["time"] - killed < 60, f"resumed after {resumed[0]['time'] - killed:.0f} s"
        assert "continuing without lost host orch-h3" in jobs.status(job.job_id)[1].detail
        assert wait_finished(job.job_id) == JobState.SUCCEEDED
    finally:
        ssh_hosts.revive("orch-h3")
    record = Registry().get(job.job_id)
    assert "finished on 2 of 3 hosts after losing orch-h3" in record.detail and record.restarts >= 1

    # the 2-host reference: the same job, started on orch-h1 and orch-h2 from a copy of the checkpoint
    # the survivors resumed from
    first = min(r["step"] for r in resumed)
    reference_ckpt = tmp_path / "reference-checkpoints"
    shutil.copytree(run / "checkpoints" / f"step-{first - 1}", reference_ckpt / f"step-{first - 1}")
    (reference_ckpt / "latest").write_text(f"step-{first - 1}")
    reference = jobs.submit(ssh_spec("tiny-gpt-elastic.yaml", hostfile, ssh_hosts, args, "nodes=2",
                                     "ssh.include=orch-h1@orch-h2", f"checkpoint.dir={reference_ckpt}",
                                     f"checkpoint.every_steps={every}"), "ssh")
    assert wait_finished(reference.job_id) == JobState.SUCCEEDED
    ours, ref = losses(run), losses(Path(reference.run_dir))
    assert sorted(ref) == list(range(first, steps + 1))
    assert {s: ours[s] for s in ref} == ref


def test_bad_hosts_are_named_before_anything_starts(tmp_path: Path, hostfile: Path,
                                                    ssh_hosts: SshLab) -> None:  # noqa: F811
    idle = {host: ssh_hosts.pids(host) for host in ssh_hosts.hosts}
    wrong_keys = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    lines = (ssh_hosts.lab / "known_hosts").read_text().splitlines()
    wrong_keys.write_text("".join(f"{line}\n" if not line.startswith("orch-h2,") else
                                  f"{line.split()[0]} {impostor}\n" for line in lines))
    bad_hostfile = tmp_path / "hosts-with-a-typo"
    bad_hostfile.write_text("orch-h1 slots=1\norch-h2 slots=1\norch-hx slots=1\n")
    cases = [  # (spec overrides, what the error must say)
        ([f"ssh.hostfile={bad_hostfile}"], "orch-hx: unreachable over ssh (ssh: Could not resolve hostname orch-hx"),
        ([f"ssh.ssh_options=[-o, 'UserKnownHostsFile={wrong_keys}', {', '.join(ssh_hosts.ssh_options)}]"],
         "orch-h2: host key does not match known_hosts"),
        (["ssh.python=/opt/no-such-python"], "orch-h1: python '/opt/no-such-python' not found"),
        ([f"ssh.python={shutil.which('python3', path='/usr/bin')}"], "cannot import orchestrator, torch"),
    ]
    for overrides, message in cases:
        spec = ssh_spec("tiny-gpt-zero2.yaml", hostfile, ssh_hosts, "nodes=3", "procs_per_node=1", *overrides)
        with pytest.raises(UserError) as err:
            jobs.submit(spec, "ssh")
        assert message in str(err.value) and "nothing was started" in str(err.value)
    assert job_pids(ssh_hosts, idle) == {host: set() for host in ssh_hosts.hosts}
    assert all(r.state == JobState.FAILED and "submit refused" in r.detail for r in Registry().list())


ECHO_SCRIPT = """\
import json, os, socket, sys
from pathlib import Path
rank = os.environ["RANK"]
seen = {"argv": sys.argv[1:], "env": os.environ["WEIRD"], "cwd": os.getcwd(), "host": socket.gethostname()}
(Path(os.environ["ORCH_RUN_DIR"]) / f"seen-{rank}.json").write_text(json.dumps(seen))
"""


def test_paths_arguments_and_env_with_shell_metacharacters_arrive_intact(tmp_path: Path, hostfile: Path,
                                                                         ssh_hosts: SshLab) -> None:  # noqa: F811
    """The remote command goes through the remote user's shell: every word must arrive as written,
    and nothing in it may run (each `touch` below would leave a PWNED file)."""
    from orchestrator.spec import spec_from_dict

    workdir = tmp_path / "work dir 'q' \"dq\" $HOME; touch PWNED #"
    workdir.mkdir()
    script = workdir / "echo $(touch PWNED) args.py"
    script.write_text(ECHO_SCRIPT)
    args = ["a b", "'single'", '"double"', "$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "x && touch PWNED",
            "*", "new\nline", "back\\slash", "--flag=$HOME", "ünïcode", "", "-", "--"]
    env_value = "$(touch PWNED) 'q' \"d\" ;|&<>"
    spec = spec_from_dict({"name": "metachars", "nodes": 2, "program": str(script), "args": args,
                           "env": {"WEIRD": env_value},
                           "ssh": {"hostfile": str(hostfile), "include": "orch-h1@orch-h3",
                                   "ssh_options": ssh_hosts.ssh_options, "workdir": str(workdir)}}, base_dir=tmp_path)
    job = jobs.submit(spec, "ssh")
    assert wait_finished(job.job_id) == JobState.SUCCEEDED, "\n".join(jobs.logs(job.job_id))
    seen = [json.loads((Path(job.run_dir) / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert {s["host"] for s in seen} == {"orch-h1", "orch-h3"}
    for s in seen:
        assert s == {"argv": args, "env": env_value, "cwd": str(workdir), "host": s["host"]}
    home = Path(ssh_hosts.run("orch-h1", "echo $HOME").strip())
    assert not [p for p in (workdir, tmp_path, home, Path(job.run_dir)) if (p / "PWNED").exists()]
