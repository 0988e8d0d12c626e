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
``state_names`` (plain state_dict names, tied weights, buffers), ``reshard`` (which byte ranges
a rank reads), ``collective`` (agreeing across ranks), ``save``/``async_save`` (the atomic
protocol), ``load`` (verify, reshard, restore), ``consolidate`` and ``torch_archive`` (one plain
state_dict file, streamed), ``inspect`` (``orch ckpt ls``/``verify``; no torch) and
``engine_methods`` (the Engine's ``save_checkpoint``/``load_checkpoint``). Importing this
package does not import torch.

Why not ``torch.distributed.checkpoint``: it describes tensors as N-d chunks (DTensor /
ShardedTensor), while a ZeRO partition is a flat run of elements that cuts across parameters, so
it would have to be re-described per parameter anyway; and it offers no checksums, and its
consolidation helper (``dcp_to_torch_save``) builds the whole state_dict in memory. Our manifest
keeps every parameter's runs, so a rank reads exact byte ranges and consolidation streams.
"""
