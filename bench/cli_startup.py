"""How long `orch --help` and `orch render` take to start, beside the interpreter's own start and
`import torch` (what every command would pay if the CLI imported torch eagerly).

    python -m bench.cli_startup [--repeats 15]
"""
from __future__ import annotations

import argparse
import shutil
import sys

from bench.common import REPO, Measurement, machine, print_table, time_command


def run(quick: bool = False) -> list[dict]:
    repeats = 5 if quick else 15
    orch = shutil.which("orch") or "orch"
    example = str(REPO / "examples" / "tiny-gpt-zero2.yaml")
    ours_help = Measurement("orch --help", time_command([orch, "--help"], repeats))
    ours_render = Measurement("orch render (kubernetes)", time_command(
        [orch, "render", example, "--cluster", "kubernetes"], repeats))
    python = Measurement("python -c pass", time_command([sys.executable, "-c", "pass"], repeats))
    torch = Measurement("python -c 'import torch'", time_command([sys.executable, "-c", "import torch"], repeats))
    peers = [python, torch]
    deepspeed = shutil.which("deepspeed")
    if deepspeed:
        peers.append(Measurement("deepspeed --help", time_command([deepspeed, "--help"], repeats)))
    print(f"machine: {machine()}")
    print_table("CLI start-up (goal: orch --help and orch render < 0.5 s)", ours_help, peers)
    print_table("", ours_render, peers)
    return [{"benchmark": "cli_startup", "name": m.name, "median_s": m.median, "range_s": m.spread}
            for m in (ours_help, ours_render, *peers)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    run(parser.parse_args().quick)
