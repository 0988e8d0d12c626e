"""``orch launch``: the ``deepspeed`` launcher's command line, turned into an orch job spec.

``deepspeed [--hostfile H] [--include ...] [--num_gpus N] ... train.py ARGS`` becomes a spec for
the local cluster (one machine), the ssh cluster (a hostfile) or Slurm (``--launcher slurm``), so
replacing ``deepspeed`` by ``orch launch`` is the whole migration. Option meanings follow
DeepSpeed's launcher (deepspeed/launcher/runner.py, 0.19): the hostfile defaults to
``/job/hostfile`` when that exists, ``--num_nodes`` keeps the first N hosts, ``--num_gpus`` the
first N slots of each, include/exclude exclude ``--num_*``. The script's arguments pass
unchanged. Two differences, said in ``--dry-run``'s notes: workers run under torchrun, which
sets ``LOCAL_RANK`` in the environment instead of appending ``--local_rank=N``; and orch
supervises the job (status, logs, cancel, elastic restarts) instead of pdsh.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, closest
from .spec import JobSpec, spec_from_dict

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's DLTS_HOSTFILE
VALUE_OPTIONS = {  # DeepSpeed option -> field of LaunchOptions
    "--hostfile": "hostfile", "-H": "hostfile", "--include": "include", "-i": "include",
    "--exclude": "exclude", "-e": "exclude", "--num_nodes": "num_nodes", "--num_gpus": "num_gpus",
    "--num_accelerators": "num_gpus", "--master_addr": "master_addr", "--master_port": "master_port",
    "--launcher": "launcher", "--ssh_port": "ssh_port",
    # orch's own
    "--name": "name", "--max_restarts": "max_restarts", "--set": "overrides",
}
FLAG_OPTIONS = {"--module": "module", "--dry-run": "dry_run", "--dry_run": "dry_run"}
# accepted because orch already behaves that way; the note says so
NOOP_FLAGS = {
    "--no_local_rank": "orch never appends --local_rank (torchrun sets LOCAL_RANK)",
    "--no_ssh_check": "orch checks every host before starting; that check cannot be skipped",
    "--force_multi": "orch runs the ssh cluster for a hostfile of any size",
    "--quiet": "orch prints its own progress", "-q": "orch prints its own progress",
}
NOOP_VALUE_OPTIONS = {"--log_level": "orch prints its own progress"}
UNSUPPORTED = {  # DeepSpeed option -> what to do instead
    "--no_python": "orch runs python scripts or modules (--module); run other programs from a python script",
    "--no_ssh": "use the Slurm or Kubernetes cluster, where orch starts the nodes itself",
    "--node_rank": "orch starts every node itself; give a --hostfile",
    "--launcher_args": "with --launcher slurm use --set slurm.srun_options.NAME=VALUE",
    "--save_pid": "orch records the job (orch status ID shows it)",
    "--enable_each_rank_log": "orch logs ID --node HOST shows one host's output",
    "--autotuning": "not available in orch",
    "--bind_cores_to_rank": "not available in orch", "--bind_core_list": "not available in orch",
    "--venv_script": "use --set ssh.python=/path/to/venv/bin/python",
    "--elastic_training": "use --set nodes=MIN:MAX", "--min_elastic_nodes": "use --set nodes=MIN:MAX",
    "--max_elastic_nodes": "use --set nodes=MIN:MAX",
}
LAUNCHERS = {"pdsh": "ssh", "ssh": "ssh", "slurm": "slurm", "local": "local"}
USAGE = """\
usage: orch launch [deepspeed launcher options] [orch options] SCRIPT.py [script arguments]

Runs a `deepspeed ...` command line as an orch job (local machine, ssh hosts of a hostfile, or
Slurm), submits it and follows it. The script's arguments pass unchanged.

deepspeed options:
  -H, --hostfile FILE        DeepSpeed hostfile (`host slots=N`); default /job/hostfile if present
  -i, --include SPEC         hosts/slots to use: worker-0@worker-1:0,2
  -e, --exclude SPEC         hosts/slots to leave out (not with --include)
  --num_nodes N              the first N hosts of the hostfile
  --num_gpus N               processes (GPUs) per node (alias --num_accelerators)
  --master_addr ADDR         rendezvous address of the first host (default: its `hostname -I`)
  --master_port PORT         rendezvous port
  --launcher pdsh|slurm      pdsh (default): orch's ssh cluster over OpenSSH; slurm: a Slurm job
  --module                   SCRIPT is a python module (python -m)
  --ssh_port PORT            ssh port of the hosts
orch options:
  --name NAME                job name (default: the script's name)
  --max_restarts N           torchrun restarts after a failure
  --set KEY=VALUE            any job spec key, e.g. --set nodes=2:4 (repeatable)
  --dry-run                  print the job spec instead of submitting it
"""


@dataclass
class LaunchOptions:
    hostfile: str | None = None
    include: str = ""
    exclude: str = ""
    num_nodes: int = -1
    num_gpus: int = -1
    master_addr: str = ""
    master_port: int | None = None
    launcher: str = "pdsh"
    ssh_port: int | None = None
    module: bool = False
    dry_run: bool = False
    name: str | None = None
    max_restarts: int | None = None
    overrides: list[str] = field(default_factory=list)
    script: str = ""
    script_args: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _unknown(option: str) -> UserError:
    known = [*VALUE_OPTIONS, *FLAG_OPTIONS, *NOOP_FLAGS, *NOOP_VALUE_OPTIONS]
    near = closest(option, [k for k in known if k.startswith("--")])
    return UserError(f"orch launch: unknown option {option}" + (f"; did you mean {near}?" if near else ""),
                     hint="orch launch takes the deepspeed launcher's options, then the script and its arguments")


def _set_value(opts: LaunchOptions, option: str, value: str) -> None:
    name = VALUE_OPTIONS[option]
    if name in ("num_nodes", "num_gpus", "master_port", "ssh_port", "max_restarts"):
        try:
            number = int(value)
        except ValueError:
            raise UserError(f"orch launch {option}: {value!r} is not a whole number") from None
        setattr(opts, name, number)
    elif name == "overrides":
        opts.overrides.append(value)
    else:
        setattr(opts, name, value)


def parse_launch_args(argv: list[str]) -> LaunchOptions:
    """Options up to the first word that is not an option (the script); the rest is the script's."""
    opts, i = LaunchOptions(), 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        option, eq, inline = argv[i].partition("=")
        if option in UNSUPPORTED:
            raise UserError(f"orch launch: {option} is not supported", hint=UNSUPPORTED[option])
        if option in FLAG_OPTIONS or option in NOOP_FLAGS:
            if eq:
                raise UserError(f"orch launch: {option} takes no value")
            if option in FLAG_OPTIONS:
                setattr(opts, FLAG_OPTIONS[option], True)
            else:
                opts.notes.append(f"{option}: {NOOP_FLAGS[option]}")
            i += 1
            continue
        if option not in VALUE_OPTIONS and option not in NOOP_VALUE_OPTIONS:
            raise _unknown(option)
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"orch launch: {option} needs a value")
            inline, i = argv[i + 1], i + 1
        if option in NOOP_VALUE_OPTIONS:
            opts.notes.append(f"{option}: {NOOP_VALUE_OPTIONS[option]}")
        else:
            _set_value(opts, option, inline)
        i += 1
    if i >= len(argv):
        raise UserError("orch launch: no script given",
                        hint="orch launch [deepspeed options] train.py [script arguments]")
    opts.script, opts.script_args = argv[i], argv[i + 1:]
    return opts


def job_name(opts: LaunchOptions) -> str:
    """--name, else the script's name as a DNS-1035 label (``train_gpt.py`` -> ``train-gpt``)."""
    if opts.name:
        return opts.name
    stem = Path(opts.script).stem if not opts.module else opts.script.rsplit(".", 1)[-1]
    label = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    label = label if label[:1].isalpha() else f"job-{label}".rstrip("-")
    return label[:63].rstrip("-") or "job"


def local_gpu_count() -> int:
    """GPUs of this machine, without importing torch (device nodes, as nvidia-smi sees them)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


def _launcher_cluster(opts: LaunchOptions) -> str:
    name = opts.launcher.lower()
    if name not in LAUNCHERS:
        near = closest(name, LAUNCHERS) or "pdsh"
        raise UserError(f"orch launch --launcher {opts.launcher}: not supported; the nearest is --launcher {near}",
                        hint="pdsh (orch's ssh cluster: OpenSSH, no pdsh needed) or slurm; MPI launchers are "
                             "not available in orch")
    return LAUNCHERS[name]


def _hostfile(opts: LaunchOptions, cwd: Path) -> Path | None:
    if opts.hostfile:
        path = Path(opts.hostfile).expanduser()
        return path if path.is_absolute() else cwd / path
    default = Path(DEFAULT_HOSTFILE)
    if default.is_file():
        opts.notes.append(f"using DeepSpeed's default hostfile {default}")
        return default
    return None


def _ssh_hosts(opts: LaunchOptions, hostfile: Path) -> list[Any]:
    """The hostfile's hosts after include/exclude, --num_nodes and --num_gpus (DeepSpeed's order)."""
    from .backends.ssh.hostfile import Host, read_hostfile, select_hosts

    hosts = select_hosts(read_hostfile(hostfile), opts.include, opts.exclude)
    if opts.num_nodes > 0:
        hosts = hosts[:opts.num_nodes]
    if opts.num_gpus > 0:
        hosts = [Host(h.name, tuple(range(opts.num_gpus))) for h in hosts]
    counts = {len(h.slots) for h in hosts}
    if len(counts) > 1:
        listing = ", ".join(f"{h.name}: {len(h.slots)}" for h in hosts)
        raise UserError(f"orch runs the same number of processes on every host; the selected slots differ ({listing})",
                        hint="select equal slots with --include HOST:0,1@HOST:0,1 or --num_gpus N")
    return hosts


def _slurm_data(opts: LaunchOptions, hostfile: Path | None, gpus: bool) -> dict[str, Any]:
    """A Slurm job; with a hostfile, on exactly its (selected) hosts, as DeepSpeed's Slurm runner."""
    if hostfile is None:
        if opts.include or opts.exclude:
            raise UserError("orch launch --launcher slurm: --include/--exclude select hosts of a hostfile, and "
                            "there is none", hint="give --hostfile, or let Slurm place the nodes (--num_nodes N)")
        procs = opts.num_gpus if opts.num_gpus > 0 else 1
        nodes = opts.num_nodes if opts.num_nodes > 0 else 1
        return {"nodes": nodes, "procs_per_node": procs, "gpus_per_node": procs if gpus and local_gpu_count() else 0}
    hosts = _ssh_hosts(opts, hostfile)
    slots = len(hosts[0].slots)
    return {"nodes": len(hosts), "procs_per_node": slots, "gpus_per_node": slots if gpus else 0,
            "slurm": {"sbatch_options": {"nodelist": ",".join(h.name for h in hosts)}}}


def _placement_data(opts: LaunchOptions, cwd: Path, cluster: str) -> dict[str, Any]:
    """nodes, procs_per_node, gpus_per_node and the cluster section, per cluster."""
    hostfile = _hostfile(opts, cwd)
    gpus = os.environ.get("DS_ACCELERATOR") != "cpu"
    if cluster == "slurm":
        return _slurm_data(opts, hostfile, gpus)
    if hostfile is not None and cluster == "ssh":
        hosts = _ssh_hosts(opts, hostfile)
        slots = len(hosts[0].slots)
        section: dict[str, Any] = {"hostfile": str(hostfile),
                                   "include": "@".join(f"{h.name}:{','.join(map(str, h.slots))}" for h in hosts)}
        if opts.ssh_port is not None:
            section["ssh_options"] = ["-p", str(opts.ssh_port)]
        if opts.master_addr:
            section["master_addr"] = opts.master_addr
        if not gpus:
            opts.notes.append("DS_ACCELERATOR=cpu: each slot is one CPU process (gloo)")
        return {"nodes": len(hosts), "procs_per_node": slots, "gpus_per_node": slots if gpus else 0, "ssh": section}
    if opts.include or opts.exclude:
        raise UserError("orch launch: --include/--exclude select hosts of a hostfile, and there is none",
                        hint="give --hostfile HOSTFILE, or set CUDA_VISIBLE_DEVICES for one machine's GPUs")
    if opts.num_nodes > 1:
        raise UserError(f"orch launch --num_nodes {opts.num_nodes}: more than one node needs a --hostfile "
                        "(or --launcher slurm)")
    found = local_gpu_count()
    procs = opts.num_gpus if opts.num_gpus > 0 else (found or 1)
    if not found:
        opts.notes.append(f"no GPU on this machine: {procs} CPU process(es) with gloo")
    return {"nodes": 1, "procs_per_node": procs, "gpus_per_node": procs if found else 0}


def spec_data(opts: LaunchOptions, cwd: Path) -> tuple[dict[str, Any], str]:
    """The job spec (as YAML-ready data) and the cluster that runs it."""
    if (opts.include or opts.exclude) and (opts.num_nodes >= 0 or opts.num_gpus >= 0):
        raise UserError("orch launch: --num_nodes/--num_gpus cannot be combined with --include/--exclude "
                        "(as in DeepSpeed)")
    cluster = _launcher_cluster(opts)
    if cluster == "ssh" and _hostfile(opts, cwd) is None:
        cluster = "local"
    data: dict[str, Any] = {"name": job_name(opts), "program": opts.script, "args": list(opts.script_args)}
    data.update(_placement_data(opts, cwd, cluster))
    if opts.module and (opts.script.endswith(".py") or "/" in opts.script):
        raise UserError(f"orch launch --module {opts.script}: give a module name like pkg.train, not a path")
    if opts.master_port is not None:
        data["rdzv_port"] = opts.master_port
    if opts.max_restarts is not None:
        data["max_restarts"] = opts.max_restarts
    if cluster == "ssh":
        from .backends.ssh.dsenv import launcher_exports

        env = launcher_exports()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)
        data["env"] = env
    opts.notes.append("workers run under torchrun: LOCAL_RANK is in the environment, no --local_rank "
                      "argument is appended")
    return data, cluster


def build_spec(opts: LaunchOptions, cwd: Path) -> tuple[JobSpec, str, dict[str, Any]]:
    """The validated spec, its cluster, and the data it was built from (after --set overrides)."""
    from .spec import apply_overrides

    data, cluster = spec_data(opts, cwd)
    data = apply_overrides(data, opts.overrides)
    return spec_from_dict(data, source="orch launch", base_dir=cwd), cluster, data


def dry_run_text(data: dict[str, Any], cluster: str, notes: list[str]) -> str:
    """The spec as a job file, with the command that submits it and what orch does differently."""
    import yaml

    head = [f"# orch launch would run: orch submit SPEC.yaml --cluster {cluster} --follow", "# with SPEC.yaml:"]
    head += [f"# note: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
