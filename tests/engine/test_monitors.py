"""The ds_config's monitoring clients on their own: what each writes, and how each survives a restart.

The trainer-level tests (a real run, a kill and an elastic resume) are in test_monitor_runs.py.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from engine.monitor.base import MonitorMaster, StepMark
from engine.monitor.clients import CLIENTS, missing_client_message
from engine.monitor.csv_monitor import CsvMonitor, csv_log_dir
from engine.monitor.records import record_events

EVENTS = [[("Train/Samples/lr", 0.1 * s, 8 * s), ("Train/Samples/loss_scale", 1024.0, 8 * s)] for s in range(1, 5)]


def test_csv_monitor_writes_deepspeeds_files_and_a_restart_appends_without_repeats(tmp_path: Path) -> None:
    section = NS(output_path=str(tmp_path / "csv"), job_name="job")
    log_dir = csv_log_dir(section, tmp_path / "run")
    assert log_dir == tmp_path / "csv" / "job"
    first = CsvMonitor(log_dir, tmp_path / "run" / "monitor")
    for events in EVENTS[:3]:
        first.write_events(events)
    first.close()  # then the restart replays step 3 (24 samples) from its checkpoint
    second = CsvMonitor(log_dir, tmp_path / "run" / "monitor")
    for events in EVENTS[2:]:
        second.write_events(events)
    second.close()
    assert sorted(p.name for p in log_dir.iterdir()) == ["Train_Samples_loss_scale.csv", "Train_Samples_lr.csv"]
    assert (log_dir / "Train_Samples_lr.csv").read_bytes() == (
        b"step,lr\r\n8,0.1\r\n16,0.2\r\n24,0.30000000000000004\r\n32,0.4\r\n")


def test_empty_output_path_goes_under_the_run_directory(tmp_path: Path) -> None:
    section = NS(output_path="", job_name="DeepSpeedJobName")
    assert csv_log_dir(section, tmp_path) == tmp_path / "csv_monitor" / "DeepSpeedJobName"
    assert csv_log_dir(section, None) == Path("DeepSpeedJobName")  # DeepSpeed's ./<job_name>


def test_step_mark_keeps_the_highest_step_across_a_kill(tmp_path: Path) -> None:
    mark = StepMark(tmp_path, "sink")
    mark.written([("a", 1, 5), ("a", 1, 9)])
    mark.written([("a", 1, 7)])  # lower: no new mark
    # no close(): a killed process leaves the line-buffered file as it is
    again = StepMark(tmp_path, "sink")
    assert again.resume_after == 9
    assert again.fresh([("a", 1, 9), ("a", 1, 10)]) == [("a", 1, 10)]


def test_trainer_records_become_deepspeed_named_events() -> None:
    record = {"kind": "train", "step": 3, "samples": 24, "loss": 2.5, "lr": 1e-3, "loss_scale": None,
              "tokens_per_s": 1000.0, "tflops": 0.01, "mfu": None, "grad_norm": 0.5, "mem": 123,
              "restart_count": 1, "step_time_s": 0.02,
              "breakdown_ms": {"forward": 1.0, "backward": 2.0, "reduce": None, "optimizer": 0.5}}
    events = dict((name, value) for name, value, step in record_events(record))
    assert {step for _, _, step in record_events(record)} == {24}
    assert events == {
        "Train/Samples/train_loss": 2.5, "Train/Samples/tokens_per_s": 1000.0, "Train/Samples/tflops": 0.01,
        "Train/Samples/grad_norm": 0.5, "Train/Samples/peak_memory_bytes": 123.0,
        "Train/Samples/restart_count": 1.0, "Train/Samples/step_time_ms": 20.0,
        "Train/Samples/elapsed_time_ms_forward": 1.0, "Train/Samples/elapsed_time_ms_backward": 2.0,
        "Train/Samples/elapsed_time_ms_step": 0.5}
    assert record_events({"kind": "eval", "step": 3, "samples": 24, "eval_loss": 2.0}) == [
        ("Train/Samples/eval_loss", 2.0, 24)]


def test_a_monitor_opens_on_first_write_and_only_where_the_opener_says() -> None:
    written = []
    sink = NS(write_events=written.extend, close=lambda: written.append("closed"))
    master = MonitorMaster(lambda m: [sink], enabled=True)
    assert master.monitors == []
    master.write_events([("x", 1, 1)])
    master.close()
    assert written == [("x", 1, 1), "closed"]


# --- W&B ---------------------------------------------------------------------------------------

wandb_installed = pytest.mark.skipif(not CLIENTS[0].installed(), reason="wandb is not installed: pip install 'orch[wandb]'")


@wandb_installed
def test_wandb_offline_run_resumes_with_the_same_id_and_no_step_twice(tmp_path: Path, monkeypatch) -> None:
    from engine.monitor.wandb_monitor import open_wandb
    from tests.monitor_files import wandb_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    section = NS(project="orch-tests", group="g", team=None)
    run_dir = tmp_path / "run"
    attempts = [EVENTS[:3], EVENTS[1:]]  # the restart replays steps 2 and 3
    for events in attempts:
        monitor = open_wandb(section, run_dir, run_dir / "monitor", {"ds_config": {"train_batch_size": 8}})
        assert monitor is not None
        for batch in events:
            monitor.write_events(batch)
        monitor.close()
        import wandb

        wandb.teardown()  # what a trainer's exit does: the W&B service writes out the run's file
    first, second = wandb_runs(run_dir / "wandb")
    assert first.run_id == second.run_id
    assert first.config["ds_config"] == {"train_batch_size": 8}
    assert first.steps == [8, 16, 24] and second.steps == [32]
    assert all({"Train/Samples/lr", "Train/Samples/loss_scale"} <= set(r) for r in first.rows + second.rows)


# --- Comet -------------------------------------------------------------------------------------

comet_installed = pytest.mark.skipif(not CLIENTS[1].installed(), reason="comet_ml is not installed: pip install 'orch[comet]'")


@comet_installed
def test_comet_offline_experiment_continues_after_a_restart(tmp_path: Path, monkeypatch) -> None:
    from engine.monitor.comet_monitor import open_comet
    from tests.monitor_files import comet_metrics

    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    section = NS(api_key=None, project="orch-tests", workspace="ws", experiment_name="tiny", experiment_key=None,
                 mode=None, online=False, samples_log_interval=1)
    keys = []
    for events in (EVENTS[:3], EVENTS[1:]):
        monitor = open_comet(section, tmp_path / "run" / "monitor", {"ds_config": {"train_batch_size": 8}})
        assert monitor is not None
        keys.append(monitor.experiment.get_key())
        for batch in events:
            monitor.write_events(batch)
        monitor.close()
    assert keys[0] == keys[1]
    metrics = comet_metrics(tmp_path / "comet")
    assert sorted(metrics["Train/Samples/lr"]) == [(8, 0.1), (16, 0.2), (24, pytest.approx(0.3)), (32, 0.4)]


def test_comet_logs_a_name_again_only_after_samples_log_interval() -> None:
    from engine.monitor.comet_monitor import SampleInterval

    schedule = SampleInterval(100)
    assert [s for s in range(0, 400, 40) if schedule.due("loss", s)] == [0, 120, 240, 360]


# --- a client that is missing --------------------------------------------------------------------

@pytest.mark.parametrize("section", ["wandb", "comet"])
def test_a_missing_client_gives_one_warning_naming_the_extra(section: str, monkeypatch, capsys) -> None:
    import sys

    from engine.monitor import base

    module = "wandb" if section == "wandb" else "comet_ml"
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent
    monkeypatch.setattr(base, "_warned", set())
    cfg = NS(wandb=NS(enabled=section == "wandb", project="p", group=None, team=None),
             csv_monitor=NS(enabled=False),
             comet=NS(enabled=section == "comet", api_key=None, project=None, workspace=None, experiment_name=None,
                      experiment_key=None, mode=None, online=False, samples_log_interval=1),
             to_ds_dict=lambda: {})
    from engine.monitor.factory import build_monitor

    for _ in range(2):
        monitor = build_monitor(cfg, rank=0)
        monitor.write_events(EVENTS[0])
        assert monitor.monitors == []
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert warnings == [f"[engine] {missing_client_message(section)}"]
    assert f"orch[{section}]" in warnings[0]


# --- comms_logger -------------------------------------------------------------------------------

def _collectives_under_the_comms_logger(verbose: bool) -> dict:
    import torch

    from engine.comm import CommLedger, Comm
    from engine.monitor.comms_logger import CommsLogger

    comm = Comm(book=CommLedger())
    lines: list[str] = []
    section = NS(verbose=verbose, debug=True, prof_all=True, prof_ops=[])
    logger = CommsLogger(section, comm, out=lines.append)
    world = comm.world_size
    for n in (10, 10, 1000):
        comm.all_reduce(torch.ones(n), async_op=True).wait()
    out = torch.empty(world * 64)
    comm.all_gather_into(out, out[comm.rank * 64:(comm.rank + 1) * 64], async_op=True).wait()
    comm.reduce_scatter_into(torch.empty(32), torch.ones(world * 32))
    comm.broadcast(torch.ones(8), src=0)
    comm.all_to_all_into(torch.empty(world * 6), torch.ones(world * 6))
    comm.all_gather_partitions(torch.zeros(world * 50), 50, 40)  # chunked: several timed calls
    import engine.monitor

    out = {"rows": logger.summary(), "ledger": comm.ledger.by_op(), "lines": lines,
           "table": logger.log_summary(), "deepspeed_style_call": engine.monitor.log_summary()}
    # prof_all false: only the ops named in prof_ops are timed
    only = Comm(book=CommLedger())
    picky = CommsLogger(NS(verbose=False, debug=False, prof_all=False, prof_ops=["broadcast"]), only, out=lines.append)
    only.all_reduce(torch.ones(4))
    only.broadcast(torch.ones(4), src=0)
    out["prof_ops_rows"] = picky.summary()
    return out


@pytest.mark.slow
def test_comms_logger_totals_equal_the_ledger() -> None:
    from tests.dist_utils import run_distributed

    results = run_distributed(_collectives_under_the_comms_logger, 2, True)
    for rank, result in enumerate(results):
        per_op: dict[str, list[int]] = {}
        for row in result["rows"]:
            op = row["op"].split(" |")[0]
            calls, nbytes = per_op.setdefault(op, [0, 0])
            per_op[op] = [calls + row["count"], nbytes + row["count"] * row["msg_bytes"]]
            assert row["avg_latency_ms"] > 0 and row["algbw_gbps"] > 0 and row["busbw_gbps"] > 0
            assert "[Caller Func: _collectives_under_the_comms_logger]" in row["op"] or "all_gather_partitions" in row["op"]
        ledger = {key.split("/")[0]: [e["calls"], e["elements"] * 4] for key, e in result["ledger"].items()}
        assert per_op == ledger, rank
        assert set(ledger) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"}
    lines = results[0]["lines"]
    assert lines[0].startswith("comm op: all_reduce | [Caller Func: _collectives_under_the_comms_logger] | time (ms):")
    assert "algbw (Gbps)" in lines[0] and "busbw (Gbps)" in lines[0]
    assert results[0]["table"].splitlines()[0].split() [:3] == ["Comm.", "Op", "Message"]
    assert results[1]["lines"] == []  # verbose lines come from rank 0 only
    assert results[0]["deepspeed_style_call"] == results[0]["table"]
    assert [(r["op"], r["count"]) for r in results[0]["prof_ops_rows"]] == [("broadcast", 1)]


def test_bus_bandwidth_follows_nccl_tests() -> None:
    from engine.monitor.comms_logger import bandwidths_gbps

    # 1 GB in 1 s on 4 ranks
    assert bandwidths_gbps("all_reduce", 10**9, 1000.0, 4) == pytest.approx((16.0, 12.0))
    assert bandwidths_gbps("all_gather", 10**9, 1000.0, 4) == pytest.approx((8.0, 6.0))
    assert bandwidths_gbps("broadcast", 10**9, 1000.0, 4) == pytest.approx((8.0, 8.0))


# --- flops_profiler -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_flops_profiler_counts_the_gpt_as_the_mfu_formula_does(preset: str, tmp_path: Path) -> None:
    import torch

    from engine.models import build_model
    from engine.models.presets import get_preset
    from engine.monitor.flops_profiler import FlopsProfiler

    cfg = get_preset(preset)
    model = build_model(preset, seed=0)
    section = NS(profile_step=1, module_depth=-1, top_modules=1, detailed=True, output_file=str(tmp_path / "f.txt"))
    profiler = FlopsProfiler(section, model, rank=0)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    for global_steps in range(3):
        with profiler.forward(global_steps):
            loss = model(x, x)
        with profiler.backward():
            loss.backward()
        profiler.end_step()
    result = profiler.result
    assert result is not None and result.step == 1
    analytic = cfg.flops_per_token() * x.numel()
    assert result.total_flops == pytest.approx(analytic, rel=0.05)
    assert result.bwd_flops == pytest.approx(2 * result.fwd_flops, rel=0.05)
    assert result.params == sum(p.numel() for p in model.parameters())
    blocks = [m for m in result.modules if m.name.startswith("blocks.") and m.depth == 2]
    assert len(blocks) == cfg.n_layer and all(b.fwd_flops > 0 and b.fwd_latency_s > 0 for b in blocks)
    report = (tmp_path / "f.txt").read_text()
    assert "Profile summary at step 1" in report and "Detailed profile per device" in report
    assert "blocks.0.attn.qkv" in report
