"""``python -m engine.train``: the program every orch job runs (the bundled trainer).

A thin entry point: the trainer itself lives in ``engine/trainer/`` (loop.py runs it), so the
module name jobs, docs and DeepSpeed-style launch lines use stays ``engine.train``.
"""
from __future__ import annotations

from engine.trainer.loop import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
