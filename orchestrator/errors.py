"""User-facing errors.

Everything a user can get wrong (a spec key, a file path, a cluster that refuses a job) is
raised as a ``UserError``; the CLI prints its message and exits with ``exit_code`` instead of
showing a traceback. Programming errors stay ordinary exceptions so they are never hidden.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix; ``str()`` says what, where and how."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to ``word`` (for 'did you mean ...?' messages), or None."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean `x`?)' or, when nothing is close, the list of valid names."""
    pool = sorted(candidates)
    near = closest(word, pool)
    if near:
        return f"did you mean `{near}`?"
    return "valid keys: " + ", ".join(pool)
