"""Async file I/O for checkpoints and NVMe offload: aligned buffers, O_DIRECT files, a thread pool.

``aligned``: page-aligned (pinned with CUDA) buffers and a bounded pool of them. ``files``:
``DirectFile`` (O_DIRECT where the filesystem allows, buffered otherwise). ``pool``: ``IOPool``,
threads doing positional reads and writes behind a submit/wait API. ``hashing``: block-tree
digests (xxh3-128 or sha256) computed by the I/O threads. ``stream``: ``StreamWriter`` (one file
from many pieces, hashed while written) and ``hash_file``. ``reader``: ``read_verified`` (a whole
file into one aligned buffer, hashed by the threads that read it; ``start_read_verified`` submits it
without waiting). Nothing here imports torch at import time, and nothing is compiled.
"""
from .aligned import ALIGN, BufferPool, aligned_empty, byte_view, round_up
from .files import DirectFile, direct_supported, pread_full, pwrite_full
from .hashing import ALGORITHMS, DEFAULT_ALGORITHM, TreeHash
from .pool import IOPool, IORequest, shared_pool
from .reader import VerifiedRead, read_verified, start_read_verified
from .stream import FileRange, StreamWriter, hash_file

__all__ = ["ALGORITHMS", "ALIGN", "BufferPool", "DEFAULT_ALGORITHM", "DirectFile", "FileRange", "IOPool", "IORequest",
           "StreamWriter", "TreeHash", "aligned_empty", "byte_view", "direct_supported", "hash_file",
           "pread_full", "pwrite_full", "read_verified", "round_up", "shared_pool", "start_read_verified",
           "VerifiedRead"]
