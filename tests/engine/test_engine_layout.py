"""engine/ is a DeepSpeed-compatible library with the bundled trainer beside it, never under it."""
from __future__ import annotations

import subprocess
import sys

from tests.shared_env import REPO


def test_the_library_never_imports_the_bundled_trainer() -> None:
    library = [p for p in (REPO / "engine").rglob("*.py")
               if "trainer" not in p.relative_to(REPO / "engine").parts and p.name != "train.py"]
    offenders = [str(p.relative_to(REPO)) for p in library
                 if any(line.lstrip().startswith(("from engine.trainer", "import engine.trainer", "from .trainer",
                                                  "from ..trainer"))
                        for line in p.read_text().splitlines())]
    assert not offenders, f"the engine library must not import engine.trainer: {offenders}"


def test_the_run_contract_and_the_error_root_need_only_the_standard_library() -> None:
    code = ("import sys, engine.run_contract, engine.errors, engine.log\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'pydantic', 'rich'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_m_engine_train_is_the_thin_entry_to_the_trainer() -> None:
    out = subprocess.run([sys.executable, "-m", "engine.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m engine.train")
