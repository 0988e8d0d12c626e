"""The ``orch`` command line: parse, call one function per command, print. No logic lives here.

Imports of heavy modules (torch, the kubernetes client) happen inside the commands that need
them, so ``orch --help`` and ``orch render`` start in well under half a second.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import BackendNotBuilt, UserError

app = typer.Typer(
    name="orch",
    help="Render, submit and follow multi-node training jobs on a local machine, Slurm or Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ckpt_app = typer.Typer(help="Inspect, verify and consolidate sharded checkpoints.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML file.", show_default=False)]
ClusterOpt = Annotated[str, typer.Option("--cluster", "-c", help="local, slurm or kubernetes.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a spec key: --set nodes=4 --set slurm.partition=gpu (repeatable).")]
JobArg = Annotated[str, typer.Argument(help="Job id (see `orch list`).", show_default=False)]


def _fail(exc: UserError) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", markup=True)
    raise typer.Exit(exc.exit_code)


def _cluster(name: str) -> str:
    from .render import CLUSTERS
    from .errors import did_you_mean

    if name not in CLUSTERS:
        raise UserError(f"--cluster {name!r}: unknown cluster; {did_you_mean(name, CLUSTERS)}")
    return name


def _not_built(what: str, issue: str) -> NoReturn:
    raise BackendNotBuilt(f"`orch {what}` is not built yet: it needs the job registry and a cluster backend "
                          f"({issue}).", hint="`orch render` and `orch check` work today")


@app.command()
def render(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
           output: Annotated[Optional[Path], typer.Option("--output", "-o",
                             help="Write to this file instead of stdout.")] = None) -> None:
    """Print what would be submitted: the sbatch script, the PyTorchJob manifest or the local plan."""
    from .render import render as render_spec
    from .spec import load_spec

    try:
        rendered = render_spec(load_spec(spec, set_), _cluster(cluster))  # type: ignore[arg-type]
    except UserError as exc:
        _fail(exc)
    if output:
        output.write_text(rendered.text, encoding="utf-8")
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(rendered.text)


@app.command()
def check(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
          params: Annotated[Optional[float], typer.Option(
              help="Model parameter count for the memory estimate (e.g. 1.3e9); default from --model.")] = None,
          gpu_memory_gb: Annotated[Optional[float], typer.Option(
              "--gpu-memory-gb", help="GPU memory to compare the estimate against (e.g. 80).")] = None) -> None:
    """Validate the spec and its ds_config for the job's world size; estimate memory per ZeRO stage."""
    from .check import check_job, human_bytes
    from .render import render as render_spec
    from .spec import load_spec

    try:
        job = load_spec(spec, set_)
        render_spec(job, _cluster(cluster))  # rendering is part of the check (templates, quoting)
        report = check_job(job, num_parameters=int(params) if params else None)
    except UserError as exc:
        _fail(exc)
    out.print(f"[bold green]OK[/] {spec}: job {job.name!r}, {job.nodes} node(s) x {job.procs_per_node} "
              f"procs = {report.world_size} ranks ({cluster})", markup=True)
    if report.batch is not None:
        b = report.batch
        out.print(f"batch: train_batch_size {b.train_batch_size} = micro {b.micro} x accumulation "
                  f"{b.gradient_accumulation_steps} x {report.world_size} ranks; precision {report.precision}; "
                  f"ZeRO stage {report.stage}")
    for note in report.notes:
        out.print(f"note: {note}")
    if report.estimates:
        table = Table(title=f"model states per GPU, {report.num_parameters:,} parameters, "
                            f"{report.world_size} ranks ({report.precision})")
        table.add_column("ZeRO stage")
        table.add_column("per GPU", justify="right")
        table.add_column("CPU per rank", justify="right")
        if gpu_memory_gb:
            table.add_column(f"fits {gpu_memory_gb:g} GB")
        for est in report.estimates:
            row = [f"{est.stage}{' (configured)' if est.stage == report.stage else ''}",
                   human_bytes(est.gpu_bytes), human_bytes(est.cpu_bytes)]
            if gpu_memory_gb:
                row.append("yes" if est.gpu_bytes < gpu_memory_gb * 1e9 else "no")
            table.add_row(*row)
        out.print(table)
        out.print("(model states only: activations, buffers and fragmentation come on top)")


@app.command()
def doctor() -> None:
    """Report what this machine can run: torch, CUDA/NCCL/gloo, Triton kernels, Slurm, Kubernetes, Helm."""
    from .doctor import run_probes

    probes = run_probes()
    table = Table(title="orch doctor")
    for col in ("component", "status", "detail"):
        table.add_column(col)
    for p in probes:
        status = "[green]OK[/]" if p.ok else ("[yellow]MISSING[/]" if p.optional else "[red]MISSING[/]")
        table.add_row(p.name, status, p.detail)
    out.print(table)
    if any(not p.ok and not p.optional for p in probes):
        raise typer.Exit(1)


@app.command()
def submit(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
           wait: Annotated[bool, typer.Option(help="Wait until the job finishes.")] = False,
           follow: Annotated[bool, typer.Option(help="Show a live view until the job finishes.")] = False) -> None:
    """Submit a job to a cluster and record it in the registry."""
    try:
        _cluster(cluster)
        _not_built("submit", "local: issue 5, slurm: issue 6, kubernetes: issue 7")
    except UserError as exc:
        _fail(exc)


@app.command()
def status(job: JobArg,
           metrics: Annotated[bool, typer.Option(help="Also show the latest training metrics.")] = False) -> None:
    """Show a job's state, restarts and progress."""
    try:
        _not_built("status", "issue 5")
    except UserError as exc:
        _fail(exc)


@app.command(name="list")
def list_jobs(all_: Annotated[bool, typer.Option("--all", "-a", help="Include finished jobs.")] = False) -> None:
    """List submitted jobs."""
    try:
        _not_built("list", "issue 5")
    except UserError as exc:
        _fail(exc)


@app.command()
def logs(job: JobArg, follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
         node: Annotated[Optional[str], typer.Option(help="Only this node's log.")] = None) -> None:
    """Print (or follow) a job's logs."""
    try:
        _not_built("logs", "issue 5")
    except UserError as exc:
        _fail(exc)


@app.command()
def cancel(job: JobArg) -> None:
    """Cancel a job and everything it started."""
    try:
        _not_built("cancel", "issue 5")
    except UserError as exc:
        _fail(exc)


@ckpt_app.command("ls")
def ckpt_ls(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")]) -> None:
    """List checkpoints: step, world size, ZeRO stage, size, complete or not."""
    try:
        _not_built("ckpt ls", "issue 4")
    except UserError as exc:
        _fail(exc)


@ckpt_app.command("verify")
def ckpt_verify(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")]) -> None:
    """Verify every shard's checksum against the manifest."""
    try:
        _not_built("ckpt verify", "issue 4")
    except UserError as exc:
        _fail(exc)


@ckpt_app.command("consolidate")
def ckpt_consolidate(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
                     output: Annotated[Path, typer.Argument(help="Output file (.pt or .safetensors).")]) -> None:
    """Write one fp32 state_dict loadable into the plain model, streaming parameter by parameter."""
    try:
        _not_built("ckpt consolidate", "issue 4")
    except UserError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry point
    app()
