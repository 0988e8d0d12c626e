"""``orch`` run in a fresh interpreter, to check what a command imports (the CLI must start fast:
``orch --help``, ``orch render`` and ``orch ckpt`` never pay for torch or the kubernetes client)."""
from __future__ import annotations

import subprocess
import sys


def run_orch(*argv: str, must_not_import: tuple[str, ...] = ("torch", "kubernetes")) -> subprocess.CompletedProcess:
    """``orch ARGV`` in a new Python process. It exits non-zero when the command fails or when it
    imported any module of ``must_not_import`` (the AssertionError on stderr names them)."""
    code = (f"import sys; sys.argv = ['orch', *{list(argv)!r}]\n"
            "from orchestrator.cli import app\n"
            "try: app()\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            f"bad = [m for m in {list(must_not_import)!r} if m in sys.modules]\n"
            "assert not bad, bad\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
