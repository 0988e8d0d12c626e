"""Sharded, atomic, verified checkpoints that reshard on load.

A checkpoint is a directory ``<save_dir>/<tag>/`` (``step-<N>`` by default)::

    manifest.json                       written last, by rank 0 (manifest.py describes it)
    master-rank-00000.safetensors       rank 0's fp32 master partition (one flat tensor)
    optim-rank-00000.safetensors        rank 0's optimizer-state partitions (exp_avg, ...)
    ...                                 one pair per rank that owns a partition
    extra.safetensors                   buffers and frozen parameters (rank 0)
    objects.pt                          only when client_state / a scheduler is not plain JSON

``<save_dir>/latest`` holds the tag of the newest complete checkpoint (DeepSpeed's convention).

Modules, one job each: ``manifest`` (the format; no torch), ``fsutil`` (fsync and renames),
``tensorfile`` (safetensors-format files written with their sha256, ranged reads), ``rng``,
``reshard`` (which byte ranges a rank reads), ``save``/``async_save`` (the atomic protocol),
``load`` (verify, reshard, restore), ``consolidate`` (one plain state_dict file, streamed),
``inspect`` (``orch ckpt ls``/``verify``; no torch) and ``engine_methods`` (the Engine's
``save_checkpoint``/``load_checkpoint``). Importing this package does not import torch.
"""
