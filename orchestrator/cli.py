"""The ``orch`` command line: parse, call one function per command, print. No logic lives here.

Imports of heavy modules (torch, the kubernetes client) happen inside the commands that need
them, so ``orch --help`` and ``orch render`` start in well under half a second.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import UserError

app = typer.Typer(
    name="orch",
    help="Render, submit and follow multi-node training jobs on a local machine, ssh hosts, Slurm or Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ckpt_app = typer.Typer(help="Inspect, verify and consolidate sharded checkpoints.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML file.", show_default=False)]
ClusterOpt = Annotated[str, typer.Option("--cluster", "-c", help="local, ssh, slurm or kubernetes.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a spec key: --set nodes=4 --set slurm.partition=gpu (repeatable).")]
JobArg = Annotated[str, typer.Argument(help="Job id (see `orch list`).", show_default=False)]


def _grad_accum_words(report: Any) -> str:
    """", gradients summed in fp32" for bf16/fp16 jobs (data_types.grad_accum_dtype)."""
    return "" if report.precision == "fp32" else f", gradients summed in {report.grad_accum_dtype}"


def _fail(exc: UserError) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", markup=True)
    raise typer.Exit(exc.exit_code)


def _cluster(name: str) -> str:
    from .backends import check_cluster

    return check_cluster(name)


@app.command()
def render(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
           output: Annotated[Optional[Path], typer.Option("--output", "-o",
                             help="Write to this file instead of stdout.")] = None,
           output_dir: Annotated[Optional[Path], typer.Option(
               "--output-dir", help="Write everything a submit sends (the script or manifest and its "
                                    "side files) into this directory.")] = None) -> None:
    """Print what would be submitted: the sbatch script, the PyTorchJob manifest or the local plan.

    This is the backend's dryrun, the same one ``orch submit`` sends; the files that travel with
    it (ds_config.json, and on Kubernetes the ConfigMap's job.json) are named on stderr.
    """
    from .backends import get_backend
    from .spec_report import load_spec_reporting_all as load_spec

    try:
        rendered = get_backend(_cluster(cluster)).dryrun(load_spec(spec, set_))
    except UserError as exc:
        _fail(exc)
    if output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, text in {rendered.filename: rendered.text, **rendered.files}.items():
            (output_dir / name).write_text(text, encoding="utf-8")
        err.print(f"wrote {', '.join([rendered.filename, *rendered.files])} to {output_dir}")
        return
    if output:
        output.write_text(rendered.text, encoding="utf-8")
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(rendered.text)
    if rendered.files:
        err.print(f"sent with it: {', '.join(rendered.files)} (`--output-dir DIR` writes them too)")


@app.command()
def check(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
          params: Annotated[Optional[float], typer.Option(
              help="Model parameter count for the memory estimate (e.g. 1.3e9); default from --model.")] = None,
          gpu_memory_gb: Annotated[Optional[float], typer.Option(
              "--gpu-memory-gb", help="GPU memory to compare the estimate against (e.g. 80).")] = None,
          lenient: Annotated[bool, typer.Option(
              help="Unknown ds_config keys DeepSpeed ignores become notes (near-typos stay errors).")] = False,
          autotune: Annotated[bool, typer.Option(
              help="Answer the ds_config's autotuning section (ZeRO stage, offload, micro-batch) from the "
                   "memory estimate, without trials.")] = False,
          simulate: Annotated[bool, typer.Option(
              help="Run the engine for one step as rank 0 of the job's world (fake process group, NCCL plan) "
                   "and print what one GPU holds and moves, with a verdict against --gpu-memory-gb "
                   "(default 80).")] = False,
          preset: Annotated[Optional[str], typer.Option(
              help="With --simulate: the bundled model preset to simulate (default: the trainer's --model; "
                   "needed for a job's own program).")] = None) -> None:
    """Validate the spec and its ds_config for the job's world size; estimate memory per ZeRO stage."""
    from .backends import get_backend
    from .check import check_job
    from .spec_report import load_spec_reporting_all as load_spec, run_all

    try:
        job = load_spec(spec, set_)
        backend = get_backend(_cluster(cluster))
        _, report = run_all(  # rendering is part of the check (templates, quoting); both report
            lambda: backend.dryrun(job),
            lambda: check_job(job, num_parameters=int(params) if params else None,
                              gpu_memory_bytes=gpu_memory_gb * 1e9 if gpu_memory_gb else None,
                              lenient=lenient, autotune=autotune))
        if autotune:
            from .autotune import answer_for_report

            report.autotune = answer_for_report(report, gpu_memory_gb * 1e9 if gpu_memory_gb else None)
    except UserError as exc:
        _fail(exc)
    out.print(f"[bold green]OK[/] {spec}: job {job.name!r}, {job.nodes} node(s) x {job.procs_per_node} "
              f"procs = {report.world_size} ranks ({cluster})", markup=True)
    if report.batch is not None:
        b = report.batch
        out.print(f"batch: train_batch_size {b.train_batch_size} = micro {b.micro} x accumulation "
                  f"{b.gradient_accumulation_steps} x {report.world_size} ranks; precision {report.precision}"
                  f"{_grad_accum_words(report)}; "
                  f"ZeRO stage {report.stage}")
    for note in report.notes:
        out.print(f"note: {note}")
    if report.autotune is not None:
        out.print(f"autotune: {report.autotune.summary()}")
        for fit in report.autotune.candidates:
            out.print(f"  {fit.describe()}")
    if report.estimates:
        _print_estimates(report, gpu_memory_gb)
    if simulate:
        _print_simulation(job, preset, gpu_memory_gb)


def _print_estimates(report: Any, gpu_memory_gb: Optional[float]) -> None:
    from .check import human_bytes

    table = Table(title=f"model states per GPU, {report.num_parameters:,} parameters, "
                        f"{report.world_size} ranks ({report.precision}{_grad_accum_words(report)})")
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


def _print_simulation(job: Any, preset: Optional[str], gpu_memory_gb: Optional[float]) -> None:
    from .check_simulate import DEFAULT_GPU_MEMORY_GB, describe_simulation, simulate_spec

    err.print(f"simulating one step as rank 0 of {job.world_size} ranks ...")
    try:
        sim = simulate_spec(job, preset=preset,
                            gpu_memory_gb=DEFAULT_GPU_MEMORY_GB if gpu_memory_gb is None else gpu_memory_gb)
    except UserError as exc:
        _fail(exc)
    for line in describe_simulation(sim):
        out.print(line)


@app.command()
def doctor(nvme_path: Annotated[Optional[Path], typer.Option(
        "--nvme-path", help="Also measure this directory's direct read/write bandwidth (NVMe offload's "
                            "nvme_path; a few seconds, a 512 MiB scratch file).")] = None) -> None:
    """Report what this machine can run: torch, CUDA/NCCL/gloo, Triton kernels, Slurm, Kubernetes, Helm."""
    from .doctor import run_probes

    probes = run_probes()
    if nvme_path is not None:
        from .doctor_storage import nvme_probe

        probes.append(nvme_probe(nvme_path))
    table = Table(title="orch doctor")
    for col in ("component", "status"):
        table.add_column(col, no_wrap=True)
    table.add_column("detail", overflow="fold")  # a long path folds, never "…"
    for p in probes:
        colour = "green" if p.ok else ("yellow" if p.optional else "red")
        table.add_row(p.name, f"[{colour}]{p.status}[/]", Text(p.detail))
    out.print(table)
    if any(not p.ok and not p.optional for p in probes):
        raise typer.Exit(1)


@app.command()
def submit(spec: SpecArg, cluster: ClusterOpt = "local", set_: SetOpt = None,
           wait: Annotated[bool, typer.Option(help="Wait until the job finishes; exit non-zero if it failed.")] = False,
           follow: Annotated[bool, typer.Option(help="Show a live view until the job finishes.")] = False) -> None:
    """Submit a job to a cluster and record it in the registry."""
    from . import jobs
    from .spec_report import load_spec_reporting_all as load_spec

    try:
        job = load_spec(spec, set_)
        job = _autotuned(job)
        record = jobs.submit(job, _cluster(cluster))
    except UserError as exc:
        _fail(exc)
    out.print(f"submitted [bold]{record.job_id}[/] to {record.cluster} (native id {record.native_id}); "
              f"run dir {record.run_dir}", markup=True)
    if follow or wait:
        _wait(record.job_id, live=follow)


def _autotuned(job: Any) -> Any:
    """With ``autotuning.enabled`` in the ds_config, the job with orch's answer written in (said on stderr)."""
    ds = job.ds_config_dict()
    if not (isinstance(ds, dict) and isinstance(ds.get("autotuning"), dict) and ds["autotuning"].get("enabled")):
        return job
    from .autotune import autotuned_spec

    job, answer = autotuned_spec(job)
    err.print(f"autotuning: using {answer.summary()}")
    return job


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def launch(ctx: typer.Context) -> None:
    """Run a `deepspeed ...` command line as an orch job: orch launch DS_OPTIONS train.py ARGS...

    One machine runs on the local cluster, a --hostfile on the ssh cluster, --launcher slurm on
    Slurm; the job is submitted and followed (--dry-run prints its spec). `orch launch --help`
    lists the options.
    """
    from .launcher import USAGE, build_spec, dry_run_text, parse_launch_args

    if not ctx.args or ctx.args[0] in ("--help", "-h"):
        sys.stdout.write(USAGE)
        raise typer.Exit(0)
    try:
        opts = parse_launch_args(list(ctx.args))
        spec, cluster, data = build_spec(opts, Path.cwd())
    except UserError as exc:
        _fail(exc)
    if opts.dry_run:
        sys.stdout.write(dry_run_text(data, cluster, opts.notes))
        return
    from . import jobs

    for note in opts.notes:
        err.print(f"note: {note}", markup=False)
    try:
        record = jobs.submit(spec, _cluster(cluster))
    except UserError as exc:
        _fail(exc)
    out.print(f"submitted [bold]{record.job_id}[/] to {record.cluster} (native id {record.native_id}); "
              f"run dir {record.run_dir}", markup=True)
    _wait(record.job_id, live=True)


def _wait(job_id: str, *, live: bool) -> NoReturn:
    from .live import wait_for_job

    try:
        final = wait_for_job(job_id, console=out, live=live)
    except UserError as exc:
        _fail(exc)
    if live:
        out.print()  # the live view leaves the cursor after its progress bar
    colour = "green" if final.state.value == "SUCCEEDED" else "red"
    out.print(f"job {final.job_id}: [{colour}]{final.state.value}[/] {final.detail}", markup=True)
    raise typer.Exit(0 if final.state.value == "SUCCEEDED" else 1)


@app.command()
def status(job: JobArg,
           metrics: Annotated[bool, typer.Option(help="Also show the latest training metrics.")] = False,
           history: Annotated[bool, typer.Option(help="Show every recorded state change.")] = False) -> None:
    """Show a job's state, restarts and progress."""
    from . import jobs
    from .live import missing_metrics_note, progress_line
    from .registry import Registry

    try:
        registry = Registry()
        record, st = jobs.status(job, registry)
    except UserError as exc:
        _fail(exc)
    if metrics:
        try:
            jobs.sync_run_files(record)  # a Kubernetes run's metrics are on its shared volume
        except UserError as exc:
            out.print(f"  note: {exc}", markup=False)
    out.print(f"{record.job_id}  {record.cluster}  [bold]{record.state.value}[/]  restarts {record.restarts}"
              f"{'  ' + record.detail if record.detail else ''}", markup=True)
    for node, node_state in sorted(st.nodes.items()):
        out.print(f"  node {node}: {node_state}")
    line = progress_line(Path(record.run_dir), with_metrics=metrics, job_state=record.state,
                         restarts=record.restarts)
    if line:
        out.print(f"  {line}", markup=False)  # plain text: trainer errors may hold [brackets]
    elif metrics:
        out.print(f"  {missing_metrics_note(record.cluster, record.job_id, Path(record.run_dir))}", markup=False)
    if history:
        import datetime as _dt

        for ev in registry.history(record.job_id):
            stamp = _dt.datetime.fromtimestamp(ev.at).strftime("%Y-%m-%d %H:%M:%S")
            out.print(f"  {stamp}  {ev.state.value:<10} {ev.detail}")


@app.command()
def plot(jobs: Annotated[list[str], typer.Argument(help="Job ids (see `orch list`) or run directories.", metavar="ID",
                                                   show_default=False)],
         output: Annotated[Path, typer.Option("--output", "-o", help="Image to write (.png, or .svg/.pdf).")]
         = Path("orch-plot.png")) -> None:
    """Plot loss, tokens/s and learning rate over steps; restarts as vertical lines; runs overlaid."""
    from .plot import plot_jobs

    try:
        path, runs = plot_jobs(jobs, output)
    except UserError as exc:
        _fail(exc)
    out.print(f"wrote {path}: " + ", ".join(f"{r.label} ({r.steps_logged} log steps, "
                                           f"{len(r.restarts)} restart(s))" for r in runs))


@app.command(name="list")
def list_jobs(all_: Annotated[bool, typer.Option("--all", "-a", help="Include finished jobs.")] = True,
              refresh: Annotated[bool, typer.Option(help="Ask the clusters for current states first.")] = True,
              output: Annotated[str, typer.Option(
                  "--output", "-o", help="table (for people), plain (tab-separated: job id, cluster, state, "
                                         "restarts, submitted, native id, detail) or json.")] = "table",
              plain: Annotated[bool, typer.Option("--plain", help="Same as -o plain.")] = False) -> None:
    """List submitted jobs (newest first). Job ids are never shortened; -o json / --plain for scripts."""
    from . import joblist, jobs
    from .registry import Registry

    fmt = "plain" if plain else output
    try:
        if fmt not in joblist.OUTPUTS:
            raise UserError(f"--output {fmt!r} is not one of {', '.join(joblist.OUTPUTS)}; e.g. -o json")
        registry = Registry()
        records = registry.list(include_finished=all_)
        if refresh:
            records = jobs.refresh(records, registry)
    except UserError as exc:
        _fail(exc)
    if fmt == "table":
        joblist.print_table(out, records, f"jobs in {registry.path}")
    else:
        sys.stdout.write(joblist.plain_text(records) if fmt == "plain" else joblist.json_text(records))


@app.command()
def logs(job: JobArg, follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
         node: Annotated[Optional[str], typer.Option(help="Only this node's log.")] = None) -> None:
    """Print (or follow) a job's logs."""
    from . import jobs

    try:
        for line in jobs.logs(job, follow=follow, node=node):
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def cancel(job: JobArg) -> None:
    """Cancel a job and everything it started."""
    from . import jobs

    try:
        record = jobs.cancel(job)
    except UserError as exc:
        _fail(exc)
    out.print(f"{record.job_id}: {record.state.value}")


@ckpt_app.command("ls")
def ckpt_ls(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")]) -> None:
    """List checkpoints: step, world size, ZeRO stage, size, complete or not."""
    from engine.checkpoint.inspect import list_dir

    from .check import human_bytes

    rows = _checkpoint_call(list_dir, directory)
    table = Table(title=f"checkpoints in {directory}")
    for col in ("tag", "step", "world size", "ZeRO stage", "size", "status", "latest"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.tag, _dash(r.step), _dash(r.world_size), _dash(r.zero_stage), human_bytes(r.size_bytes),
                      r.status, "<- latest" if r.latest else "")
    out.print(table)
    for r in rows:
        if r.detail:
            out.print(f"{r.tag}: {r.detail}")


@ckpt_app.command("verify")
def ckpt_verify(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")]) -> None:
    """Verify every shard's checksum against the manifest."""
    from engine.checkpoint.inspect import verify

    from .check import human_bytes

    reports = _checkpoint_call(verify, directory)
    for r in reports:
        if r.ok:
            out.print(f"[green]ok[/]       {r.checkpoint}  ({r.files} files, {human_bytes(r.bytes)})", markup=True)
        else:
            out.print(f"[bold red]CORRUPT[/]  {r.checkpoint}", markup=True)
            for problem in r.problems:
                out.print(f"  {problem}")
    raise typer.Exit(0 if all(r.ok for r in reports) else 1)


@ckpt_app.command("consolidate")
def ckpt_consolidate(directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
                     output: Annotated[Path, typer.Argument(help="Output file (.pt or .safetensors).")]) -> None:
    """Write one fp32 state_dict loadable into the plain model, streaming parameter by parameter."""
    from engine.checkpoint.consolidate import consolidate

    from .check import human_bytes

    result = _checkpoint_call(consolidate, directory, output)
    out.print(f"wrote {result.output} ({result.tensors} tensors, {human_bytes(result.bytes)}) from "
              f"{result.checkpoint}; load it with model.load_state_dict(..., strict=True)")


def _checkpoint_call(fn, *args):  # type: ignore[no-untyped-def]
    """Run an engine.checkpoint function; its CheckpointError ends the command as a user error."""
    from engine.checkpoint.manifest import CheckpointError

    try:
        return fn(*args)
    except CheckpointError as exc:
        _fail(UserError(str(exc)))


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> None:  # pragma: no cover - console entry point
    app()
