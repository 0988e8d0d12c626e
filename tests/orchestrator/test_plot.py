"""`orch plot`: a PNG of loss, tokens/s and learning rate over steps from real runs, restarts marked,
several runs overlaid. The figure's data is checked against metrics.jsonl, not just the file."""
from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.registry import Registry
from tests.trainer_runs import clean_env, records, run_trainer, write_config

matplotlib = pytest.importorskip("matplotlib", reason="orch plot needs matplotlib: pip install 'orch[plot]'")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: 8 steps, then a restart that goes on to 16 (from its step-8 checkpoint when the engine
    saves checkpoints, else from step 0). Run B: 8 steps of another learning rate. Both log every 2
    steps; A evaluates every 4."""
    work = tmp_path_factory.mktemp("plot")
    config_a = write_config(work)
    common_a = ["--deepspeed_config", str(config_a), "--run-dir", str(work / "a"), "--log-every", "2",
                "--eval-every", "4", "--eval-iters", "1", "--save-every", "8"]
    for steps, restart in (("8", "0"), ("16", "1")):
        result = run_trainer(*common_a, "--steps", steps, ORCH_RESTART_COUNT=restart, ORCH_PEAK_TFLOPS="1")
        assert result.returncode == 0, result.stderr[-3000:]
    (work / "b").mkdir()
    config_b = write_config(work / "b", optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    result = run_trainer("--deepspeed_config", str(config_b), "--run-dir", str(work / "b"), "--steps", "8",
                         "--log-every", "2", ORCH_PEAK_TFLOPS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "a", work / "b"


def orch(*args: str, home, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=clean_env(ORCH_HOME=str(home)), cwd=cwd, timeout=120)


@pytest.mark.slow
def test_orch_plot_overlays_runs_from_the_registry_and_a_run_dir(runs, tmp_path):
    run_a, run_b = runs
    home = tmp_path / "home"
    registry = Registry(home / "registry.db")
    registry.add("tiny-a-1", "tiny-a", "local", str(run_a), {"name": "tiny-a"})
    result = orch("plot", "tiny-a-1", str(run_b), "-o", "curves.png", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged_a = len(records(run_a, "train"))
    assert logged_a in (8, 12)  # 12: no checkpoint to resume from, steps 2-8 were trained again
    assert f"wrote curves.png: tiny-a-1 ({logged_a} log steps, 1 restart(s)), b (4 log steps, 0 restart(s))" \
        in result.stdout

    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (780, 900)  # 9 x 7.8 inches at 100 dpi
    assert pixels[..., :3].std() > 0.05  # lines were drawn, not a blank canvas


@pytest.mark.slow
def test_the_figure_holds_exactly_the_logged_series_and_the_restart(runs):
    from orchestrator.plot import PANELS, build_figure, resolve_runs

    run_a, run_b = runs
    plotted = resolve_runs([str(run_a), str(run_b)])
    assert [r.label for r in plotted] == ["a", "b"]
    resumed_at = records(run_a, "start")[1]["step"]  # 8, or 0 without checkpoints
    assert plotted[0].restarts == [resumed_at] and plotted[1].restarts == []
    fig = build_figure(plotted)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "tokens/s", "learning rate"]
    for ax, (key, _) in zip(axes, PANELS):
        for run_dir, label in ((run_a, "a"), (run_b, "b")):
            train = records(run_dir, "train")
            lines = [line for line in ax.get_lines() if line.get_gid() == f"{key}:{label}"]
            steps = [s for line in lines for s in line.get_xdata()]
            values = [v for line in lines for v in line.get_ydata()]
            assert steps == [r["step"] for r in train]
            assert values == pytest.approx([r[key] for r in train])
        # The restart of run A is a vertical line at the step it resumed from, in every panel.
        (restart,) = [line for line in ax.get_lines() if line.get_gid() == "restart:a"]
        assert list(restart.get_xdata()) == [resumed_at, resumed_at]
        assert not [line for line in ax.get_lines() if line.get_gid() == "restart:b"]
    # Run A's two trainer starts are two segments of one colour; its eval loss is dashed.
    loss_a = [line for line in axes[0].get_lines() if line.get_gid() == "loss:a"]
    assert len(loss_a) == 2 and loss_a[0].get_color() == loss_a[1].get_color()
    (eval_1, eval_2) = [line for line in axes[0].get_lines() if line.get_gid() == "eval_loss:a"]
    assert list(eval_1.get_xdata()) + list(eval_2.get_xdata()) == [r["step"] for r in records(run_a, "eval")]
    assert list(eval_2.get_xdata())[-1] == 16
    assert eval_1.get_linestyle() == "--"
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend[:2] == ["a", "a (eval)"] and "b" in legend and "a restart" in legend
    # Learning rate differs between the runs, as configured.
    lr = {label: [line for line in axes[2].get_lines() if line.get_gid() == f"lr:{label}"][0].get_ydata()[0]
          for label in ("a", "b")}
    assert lr == {"a": pytest.approx(3e-3), "b": pytest.approx(1e-3)}


def test_mistakes_are_one_line_errors(tmp_path):
    home = tmp_path / "home"
    missing = orch("plot", "no-such-job", "-o", "x.png", home=home, cwd=tmp_path)
    assert missing.returncode == 2 and "no job 'no-such-job' in the registry" in missing.stderr
    Registry(home / "registry.db").add("empty-1", "empty", "local", str(tmp_path / "empty"), {"name": "empty"})
    empty = orch("plot", "empty-1", home=home, cwd=tmp_path)
    assert empty.returncode == 2 and "empty-1: no metrics yet" in empty.stderr
    assert "Traceback" not in missing.stderr + empty.stderr
    assert not (tmp_path / "x.png").exists()
