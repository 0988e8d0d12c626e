"""The ds_config's monitoring sections: ``wandb``, ``csv_monitor``, ``comet`` (event monitors),
``comms_logger`` (the communication ledger, per op) and ``flops_profiler`` (per-module FLOPs).

The event monitors share DeepSpeed's interface, ``engine.monitor.write_events([(name, value,
step)])``; the engine writes ``Train/Samples/lr`` (and ``loss_scale``) every optimizer step and
the bundled trainer adds its own figures (records.py). Importing this package costs no torch.
"""
from __future__ import annotations

from .base import Event, Monitor, MonitorMaster
from .factory import build_monitor, run_config


def log_summary() -> str:
    """What DeepSpeed scripts call as ``deepspeed.comm.log_summary()``: rank 0 prints the comms
    logger's per-op table (``comms_logger.enabled``); returns it ("" when the logger is off)."""
    from .comms_logger import log_summary as summary

    return summary()


__all__ = ["Event", "Monitor", "MonitorMaster", "build_monitor", "log_summary", "run_config"]
