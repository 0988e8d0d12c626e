"""The distribution ships every package, the templates and the chart."""
from __future__ import annotations

import tomllib

from setuptools import find_packages

from tests.shared_env import REPO


def test_every_python_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(REPO), include=["orchestrator*", "engine*"]))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_templates_are_found_from_the_installed_package() -> None:
    from orchestrator.launch import templates_dir

    assert (templates_dir() / "slurm" / "job.sbatch.j2").is_file()
    assert (templates_dir() / "kubernetes" / "pytorchjob.yaml.j2").is_file()


def test_templates_are_found_in_a_source_checkout_without_the_installed_package(monkeypatch) -> None:
    """A clone run with PYTHONPATH=. has no orch_templates package; the checkout's templates/ serve."""
    import sys

    from orchestrator.launch import templates_dir

    monkeypatch.setitem(sys.modules, "orch_templates", None)  # importing it now fails
    assert templates_dir() == REPO / "templates"


def test_engine_does_not_import_orchestrator() -> None:
    offenders = [p.relative_to(REPO) for p in (REPO / "engine").rglob("*.py")
                 if any(line.lstrip().startswith(("import orchestrator", "from orchestrator"))
                        for line in p.read_text().splitlines())]
    assert not offenders, f"engine/ must not import orchestrator/: {offenders}"
