"""User-facing errors.

Everything a user can get wrong (a spec key, a file path, a cluster that refuses a job) is
raised as a ``UserError``; the CLI prints its message and exits with ``exit_code`` instead of
showing a traceback. Programming errors stay ordinary exceptions so they are never hidden.

``UserError`` and ``closest`` are the engine's (engine/errors.py, standard library only): one
root for every user mistake, the ds_config's and the trainer's included, and one rule for
"did you mean".
"""
from __future__ import annotations

from collections.abc import Iterable

from engine.errors import UserError, closest

__all__ = ["UserError", "closest", "did_you_mean"]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' or, when nothing is close, the list of valid names."""
    pool = sorted(candidates)
    near = closest(word, pool)
    if near:
        return f"did you mean `{near}`?"
    return "valid keys: " + ", ".join(pool)
