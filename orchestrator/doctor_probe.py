"""One row of ``orch doctor``: what a probe found (shared by the report and the probes of
doctor_clusters.py and doctor_storage.py, so neither imports the report)."""
from __future__ import annotations

from dataclasses import dataclass


NO_CONFIG = "NO CONFIG"        # installed, but nothing says which cluster to use
UNREACHABLE = "UNREACHABLE"    # installed and configured, but the cluster does not answer


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str
    optional: bool = False   # a missing optional piece (e.g. helm) does not fail the report
    problem: str = "MISSING"  # the status word when not ok: MISSING, NO_CONFIG or UNREACHABLE

    @property
    def status(self) -> str:
        return "OK" if self.ok else self.problem
