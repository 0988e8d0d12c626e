"""The shape of the code, checked: no import cycles, short functions, a CLI that starts without
torch or the kubernetes client, and a backend that another package adds without touching orch.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import launch
from orchestrator.backends import BUILTIN, ENTRY_POINT_GROUP
from orchestrator.backends.base import Backend, RunDirBackend
from orchestrator.spec import JobSpec
from orchestrator.types import JobRef, JobState, JobStatus, Placement, Rendered
from tests.cli_process import run_orch
from tests.shared_env import REPO

MAX_FUNCTION_LINES = 60


# --- the import graph ----------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs (at module level or in a function); ``if TYPE_CHECKING:`` blocks
    are for annotations and never run, so they are left out."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                found += _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        found += _imports(node)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & known
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import submodule` imports the submodule; `from pkg import name` the package
    return {f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names} & known


def import_graph(packages: tuple[str, ...] = ("orchestrator", "engine")) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports."""
    paths = {_module_name(p): p for pkg in packages for p in (REPO / pkg).rglob("*.py")}
    known = set(paths)
    return {module: {t for node in _imports(ast.parse(path.read_text(encoding="utf-8")))
                     for t in _targets(node, module, path.name == "__init__.py", known)} - {module}
            for module, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = stack[stack.index(node):]
                del stack[stack.index(node):]
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_the_cycle_finder_finds_a_cycle_held_by_a_function_level_import(tmp_path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .render import x\n")
    (node,) = _imports(tree)
    assert _targets(node, "orchestrator.spec", False, {"orchestrator.render"}) == {"orchestrator.render"}


def test_no_import_cycle_among_orchestrator_and_engine_modules() -> None:
    graph = import_graph()
    assert "orchestrator.backends.kubernetes.render" in graph  # the walk sees the packages
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (each group imports itself, possibly through a function-level " \
                       "import): " + "; ".join(" <-> ".join(group) for group in cycles)


def test_engine_imports_nothing_of_orchestrator_and_types_nothing_at_all() -> None:
    graph = import_graph()
    assert not {m: sorted(t) for m, t in graph.items() if m.startswith("engine") and
                any(x.startswith("orchestrator") for x in t)}
    assert graph["orchestrator.types"] == set()


# --- function length -----------------------------------------------------------------------------

def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function longer than ``limit`` outside bench/."""
    out = []
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        path = REPO / rel
        if rel.startswith("bench/") or not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > limit:
                    out.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_outside_bench_is_longer_than_sixty_lines() -> None:
    too_long = long_functions()
    assert not too_long, f"split these (at most {MAX_FUNCTION_LINES} lines a function): " + ", ".join(too_long)


# --- CLI start-up --------------------------------------------------------------------------------

def test_orch_help_imports_neither_torch_nor_kubernetes_and_starts_in_half_a_second() -> None:
    result = run_orch("--help")
    assert result.returncode == 0, result.stderr  # run_orch fails if torch or kubernetes was imported
    orch = Path(sys.executable).with_name("orch")
    argv = [str(orch)] if orch.exists() else [sys.executable, "-m", "orchestrator"]
    # CPU time of the command, best of three: on a machine shared with other jobs the wall clock
    # measures the queue for the cores; the CPU time is what `orch --help` itself costs
    costs = []
    for _ in range(3):
        proc = subprocess.Popen([*argv, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        costs.append(usage.ru_utime + usage.ru_stime)
    assert min(costs) < 0.5, f"`orch --help` used {min(costs):.2f} s of CPU (goal < 0.5 s)"


# --- a backend from another package ----------------------------------------------------------------

class ToyRender:
    """The toy cluster's render module: a shell script that runs the job's program on this machine
    with the environment every backend gives it (shared helpers from orchestrator.launch)."""

    @staticmethod
    def placement(spec: JobSpec, run_dir: str, job_token: str) -> Placement:
        return launch.run_dir_placement(spec, run_dir, sys.executable, job_token)

    @staticmethod
    def render(spec: JobSpec, placement: Placement) -> Rendered:
        env = launch.job_environment(spec, placement)
        lines = ["#!/bin/sh", f"# toy job {shlex.quote(spec.name)}",
                 *(f"export {key}={shlex.quote(value)}" for key, value in env.items()),
                 shlex.join([placement.python, *launch.program_argv(spec, placement)])]
        return Rendered("toy", "script", "toy.sh", "\n".join(lines) + "\n", launch.side_files(spec), placement)


class ToyBackend(RunDirBackend):
    """Runs the script in the background; its exit status, written beside it, is the job's state."""

    cluster = "toy"
    renderer = ToyRender  # type: ignore[assignment]

    def schedule(self, rendered: Rendered) -> JobRef:
        submission, spec = self.submission_of(rendered)
        run = self.write_run_files(rendered)
        script, log, code = (shlex.quote(str(run / name)) for name in ("toy.sh", "logs/node-0.log", "exit_code"))
        proc = subprocess.Popen(["sh", "-c", f"sh {script} > {log} 2>&1; echo $? > {code}"], cwd=spec.base_dir,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        return JobRef(submission.job_id, self.cluster, f"pid:{proc.pid}", submission.run_dir)

    def status(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        out = {}
        for ref in refs:
            path = Path(ref.run_dir, "exit_code")
            code = path.read_text().strip() if path.exists() else ""
            if not code:
                out[ref.job_id] = JobStatus(JobState.RUNNING, "toy job running")
            else:
                out[ref.job_id] = JobStatus(JobState.SUCCEEDED if code == "0" else JobState.FAILED, f"exit {code}")
        return out

    def logs(self, ref: JobRef, *, follow: bool = False, node: str | None = None):  # type: ignore[no-untyped-def]
        log = Path(ref.run_dir, "logs", "node-0.log")
        return self.follow_logs(lambda: {"node-0": log}, prefixed=node is None,
                                keep_going=None if not follow else
                                (lambda: not self.status([ref])[ref.job_id].state.finished))

    def cancel(self, ref: JobRef) -> None:
        try:
            os.killpg(int(ref.native_id.removeprefix("pid:")), signal.SIGTERM)
        except ProcessLookupError:
            pass


def make_toy_backend() -> ToyBackend:
    return ToyBackend()


@pytest.fixture
def toy_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution that declares the toy backend in the ``orch.backends`` group, on sys.path
    (what `pip install` of a package with that entry point leaves behind)."""
    site = tmp_path / "site"
    info = site / "orch_toy_backend-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orch-toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = {__name__}:make_toy_backend\n")
    monkeypatch.syspath_prepend(str(site))
    job = tmp_path / "job"
    job.mkdir()
    (job / "hello.py").write_text("import os, sys\nprint('hello from', os.environ['ORCH_JOB_NAME'], *sys.argv[1:])\n")
    (job / "job.yaml").write_text("name: toy-job\nprogram: hello.py\nargs: [\"it's\", \"$HOME\"]\n")
    return job / "job.yaml"


def test_a_fourth_backend_is_unknown_until_its_package_registers_it(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: toy-job\n")
    result = CliRunner().invoke(_app(), ["render", str(spec), "--cluster", "toy"])
    assert result.exit_code == 2 and "unknown cluster" in result.output
    assert "toy" not in BUILTIN


def test_a_backend_registered_by_entry_point_renders_submits_and_reports(toy_installed: Path) -> None:
    from orchestrator.backends import backend_names, get_backend

    runner, app = CliRunner(), _app()
    assert "toy" in backend_names() and isinstance(get_backend("toy"), Backend)
    shown = runner.invoke(app, ["render", str(toy_installed), "--cluster", "toy"])
    assert shown.exit_code == 0, shown.output
    assert "export ORCH_JOB_NAME=toy-job" in shown.output
    assert shlex.join(["hello.py", "it's", "$HOME"]) in shown.output

    submitted = runner.invoke(app, ["submit", str(toy_installed), "--cluster", "toy", "--wait"])
    assert submitted.exit_code == 0, submitted.output
    job_id = re.search(r"submitted (\S+) to toy", submitted.output).group(1)
    assert f"job {job_id}: SUCCEEDED" in submitted.output
    logs = runner.invoke(app, ["logs", job_id])
    assert logs.output.strip() == "[node-0] hello from toy-job it's $HOME"
    status = runner.invoke(app, ["status", job_id])
    assert status.output.startswith(f"{job_id}  toy  SUCCEEDED")


def _app():  # type: ignore[no-untyped-def]
    from orchestrator.cli import app

    return app
