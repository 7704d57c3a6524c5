"""Pure-Python reference of the trajectory packer (csrc/packer.cpp): the same plan, naively.

`pack_bins_ref(lengths, max_tokens, ...)` returns the input indices of each micro-batch exactly
as `spyglass.engine._core.pack_bins` does (the algorithm is described at the top of
csrc/packer.cpp: first-fit-decreasing fixes the count, worst-fit-decreasing balances it, with a
split fallback). `pack_flat_ref` builds the flat buffers with numpy. Used by the property tests
in tests/test_packer.py and by `spyglass.engine.packer.pack(..., backend="python")`; its option
check is `spyglass.engine.packer.check_pack_options`. Tests:
`.venv/bin/python -m pytest -q tests/test_packer.py`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spyglass.engine.packer import check_pack_options

FlatMicroBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _first_fit_decreasing(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in order:
        for b, r in enumerate(room):
            if r >= lengths[idx]:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(max_tokens)
        bins[b].append(idx)
        room[b] -= lengths[idx]
    return bins


def _worst_fit_decreasing(order: list[int], lengths: Sequence[int], max_tokens: int,
                          count: int) -> list[list[int]] | None:
    bins: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for idx in order:
        b = min(range(count), key=lambda j: (load[j], j))
        if load[b] + lengths[idx] > max_tokens:
            return None
        bins[b].append(idx)
        load[b] += lengths[idx]
    return bins


def _split_to(bins: list[list[int]], count: int, lengths: Sequence[int]) -> None:
    while len(bins) < count:
        candidates = [b for b in range(len(bins)) if len(bins[b]) >= 2]
        if not candidates:
            raise AssertionError("packer: no micro-batch left to split")
        best = max(candidates, key=lambda b: (len(bins[b]), sum(lengths[i] for i in bins[b]), -b))
        moved = min(bins[best], key=lambda i: (lengths[i], -i))
        bins[best].remove(moved)
        bins.append([moved])


def pack_bins_ref(lengths: Sequence[int], max_tokens: int, min_micro_batches: int = 1,
                  multiple_of: int = 1, allow_oversize: bool = False) -> list[list[int]]:
    """Input indices per micro-batch (each ascending); ValueError names a bad sequence/value."""
    check_pack_options(max_tokens, min_micro_batches, multiple_of)
    lengths = [int(x) for x in lengths]
    n = len(lengths)
    if n == 0:
        raise ValueError("no sequences to pack")
    order, oversize = [], []
    for i, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {i} is empty (length {length})")
        if length > np.iinfo(np.int32).max:
            raise ValueError(f"sequence {i} has {length} tokens: more than int32 cu_seqlens can hold")
        if length > max_tokens:
            if not allow_oversize:
                raise ValueError(f"sequence {i} has {length} tokens > max_tokens {max_tokens} "
                                 "(allow_oversize=True gives it a micro-batch of its own)")
            oversize.append(i)
        else:
            order.append(i)
    order.sort(key=lambda i: (-lengths[i], i))
    ffd = _first_fit_decreasing(order, lengths, max_tokens)
    k = len(oversize)
    m = max(len(ffd) + k, min_micro_batches)
    m = -(-m // multiple_of) * multiple_of
    if m > n:
        raise ValueError(f"cannot form {m} non-empty micro-batches from {n} sequences (max_tokens "
                         f"needs {len(ffd) + k}, min_micro_batches={min_micro_batches}, "
                         f"multiple_of={multiple_of})")
    bins = _worst_fit_decreasing(order, lengths, max_tokens, m - k)
    if bins is None:
        bins = ffd
        _split_to(bins, m - k, lengths)
    bins.extend([i] for i in oversize)
    return [sorted(b) for b in bins]


def pack_flat_ref(tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray, max_tokens: int,
                  min_micro_batches: int = 1, multiple_of: int = 1,
                  allow_oversize: bool = False) -> list[FlatMicroBatch]:
    """Flat tokens [N] int64, masks [N] bool, lengths [n] -> per micro-batch (input_ids [T],
    loss_mask [T], position_ids [T], cu_seqlens [B+1] int32, seq_index [T], indices [B],
    max_seqlen)."""
    bins = pack_bins_ref(lengths.tolist(), max_tokens, min_micro_batches, multiple_of,
                         allow_oversize)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out: list[FlatMicroBatch] = []
    for b in bins:
        lens = lengths[b]
        spans = [slice(offsets[i], offsets[i + 1]) for i in b]
        input_ids = np.concatenate([tokens[s] for s in spans]).astype(np.int64)
        loss_mask = np.concatenate([masks[s] for s in spans]).astype(bool)
        position_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
        cu_seqlens = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        seq_index = np.repeat(np.asarray(b, dtype=np.int64), lens)
        out.append((input_ids, loss_mask, position_ids, cu_seqlens, seq_index,
                    np.asarray(b, dtype=np.int64), int(lens.max())))
    return out
