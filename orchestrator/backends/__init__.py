"""Finding a backend by name: the built-in packages, then the ``orch.backends`` entry-point group.

A backend is a package with a ``make_backend()`` factory (see base.py for what it returns). The
built-ins are listed here so that a source checkout works without installed metadata; another
package adds a cluster kind by declaring, in its own pyproject.toml::

    [project.entry-points."orch.backends"]
    mycluster = "my_package.backend:make_backend"

Modules are imported on first use only: the kubernetes client alone takes longer to import than
``orch --help`` may take to run.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import UserError, did_you_mean

if TYPE_CHECKING:  # base.py imports the spec; discovery itself stays light
    from .base import Backend

ENTRY_POINT_GROUP = "orch.backends"
BUILTIN: dict[str, str] = {
    "local": "orchestrator.backends.local.backend:make_backend",
    "slurm": "orchestrator.backends.slurm.backend:make_backend",
    "kubernetes": "orchestrator.backends.kubernetes.backend:make_backend",
    "ssh": "orchestrator.backends.ssh.backend:make_backend",
}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every cluster kind orch can use: the built-ins first, then registered ones by name."""
    return [*BUILTIN, *sorted(n for n in _entry_points() if n not in BUILTIN)]


def check_cluster(cluster: str) -> str:
    """``cluster`` if orch has a backend of that name (without importing it), else a UserError."""
    if cluster not in BUILTIN and cluster not in _entry_points():
        raise UserError(f"--cluster {cluster!r}: unknown cluster; {did_you_mean(cluster, backend_names())}")
    return cluster


def _factory(cluster: str) -> Callable[[], Any]:
    if check_cluster(cluster) in BUILTIN:
        module, _, attr = BUILTIN[cluster].partition(":")
        return getattr(importlib.import_module(module), attr)
    return _entry_points()[cluster].load()


def get_backend(cluster: str) -> Backend:
    """The Backend for a cluster kind (its module imported now, not before)."""
    return _factory(cluster)()
