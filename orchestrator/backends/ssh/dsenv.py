"""DeepSpeed's ``.deepspeed_env``: ``KEY=VALUE`` lines exported to every host of a multi-node job.

As in DeepSpeed's launcher, the file is named by ``$DS_ENV_FILE`` (default ``.deepspeed_env``)
and read from the home directory, then from the working directory (the later one wins per key);
the value is everything after the first ``=``. Unlike DeepSpeed, blank lines and ``#`` comments
are allowed and a malformed line is an error naming its line number, not a crash.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import UserError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# what DeepSpeed's runner forwards from the launching shell (EXPORT_ENVS + the CUDA accelerator's)
DEEPSPEED_EXPORT_PREFIXES = ("NCCL", "PYTHON", "MV2", "UCX", "MLFLOW")


def parse_env_file(text: str, source: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key.removeprefix("export ").strip()
        if not sep or not ENV_NAME.match(key):
            raise UserError(f"{source}:{number}: {line!r} is not KEY=VALUE",
                            hint="one variable a line, e.g. NCCL_IB_DISABLE=1")
        env[key] = _unquote(value.strip())
    return env


def _unquote(value: str) -> str:
    """``"a b"`` or ``'a b'`` -> ``a b`` (one level of matching quotes, as a shell would read it)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def deepspeed_env_files(workdir: Path) -> list[Path]:
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    candidates = [Path.home() / name, workdir / name] if not os.path.isabs(name) else [Path(name)]
    seen, found = set(), []
    for path in candidates:
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)
    return found


def deepspeed_env(workdir: Path) -> dict[str, str]:
    """The variables of every ``.deepspeed_env`` that applies, home first, working directory last."""
    env: dict[str, str] = {}
    for path in deepspeed_env_files(workdir):
        env.update(parse_env_file(path.read_text(encoding="utf-8", errors="replace"), str(path)))
    return env


def launcher_exports(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launching shell's variables DeepSpeed forwards to remote hosts (NCCL_*, PYTHON*, ...)."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(DEEPSPEED_EXPORT_PREFIXES)}
