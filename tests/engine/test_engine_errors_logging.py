"""A user's mistakes share one root; the engine prints through one logger, on rank 0."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.errors import UserError, closest
from tests.shared_env import REPO


def test_every_engine_user_error_is_a_user_error_and_keeps_its_builtin_base() -> None:
    from engine.checkpoint.manifest import CheckpointError
    from engine.comm import DistributedSetupError
    from engine.config import ConfigError
    from engine.models.presets import UnknownPreset
    from engine.trainer.args import TrainerError
    from engine.trainer.data import DataError

    for error, builtin in ((ConfigError, ValueError), (DataError, ValueError), (UnknownPreset, KeyError),
                           (DistributedSetupError, RuntimeError), (CheckpointError, Exception),
                           (TrainerError, Exception)):
        assert issubclass(error, UserError) and issubclass(error, builtin), error
    import engine
    from orchestrator.errors import UserError as OrchUserError

    assert engine.UserError is UserError is OrchUserError  # the orch CLI catches the engine's mistakes too
    assert str(UserError("bad --steps", hint="pass a positive number")) == "bad --steps\n  hint: pass a positive number"


@pytest.mark.parametrize("word, candidates, expected", [
    ("stgae", ["stage", "reduce_bucket_size"], "stage"),
    ("slrum", ["local", "slurm", "kubernetes"], "slurm"),
    ("stage3MaxLiveParameters", ["stage3_max_live_parameters", "stage"], "stage3_max_live_parameters"),
    ("lr", ["eps", "betas"], None),
])
def test_did_you_mean_is_one_rule_for_every_message(word: str, candidates: list[str], expected: str | None) -> None:
    assert closest(word, candidates) == expected


def test_an_unknown_ds_config_key_gets_the_nearest_valid_key() -> None:
    from engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="did you mean 'train_batch_size'"):
        load_config({"train_bacth_size": 8})


_LOG_LINES = """
import logging
from engine.log import ALL_RANKS, TRAINER, get_logger
get_logger().info("config: something")
get_logger().warning("a warning")
get_logger(TRAINER).info("model tiny")
get_logger(TRAINER).error("[rank 1] stuck", extra=ALL_RANKS)
logging.getLogger("engine").setLevel(logging.WARNING)
get_logger().info("silenced by the application")
"""


def _run(rank: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _LOG_LINES], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "RANK": rank}, timeout=60)


def test_rank_zero_prints_info_on_stdout_and_problems_on_stderr() -> None:
    out = _run("0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[engine] config: something\nengine.train model tiny\n"
    assert out.stderr == "[engine] a warning\nengine.train: [rank 1] stuck\n"


def test_other_ranks_print_only_the_lines_meant_for_every_rank() -> None:
    out = _run("3")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert out.stderr == "engine.train: [rank 1] stuck\n"
