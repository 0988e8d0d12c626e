"""The root of the engine's user errors, and the one "did you mean" every message uses.

A mistake a user can fix (a ds_config key, a data file, a model name, a launcher environment,
a checkpoint that cannot be loaded, a trainer flag) raises a subclass of ``UserError``.
``python -m engine.train`` prints its message and exits with ``exit_code``; ``orch``'s errors are
this same class (orchestrator/errors.py), so its CLI catches the engine's too. Each subclass also keeps the builtin base it always had (``ConfigError``
is a ``ValueError``, ``UnknownPreset`` a ``KeyError`` ...), so existing ``except`` clauses
still match. Programming errors stay ordinary exceptions so they are never hidden.

Standard library only: ``engine.config`` (torch-free) and ``orch`` import this.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's own default: 'stage' ~ 'stgae' and 'slurm' ~ 'slrum' match, 'lr' ~ 'eps' does not.
CLOSE_MATCH_CUTOFF = 0.6


class UserError(Exception):
    """A mistake the user can fix; ``str()`` says what, where and how (and ``hint``, the fix)."""

    exit_code = 2

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


def closest(word: str, candidates: Iterable[str], *, cutoff: float = CLOSE_MATCH_CUTOFF) -> str | None:
    """The candidate nearest to ``word`` (for "did you mean ...?"), or None when nothing is close.

    Beyond difflib's similarity, a candidate that differs only in case, ``_`` or ``-`` matches
    (``stage3MaxLiveParameters`` -> ``stage3_max_live_parameters``), however long the name.
    """
    pool = [c for c in candidates if isinstance(c, str)]
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if matches:
        return matches[0]
    normalised = {_normalise(c): c for c in pool}
    return normalised.get(_normalise(word))


def _normalise(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()
