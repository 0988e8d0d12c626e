"""The flat layout: every element owned exactly once, equal padded partitions, lossless resharding."""
from __future__ import annotations

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.zero.partition import ALIGNMENT, FlatLayout

shapes = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=6)
groups_of_shapes = st.lists(shapes, min_size=1, max_size=3)


def build(groups: list[list[list[int]]], count: int) -> FlatLayout:
    named = [[(f"g{g}.p{i}", torch.empty(shape)) for i, shape in enumerate(group)] for g, group in enumerate(groups)]
    return FlatLayout.build(named, count)


@settings(max_examples=60, deadline=None)
@given(groups_of_shapes, st.integers(1, 5))
def test_partitions_are_equal_aligned_and_cover_every_element_once(groups, count) -> None:
    layout = build(groups, count)
    assert layout.numel == sum(torch.Size(s).numel() for g in groups for s in g)
    for g in layout.groups:
        assert g.partition_numel % ALIGNMENT == 0 and g.padded_numel >= g.numel
        assert g.padded_numel - g.numel < count * ALIGNMENT + count  # padding stays small
    owned = torch.zeros(layout.numel, dtype=torch.int64)
    for rank in range(count):
        for seg in layout.segments(rank):
            owned[seg.canonical_start:seg.canonical_end] += 1
            assert seg.local_start + seg.numel <= layout.partition_numel
    assert bool((owned == 1).all())


@settings(max_examples=60, deadline=None)
@given(groups_of_shapes, st.integers(1, 5), st.integers(1, 5))
def test_resharding_through_the_canonical_vector_is_lossless(groups, count, new_count) -> None:
    old, new = build(groups, count), build(groups, new_count)
    full = torch.arange(old.numel, dtype=torch.float32)
    parts = [old.shard(full, r) for r in range(count)]
    assert all(p.numel() == old.partition_numel for p in parts)
    moved = new.unshard([new.shard(old.unshard(parts), r) for r in range(new_count)])
    assert torch.equal(moved, full)


@settings(max_examples=60, deadline=None)
@given(groups_of_shapes, st.integers(1, 5), st.integers(1, 200))
def test_buckets_hold_whole_parameters_of_one_group_and_owners_cover_them(groups, count, size) -> None:
    layout = build(groups, count)
    buckets = layout.buckets(size)
    assert sorted(i for b in buckets for i in b.params) == list(range(len(layout.params)))
    for b in buckets:
        entries = [layout.params[i] for i in b.params]
        assert {e.group for e in entries} == {b.group}
        assert b.numel == sum(e.numel for e in entries)
        assert b.numel <= size or len(entries) == 1
        covered = sorted((lo, hi) for _, lo, hi in b.pieces)
        assert covered[0][0] == 0 and covered[-1][1] == b.numel
        assert all(a[1] == c[0] for a, c in zip(covered, covered[1:]))
        for rank, lo, hi in b.pieces:
            start, end = layout.groups[b.group].partition_range(rank)
            assert start <= b.start + lo and b.start + hi <= end


def test_layout_survives_a_json_manifest() -> None:
    layout = build([[[3, 5], [7]], [[11]]], 4)
    restored = FlatLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert restored == layout
    entry = restored.params[1]
    assert (entry.name, entry.shape, entry.numel, entry.dtype, entry.offset) == ("g0.p1", (7,), 7, "float32", 15)
    assert restored.groups[1].canonical_offset == 22 and restored.groups[1].local_offset == layout.groups[0].partition_numel
