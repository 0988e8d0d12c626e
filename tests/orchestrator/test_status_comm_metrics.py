"""``orch status --metrics`` shows what a rank's collectives moved per step (the trainer's ledger figures)."""
from __future__ import annotations

import json

from orchestrator.live import progress_line


def test_the_status_line_shows_collective_bytes_and_calls_per_step(tmp_path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "step": 20, "total_steps": 40}))
    record = {"kind": "train", "step": 20, "loss": 2.5, "comm_bytes_per_step": 3 * 2**20,
              "comm_calls_per_step": 127.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    line = progress_line(tmp_path)
    assert "127 collectives/step" in line, line
    assert "comm 3.0 MiB/step per rank" in line, line
