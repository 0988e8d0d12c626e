"""Which monitoring clients a ds_config can ask for, and whether this environment has them.

Standard library only: ``orch doctor`` reports these without importing torch, and the engine
uses the same table to name the extra to install when a client is missing.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Client:
    """One optional monitoring client: its ds_config section, the module it needs, orch's extra."""

    section: str
    module: str
    extra: str
    what: str

    @property
    def install_hint(self) -> str:
        return f"pip install 'orch[{self.extra}]' (or pip install {self.module})"

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str | None:
        """The installed distribution's version, or None when the module is not installed."""
        if not self.installed():
            return None
        from importlib import metadata

        try:
            return metadata.version(self.module.replace("_", "-"))
        except metadata.PackageNotFoundError:
            return "unknown version"


CLIENTS: tuple[Client, ...] = (
    Client("wandb", "wandb", "wandb", "Weights & Biases runs"),
    Client("comet", "comet_ml", "comet", "Comet experiments"),
    Client("tensorboard", "tensorboard", "tensorboard", "TensorBoard event files"),
)


def client(section: str) -> Client:
    for c in CLIENTS:
        if c.section == section:
            return c
    raise KeyError(section)


def missing_client_message(section: str) -> str:
    """The one warning a run prints when its ds_config enables a client that is not installed."""
    c = client(section)
    return (f"{section}.enabled is set but the {c.module} package is not installed, so no {c.what} are "
            f"written; install it with {c.install_hint}. Training goes on without it.")
