"""``orch doctor --nvme-path DIR``: can DIR hold NVMe offload swap files, and how fast is it?

Measures the filesystem's sustained write and read bandwidth through the engine's own I/O layer
(engine/io: the thread pool and aligned buffers the swap files and checkpoints use, O_DIRECT when
the filesystem takes it), a few seconds with a 512 MiB scratch file, and says whether O_DIRECT
works there (tmpfs and some network filesystems refuse it; the engine then uses the page cache).
No torch is imported.
"""
from __future__ import annotations

import os
from pathlib import Path

from .doctor_probe import Probe

__all__ = ["nvme_probe"]


def nvme_probe(path: str | Path, nbytes: int = 512 << 20) -> Probe:
    """One doctor row for ``path``: bandwidth and O_DIRECT, or why swap files cannot go there."""
    path = Path(path).expanduser()
    name = f"nvme_path {path}"
    if not path.is_dir():
        return Probe(name, False, f"{path} does not exist or is not a directory: create it on the NVMe drive "
                                  "(zero_optimization.offload_optimizer.nvme_path)")
    if not os.access(path, os.W_OK):
        return Probe(name, False, f"{path} is not writable for this user: swap files cannot be created there")
    try:
        from engine.io.probe import measure_directory

        speed = measure_directory(path, nbytes)
    except OSError as exc:
        return Probe(name, False, f"cannot write a {nbytes >> 20} MiB test file in {path}: {exc.strerror or exc}")
    mode = "O_DIRECT works" if speed.direct else "O_DIRECT refused (buffered I/O through the page cache)"
    return Probe(name, True, f"write {speed.write_gbps:.2f} GB/s, read {speed.read_gbps:.2f} GB/s "
                             f"({speed.nbytes >> 20} MiB, engine I/O threads); {mode}")
