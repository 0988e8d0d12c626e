"""Every command example in README.md and docs/*.md runs, as Typer's own docs test their tutorials.

What runs, and how:

- every line of a ```bash block (continuation lines joined), one at a time with bash, in a
  scratch directory that has the repository's ``examples/``, ``charts/``, ``docs/`` and ``bench/``, with
  ``ORCH_HOME`` pointing at a scratch home shared by this module's tests;
- ``JOB_ID`` stands for the quick-start job (README's ``orch submit examples/tiny-gpt-zero2.yaml
  --cluster local --follow``, run once by a fixture: the same command elsewhere reuses it,
  because it is a 30 s job on 2 cores) and ``~/.orch`` for ``$ORCH_HOME``;
- rewrites, each for a reason: install steps (venv, activate, pip) are dropped because the tests
  run in the installed environment; ``orch submit ... --cluster slurm|kubernetes`` becomes
  ``orch render`` (no cluster here; the slurm and kubernetes tiers submit for real);
  ``helm install|template`` renders the chart with a helm binary or helm-python-sdk and
  validates the values against the chart's schema;
- skipped, with the reason shown: ``python -m pytest`` (this suite), ``python -m bench all``
  (minutes of benchmarks), ``kubectl`` (needs a cluster running the training operator),
  ``orch plot`` without matplotlib, ``orch ckpt`` while the engine cannot save checkpoints;
- ``orch ...`` lines in other code blocks and ``orch ...`` inline code: the command exists
  (``orch <command> --help`` exits 0).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.shared_env import REPO
from tests.trainer_runs import clean_env

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
QUICKSTART = "orch submit examples/tiny-gpt-zero2.yaml --cluster local --follow"
INSTALL_STEPS = ("python3 -m venv", "python -m venv", ". .venv/bin/activate", "source .venv/bin/activate",
                 "pip install", "python -m pip install")
SKIPPED = {
    "python -m pytest": "the test suite itself",
    "python3 -m pytest": "the test suite itself",
    "python -m bench all": "runs every benchmark (minutes); `python -m bench list` is run instead",
    "kubectl ": "needs a Kubernetes cluster running the Kubeflow training operator",
    "tensorboard ": "starts a server",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # where the fence opens (1-based)
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^```\s*([\w+-]*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number, []
        elif line.strip() == "```" and lang is not None:
            blocks.append(Block(path, start, lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def commands(block: Block) -> list[str]:
    """Command lines of a bash block: continuations joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


BASH_BLOCKS = [b for p in DOC_FILES for b in code_blocks(p) if b.lang in ("bash", "sh", "shell")]


# -- the scratch workspace and the quick-start job --------------------------------------------

@dataclass
class Workspace:
    cwd: Path
    home: Path
    job_id: str | None = None
    quickstart: subprocess.CompletedProcess | None = None

    def env(self) -> dict[str, str]:
        return clean_env(ORCH_HOME=str(self.home), COLUMNS="200")

    def run(self, command: str, timeout: int = 240) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=self.cwd, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("docs")
    cwd = root / "work"
    cwd.mkdir()
    for name in ("examples", "charts", "docs", "bench"):
        (cwd / name).symlink_to(REPO / name)
    ws = Workspace(cwd, root / "orch-home")
    ws.quickstart = ws.run(QUICKSTART, timeout=420)
    match = re.search(r"submitted (\S+) to local", ws.quickstart.stdout)
    ws.job_id = match.group(1) if match else None
    return ws


# -- turning a documented command into what the test runs --------------------------------------

@dataclass(frozen=True)
class Step:
    command: str | None      # None: not run
    note: str = ""           # why it was rewritten or skipped
    helm: list[str] | None = None


def plan(command: str) -> list[Step]:
    steps = []
    for part in (p.strip() for p in command.split(" && ")):
        if part.startswith(INSTALL_STEPS):
            steps.append(Step(None, f"{part!r}: installing; the tests run in the installed environment"))
            continue
        reason = next((why for prefix, why in SKIPPED.items() if part.startswith(prefix)), None)
        if reason:
            steps.append(Step(None, f"{part!r}: {reason}"))
        elif part == QUICKSTART:
            steps.append(Step("true", "the quick-start job, run once by the workspace fixture"))
        elif part.startswith("helm "):
            steps.append(Step(None, "", helm=shlex.split(part)))
        else:
            steps.append(_orch_step(part))
    return steps


def _orch_step(part: str) -> Step:
    words = shlex.split(part)
    if words[:2] == ["orch", "submit"] and _cluster(words) in ("slurm", "kubernetes"):
        kept = [w for w in words[2:] if w not in ("--follow", "--wait", "--no-follow", "--no-wait")]
        return Step(shlex.join(["orch", "render", *kept]),
                    f"no {_cluster(words)} cluster in this test: rendered instead of submitted")
    if words[:2] == ["orch", "plot"] and importlib.util.find_spec("matplotlib") is None:
        return Step(None, f"{part!r}: matplotlib is not installed (pip install 'orch[plot]')")
    if words[:2] == ["orch", "ckpt"] and not _engine_saves_checkpoints():
        return Step(None, f"{part!r}: Engine.save_checkpoint is not wired into the engine yet, so the "
                          "quick-start job has no checkpoints")
    return Step(part)


def _cluster(words: list[str]) -> str:
    for i, w in enumerate(words):
        if w in ("--cluster", "-c") and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--cluster="):
            return w.split("=", 1)[1]
    return "local"


def _engine_saves_checkpoints() -> bool:
    from engine.engine import Engine

    return hasattr(Engine, "save_checkpoint")


def substitute(command: str, ws: Workspace) -> str:
    if "JOB_ID" in command:
        assert ws.job_id, f"the quick-start job was not submitted:\n{ws.quickstart.stdout}{ws.quickstart.stderr}"
        command = command.replace("JOB_ID", ws.job_id)
    return command.replace("~/.orch", str(ws.home))


# -- the tests --------------------------------------------------------------------------------

def test_the_docs_have_command_examples():
    files = {b.path.name for b in BASH_BLOCKS}
    assert {"README.md", "quickstart.md", "observability.md", "slurm.md", "kubernetes.md", "ds_config.md",
            "checkpoints.md", "troubleshooting.md"} <= files
    assert any(QUICKSTART in b.text for b in BASH_BLOCKS if b.path.name == "README.md")


@pytest.mark.slow
def test_the_quickstart_job_succeeds(workspace):
    result = workspace.quickstart
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert workspace.job_id and f"job {workspace.job_id}: SUCCEEDED" in result.stdout
    records = [json.loads(line) for line in
               (workspace.home / "runs" / workspace.job_id / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert train[-1]["step"] == 60 and train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.id)
def test_bash_example_runs(block: Block, workspace: Workspace):
    ran, notes = 0, []
    for command in commands(block):
        for step in plan(command):
            if step.note:
                notes.append(step.note)
            if step.helm is not None:
                notes.append(_run_helm(step.helm, workspace))
                ran += 1
                continue
            if step.command is None:
                continue
            if step.command == "true":  # the quick-start job: its outcome is what this line shows
                assert workspace.quickstart.returncode == 0, workspace.quickstart.stdout[-3000:]
                ran += 1
                continue
            result = workspace.run(substitute(step.command, workspace))
            assert result.returncode == 0, (f"{block.id}: `{step.command}` exited {result.returncode}\n"
                                            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
            ran += 1
    if ran == 0:
        pytest.skip("; ".join(notes))


def _run_helm(words: list[str], ws: Workspace) -> str:
    """``helm install|template RELEASE CHART [-f FILE]...``: schema-check the values, then render."""
    import jsonschema

    assert words[1] in ("install", "template"), f"unexpected helm command {shlex.join(words)}"
    release, chart = words[2], ws.cwd / words[3]
    files = [ws.cwd / words[i + 1] for i, w in enumerate(words) if w in ("-f", "--values")]
    values = yaml.safe_load((chart / "values.yaml").read_text())
    given: dict = {}
    for f in files:
        given = _merge(given, yaml.safe_load(f.read_text()))
    jsonschema.validate(_merge(values, given), json.loads((chart / "values.schema.json").read_text()))
    binary = os.environ.get("ORCH_HELM") or shutil.which("helm")
    if binary:
        out = subprocess.run([binary, "template", release, str(chart), *sum((["-f", str(f)] for f in files), [])],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    elif importlib.util.find_spec("helm_python") is not None:
        import helm_python

        with helm_python.Chart.load(str(chart)) as loaded:
            texts = loaded.render(given, name=release, namespace="default")
        rendered = [d for path, text in texts.items() if path.endswith(".yaml")
                    for d in yaml.safe_load_all(text) if d]
    else:
        return "helm: values checked against the chart's schema; not rendered (no helm binary or helm-python-sdk)"
    job = next(d for d in rendered if d["kind"] == "PyTorchJob")
    assert job["metadata"]["name"] == (given.get("name") or release)
    return "helm: rendered instead of installed (no cluster in this test)"


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _mentioned_commands() -> dict[tuple[str, ...], str]:
    """Every `orch <command>` mentioned in inline code or non-bash code blocks -> where."""
    found: dict[tuple[str, ...], str] = {}
    pattern = re.compile(r"\borch ((?:--?[\w-]+|[a-z][\w-]*)(?:\|[a-z][\w-]*)*)(?: ([a-z][\w-]*(?:\|[a-z][\w-]*)*))?")
    for path in DOC_FILES:
        text = path.read_text()
        pieces = re.findall(r"`([^`\n]+)`", text)
        pieces += [b.text for b in code_blocks(path)
                   if b.lang not in ("bash", "sh", "shell", "python", "json", "yaml")]
        for piece in pieces:
            for first, second in pattern.findall(piece):
                for name in first.split("|"):
                    key = (name, *second.split("|")[:1]) if name == "ckpt" and second else (name,)
                    if name == "ckpt" and second:
                        for sub in second.split("|"):
                            found.setdefault((name, sub), path.name)
                    else:
                        found.setdefault(key, path.name)
    return found


def test_every_orch_command_the_docs_mention_exists():
    from typer.testing import CliRunner

    from orchestrator.cli import app

    mentioned = _mentioned_commands()
    assert ("plot",) in mentioned and ("ckpt", "consolidate") in mentioned and ("submit",) in mentioned
    runner = CliRunner()
    missing = {}
    for words, where in sorted(mentioned.items()):
        args = list(words) if words[0].startswith("-") else [*words, "--help"]
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            missing[" ".join(words)] = where
    assert not missing, f"documented commands that `orch` does not have: {missing}"
