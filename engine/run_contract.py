"""The run contract: what orch and the bundled trainer agree on, in one place.

orch renders a job (local plan, sbatch script, PyTorchJob) that starts ``python -m engine.train``
on every node; the two sides never import each other's code at run time, they share

* environment variable names (``ENV_*``): orch sets them in the job environment, the trainer
  reads them as defaults for its flags;
* a run directory layout (``RunPaths``): the trainer writes ``status.json`` and
  ``metrics.jsonl`` there, node logs go to ``logs/``, a launcher asks for a checkpoint through
  the files in ``control/``;
* the readers orch uses to follow a run (``read_status``, ``last_metrics``, ``agent_restarts``,
  ``agent_attempts``) and the writers any program's reporter uses (``write_status``, ``append_record``: the bundled
  trainer, ``engine.integrations.transformers.OrchCallback`` for an HF Trainer script);
* the defaults both sides show (``DEFAULT_CHECKPOINT_KEEP`` ...).

Standard library only: ``orch`` imports this without paying for torch (its CLI must start fast),
and ``engine`` imports it without depending on orch. Like submitit's ``JobPaths``, every path a
run uses is a property of one object, so a file name is written once.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

# --- environment: set by orch's rendered job, read by the trainer -----------------------------
ENV_JOB_NAME = "ORCH_JOB_NAME"                  # the job spec's name
ENV_RUN_DIR = "ORCH_RUN_DIR"                    # where status.json / metrics.jsonl / logs go
ENV_CHECKPOINT_DIR = "ORCH_CHECKPOINT_DIR"      # --save-dir default
ENV_DS_CONFIG = "ORCH_DS_CONFIG"                # the job's ds_config on the nodes (when it has one)
ENV_CHECKPOINT_EVERY = "ORCH_CHECKPOINT_EVERY"  # --save-every default
ENV_CHECKPOINT_KEEP = "ORCH_CHECKPOINT_KEEP"    # --save-keep default
ENV_CHECKPOINT_ASYNC = "ORCH_CHECKPOINT_ASYNC"  # "1": the spec's checkpoint.async_save
ENV_RESTART_COUNT = "ORCH_RESTART_COUNT"        # restarts of the whole job (orch, Slurm requeue)
ENV_NODE_RANK = "ORCH_NODE_RANK"                # a local "node"'s rank in the local backend's plan

# --- environment: trainer knobs a user (or a test) may set ------------------------------------
ENV_WATCHDOG_TIMEOUT = "ORCH_WATCHDOG_TIMEOUT"  # seconds without a step before ranks dump stacks
ENV_PEAK_TFLOPS = "ORCH_PEAK_TFLOPS"            # the device's peak, for MFU, when the table lacks it
ENV_CACHE_DIR = "ORCH_CACHE_DIR"                # measured CPU peaks, Triton autotune results
ENV_TEST_STALL = "ORCH_TEST_STALL"              # tests only: "<rank>@<step>" sleeps in that step

# Restart counters the launchers set (read beside ENV_RESTART_COUNT).
SLURM_RESTART_COUNT = "SLURM_RESTART_COUNT"
TORCHELASTIC_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"

# --- shared defaults --------------------------------------------------------------------------
DEFAULT_CHECKPOINT_KEEP = 3       # newest complete checkpoints kept (job spec and trainer)
DEFAULT_CHECKPOINT_EVERY = 0      # 0: only on request and at the end of a run with checkpoints
DEFAULT_WATCHDOG_TIMEOUT_S = 600.0

# --- run directory layout ---------------------------------------------------------------------
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOGS_DIR = "logs"
CONTROL_DIR = "control"
CHECKPOINTS_DIR = "checkpoints"
HANG_DIR = "hang"
TORCHELASTIC_DIR = "torchelastic"  # torchrun's --log-dir: <rdzv id>_<random>/attempt_<restart>/ per agent
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_REQUEST = "checkpoint-request"  # a launcher writes it: "checkpoint now"
CHECKPOINT_DONE = "checkpoint-done"        # the trainer answers with the step it saved


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run directory, named once.

    ``checkpoints`` is the default checkpoint directory; a job may put checkpoints elsewhere
    (``ORCH_CHECKPOINT_DIR``), which is why it is a default and not a rule.
    """

    run_dir: Path

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "run_dir", Path(run_dir))

    @property
    def status(self) -> Path:
        return self.run_dir / STATUS_FILE

    @property
    def metrics(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def logs(self) -> Path:
        return self.run_dir / LOGS_DIR

    def node_log(self, node: str | int) -> Path:
        """One node's (torchrun agent's) log: ``logs/node-<node>.log``."""
        return self.logs / f"node-{node}.log"

    @property
    def control(self) -> Path:
        return self.run_dir / CONTROL_DIR

    @property
    def checkpoint_request(self) -> Path:
        return self.control / CHECKPOINT_REQUEST

    @property
    def checkpoint_done(self) -> Path:
        return self.control / CHECKPOINT_DONE

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def hang(self) -> Path:
        return self.run_dir / HANG_DIR

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / TENSORBOARD_DIR

    @property
    def torchelastic(self) -> Path:
        return self.run_dir / TORCHELASTIC_DIR


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The trainer's ``status.json`` ({} while there is none, or it cannot be read)."""
    try:
        status = json.loads(RunPaths(run_dir).status.read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def last_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The last complete training record of ``metrics.jsonl``.

    Eval and start records, and a line still being written, are skipped; only the file's tail
    is read, so a long run's log costs the same as a short one's.
    """
    try:
        with RunPaths(run_dir).metrics.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for raw in reversed(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind", "train") == "train":
            return record
    return {}


def write_status(run_dir: str | os.PathLike[str], state: str, **fields: Any) -> None:
    """Replace ``status.json`` atomically (temp file + rename), so a reader never sees half a file.
    ``state`` is running | finished | failed; ``time`` is added."""
    path = RunPaths(run_dir).status
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"state": state, **fields, "time": time.time()}, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def append_record(run_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record (``kind``: start | train | eval) to ``metrics.jsonl`` as one flushed line,
    so a crash loses at most the line being written; ``time`` is added when missing."""
    path = RunPaths(run_dir).metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**record, "time": record.get("time", time.time())}, default=float)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def agent_attempts(log_dir: str | os.PathLike[str]) -> dict[str, int]:
    """The torchrun agents that kept their record in ``log_dir`` (their ``--log-dir``): for each
    agent's directory ``<rendezvous id>_<8 random characters>``, the highest ``attempt_<n>`` in it,
    ``n`` being the restart count torchrun also gives the workers (``TORCHELASTIC_RESTART_COUNT``).
    An agent makes its directory when it first starts its workers, so one that died in the
    rendezvous has none."""
    try:
        agents = [p for p in Path(log_dir).iterdir() if p.is_dir() and len(p.name) > 9 and p.name[-9] == "_"]
    except OSError:
        return {}
    out: dict[str, int] = {}
    for agent in agents:
        try:
            attempts = [int(a.name.removeprefix("attempt_")) for a in agent.iterdir()
                        if a.name.startswith("attempt_") and a.name[8:].isdigit()]
        except OSError:
            continue
        if attempts:
            out[agent.name] = max(attempts)
    return out


def agent_restarts(run_dir: str | os.PathLike[str]) -> int:
    """Worker-group restarts the torchrun agents recorded, whatever program they ran.

    Each agent started with ``--log-dir=<run dir>/torchelastic`` keeps its record there
    (``agent_attempts``). Agents of one incarnation of the job share the rendezvous id, and a
    restart shows on at least one of them, so the job's count is the largest ``n`` per
    rendezvous id, summed over ids (a Slurm requeue starts a new id; its own count is Slurm's).
    """
    most: dict[str, int] = {}
    for agent, attempt in agent_attempts(RunPaths(run_dir).torchelastic).items():
        rdzv_id = agent[:-9]  # tempfile.mkdtemp(prefix=f"{rdzv_id}_"): 8 random characters
        most[rdzv_id] = max(most.get(rdzv_id, 0), attempt)
    return sum(most.values())


def recorded_restarts(run_dir: str | os.PathLike[str]) -> int:
    """The restarts a run directory shows: the torchrun agents' record (any program) or what the
    program itself reported as ``restart_count`` (the bundled trainer, the HF callback: it also
    counts the job's restarts, e.g. Slurm requeues), whichever saw more."""
    reported = [read_status(run_dir).get("restart_count"), last_metrics(run_dir).get("restart_count")]
    program = max((int(v) for v in reported if isinstance(v, (int, float))), default=0)
    return max(program, agent_restarts(run_dir))


def job_restart_count(env: Mapping[str, str] | None = None) -> int:
    """Restarts of the whole job so far: orch's count (``ORCH_RESTART_COUNT``), else Slurm's requeues."""
    source: Mapping[str, str] = os.environ if env is None else env
    for name in (ENV_RESTART_COUNT, SLURM_RESTART_COUNT):
        raw = source.get(name, "").strip()
        if raw.isdigit():
            return int(raw)
    return 0


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """Restarts so far as this process sees them: the job's (orch / Slurm requeue) plus torchrun's
    restarts of this node's workers in it (``TORCHELASTIC_RESTART_COUNT``)."""
    source: Mapping[str, str] = os.environ if env is None else env
    raw = source.get(TORCHELASTIC_RESTART_COUNT, "").strip()
    return job_restart_count(source) + (int(raw) if raw.isdigit() else 0)


def cache_dir() -> Path:
    """Where measured figures persist between processes: ``$ORCH_CACHE_DIR``, else the XDG cache."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "orch"
