"""Everything the bundled trainer reports through, assembled once: the answer to "what is my run doing?".

``Monitor`` bundles the metrics files (rank 0), the step timer (phases and the optional
wall-clock breakdown), the FLOPs meter (TFLOP/s and MFU), optional TensorBoard and the hang
watchdog (every rank). The training loop only calls ``phase``, ``beat`` and the record helpers.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.run_contract import restart_count
from engine.trainer.args import TrainerArgs, TrainerError
from engine.trainer.metrics import MetricsWriter
from engine.trainer.mfu import Peak, achieved_flops, device_peak, mfu
from engine.trainer.step_timer import StepTimer
from engine.trainer.watchdog import Watchdog, enable_flight_recorder


@dataclass(frozen=True)
class FlopsMeter:
    """Turns tokens/s into the job's model TFLOP/s and MFU."""

    flops_per_token: int
    peak: Peak | None  # per device; None: unknown (MFU not reported)
    devices: int

    def figures(self, tokens_per_s: float) -> tuple[float, float | None]:
        tflops = achieved_flops(self.flops_per_token, tokens_per_s) / 1e12
        if self.peak is None:
            return tflops, None
        return tflops, mfu(self.flops_per_token, tokens_per_s, self.peak.flops, self.devices)


@dataclass
class Monitor:
    metrics: MetricsWriter
    timer: StepTimer
    flops: FlopsMeter
    watchdog_timeout: float
    run_dir: Path
    rank: int
    world_size: int
    watchdog: Watchdog | None = None
    engine_monitoring: Any = None  # the engine's EngineMonitoring (W&B/Comet/CSV, comms logger)

    first_step: int | None = None  # this process's first step (compilation happens there)

    def phase(self, name: str, step: int, micro_step: int | None = None, micro_steps: int | None = None) -> Any:
        if step == self.first_step and self.watchdog is not None:
            return self._compiling_phase(name, step, micro_step, micro_steps)
        return self.timer.phase(name, step, micro_step, micro_steps)

    @contextmanager
    def _compiling_phase(self, name: str, step: int, micro_step: int | None,
                         micro_steps: int | None) -> Iterator[None]:
        """The first step's phases each count as progress: that is where Triton kernels and a
        ``torch.compile``d model compile, which may take minutes but is not a hang."""
        with self.timer.phase(name, step, micro_step, micro_steps):
            yield
        if self.watchdog is not None:
            self.watchdog.progress()

    def started(self, step: int, total: int, model: str, resumed_from: Path | None) -> None:
        """Status, the ``start`` record and the opening lines; then the watchdog starts."""
        restarts = restart_count()
        self.metrics.status("running", step=step, total_steps=total, world_size=self.world_size,
                            restart_count=restarts, model=model)
        peak = self.flops.peak
        self.metrics.log({
            "kind": "start", "step": step, "total_steps": total, "world_size": self.world_size,
            "restart_count": restarts, "flops_per_token": self.flops.flops_per_token,
            "peak_tflops": peak.flops / 1e12 if peak else None, "peak_source": peak.source if peak else None,
            "wall_clock_breakdown": self.timer.breakdown, "watchdog_timeout_s": self.watchdog_timeout,
        })
        self.first_step = step + 1
        if resumed_from is not None:
            self.metrics.info(f"resumed from {resumed_from} at step {step}")
        self.metrics.info(f"MFU against {peak.flops / 1e12:.3g} TFLOP/s per device ({peak.source})" if peak else
                          "MFU not reported: this device's peak is unknown; set ORCH_PEAK_TFLOPS=<TFLOP/s per "
                          "device> to get it (TFLOP/s is reported either way)")
        if self.watchdog_timeout > 0:
            self.watchdog = Watchdog(self.watchdog_timeout, self.run_dir, self.rank, self.world_size,
                                     lambda: self.timer.position, on_hang=self._hung)
            self.watchdog.start()

    def beat(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step)

    def throughput_fields(self, tokens_per_s: float, steps: int) -> dict[str, Any]:
        tflops, fraction = self.flops.figures(tokens_per_s)
        return {"tflops": tflops, "mfu": fraction, "breakdown_ms": self.timer.window(steps)}

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        self.metrics.close()
        if self.engine_monitoring is not None:
            if self.engine_monitoring.comms_logger is not None:
                self.engine_monitoring.comms_logger.log_summary()  # rank 0 prints DeepSpeed's table
            self.engine_monitoring.close()  # ends the W&B run / Comet experiment
            self.engine_monitoring = None

    def _hung(self, message: str) -> None:
        pos = self.timer.position
        self.metrics.status("failed", step=pos.step if pos else None, error=message, time_of_hang=time.time())


def build_monitor(args: TrainerArgs, run_dir: Path, rank: int, world: int, model_engine: Any,
                  flops_per_token: int) -> Monitor:
    """Rank 0 writes metrics (and measures the peak); every rank times phases and runs a watchdog."""
    import torch

    device = model_engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timer = StepTimer(breakdown=bool(model_engine.config.wall_clock_breakdown), synchronize=sync)
    metrics = MetricsWriter(run_dir, enabled=rank == 0)
    peak = _peak(device, model_engine.precision.model_dtype) if rank == 0 else None
    monitor = Monitor(metrics, timer, FlopsMeter(flops_per_token, peak, world), args.watchdog_timeout,
                      run_dir, rank, world)
    if rank == 0 and model_engine.config.tensorboard.enabled:
        _attach_tensorboard(metrics, model_engine.config.tensorboard, run_dir)
    monitor.engine_monitoring = getattr(model_engine, "monitoring", None)
    if rank == 0 and model_engine.monitor.enabled:
        _attach_monitors(metrics, model_engine, args, run_dir)
    return monitor


def prepare_distributed(args: TrainerArgs) -> None:
    """Before the process group exists: let the watchdog see the last collectives."""
    if args.watchdog_timeout > 0:
        from engine.comm import default_backend

        enable_flight_recorder(default_backend())


def _peak(device: Any, dtype: Any) -> Peak | None:
    try:
        return device_peak(device, dtype)
    except ValueError as exc:  # a malformed ORCH_PEAK_TFLOPS
        raise TrainerError(str(exc)) from None


def _attach_tensorboard(metrics: MetricsWriter, section: Any, run_dir: Path) -> None:
    from engine.trainer.tensorboard import open_tensorboard, tensorboard_dir

    sink, message = open_tensorboard(tensorboard_dir(section, run_dir))
    metrics.tensorboard = sink
    metrics.info(message)



def _attach_monitors(metrics: MetricsWriter, model_engine: Any, args: TrainerArgs, run_dir: Path) -> None:
    """The ds_config's W&B / Comet / CSV monitors: opened for this run directory (state, default
    paths; the W&B run id survives restarts there), with the trainer's settings attached."""
    from dataclasses import asdict

    from engine.monitor.records import RecordSink

    trainer = {k: v for k, v in asdict(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    model_engine.monitor.open(run_dir, {"trainer": trainer, "world_size": model_engine.world_size})
    metrics.sinks.append(RecordSink(model_engine.monitor))
