"""The async I/O layer (engine/io) against ``dd`` with O_DIRECT and against mmap, same filesystem.

Each round writes a file of ``--gib`` GiB and reads it back cold (the page cache is dropped for
the file with ``posix_fadvise(DONTNEED)`` after an fsync), once per method, interleaved:

* ``dd``: ``dd bs=8M oflag=direct conv=fsync`` / ``iflag=direct`` (the disk's direct bandwidth);
* ``orch io``: ``engine.io.StreamWriter`` from page-aligned memory (as an async save's snapshot:
  no staging copy; xxh3-128 per block in the I/O threads, O_DIRECT writes, fsync) and
  ``IOPool.submit_read`` of the whole file into one aligned buffer;
* ``mmap``: ``torch.UntypedStorage.from_file(shared=True)``, a copy in and ``fsync`` / a copy out.

Also tried for the record (BENCHMARKS.md): the PyPI io_uring binding ``liburing`` 2026.3.30 takes
only ``bytes``/``bytearray`` buffers (no memoryview of an aligned or pinned buffer), so it cannot
do O_DIRECT transfers from our buffers without a copy; ``libaio`` 0.9.5 needs the system's
``libaio.so.1`` at run time, which is the dependency the issue asks to avoid.

    python -m bench.io_layer [--quick] [--dir PATH] [--gib N]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.common import Measurement, interleaved, machine, print_table

BLOCK = 8 << 20


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _dd(args: list[str]) -> float:
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    match = re.search(r"copied, ([\d.]+) s", out)
    return float(match.group(1)) if match else float("nan")


def _methods(path: Path, nbytes: int) -> dict[str, Callable[[], float]]:
    import torch

    from engine.io import IOPool, DirectFile, StreamWriter, aligned_empty, byte_view

    source = aligned_empty(nbytes)       # as an async save's snapshot arena: page-aligned host memory
    source.copy_(torch.randint(0, 255, (nbytes,), dtype=torch.uint8))
    target = aligned_empty(nbytes)
    pool = IOPool()
    count = nbytes // BLOCK

    def dd_write() -> float:
        return _dd(["if=/dev/zero", f"of={path}", f"bs={BLOCK}", f"count={count}", "oflag=direct", "conv=fsync"])

    def dd_read() -> float:
        _drop_cache(path)
        return _dd([f"if={path}", "of=/dev/null", f"bs={BLOCK}", "iflag=direct"])

    def orch_write() -> float:
        t0 = time.perf_counter()
        writer = StreamWriter(path, pool=pool)
        writer.write(source)
        writer.close()
        return time.perf_counter() - t0

    def orch_read() -> float:
        _drop_cache(path)
        t0 = time.perf_counter()
        with DirectFile(path, "r") as f:
            pool.submit_read(f, byte_view(target), 0).wait()
        return time.perf_counter() - t0

    def mmap_write() -> float:
        t0 = time.perf_counter()
        storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
        torch.tensor([], dtype=torch.uint8).set_(storage).copy_(source)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        del storage
        return time.perf_counter() - t0

    def mmap_read() -> float:
        _drop_cache(path)
        t0 = time.perf_counter()
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
        target.copy_(torch.tensor([], dtype=torch.uint8).set_(storage))
        del storage
        return time.perf_counter() - t0

    return {"dd direct write": dd_write, "orch io write": orch_write, "mmap write": mmap_write,
            "dd direct read": dd_read, "orch io read": orch_read, "mmap read": mmap_read}


def run(quick: bool = False, directory: str | None = None, gib: float | None = None) -> list[dict]:
    gib = gib if gib is not None else (0.25 if quick else 1.0)
    nbytes = int(gib * (1 << 30)) // BLOCK * BLOCK
    rounds = 2 if quick else 5
    with tempfile.TemporaryDirectory(dir=directory or os.environ.get("ORCH_BENCH_DIR")) as tmp:
        path = Path(tmp) / "io.bin"
        from engine.io import direct_supported
        direct = direct_supported(Path(tmp))
        print(f"{machine()}; {gib:g} GiB in {tmp} (O_DIRECT {'works' if direct else 'refused'}); "
              f"load {os.getloadavg()[0]:.1f}")
        times = interleaved(_methods(path, nbytes), rounds)
    rows = []
    for kind in ("write", "read"):
        rate = {name: Measurement(name, [nbytes / t / 1e9 for t in samples], " GB/s")
                for name, samples in times.items() if name.endswith(kind)}
        ours, dd = rate[f"orch io {kind}"], rate[f"dd direct {kind}"]
        print_table(f"sustained {kind} (GB/s, higher is better; ratio > 1 means orch is faster)",
                    ours, [dd, rate[f"mmap {kind}"]])
        rows.append({"benchmark": "io_layer", "name": f"{kind} GB/s vs dd direct", "ours": ours.median,
                     "ours_range": ours.spread, "peer": dd.median, "peer_range": dd.spread,
                     "ratio": ours.median / dd.median, "goal": ">= 0.9"})
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", help="directory on the filesystem to measure (default: the temp dir)")
    parser.add_argument("--gib", type=float, help="file size in GiB (default 1, 0.25 with --quick)")
    args = parser.parse_args()
    run(args.quick, args.dir, args.gib)


if __name__ == "__main__":
    main()
