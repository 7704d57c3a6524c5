"""Trajectory packer: many sequences -> flat varlen micro-batches of at most max_tokens tokens.

Each `MicroBatch` holds, for T packed tokens of B sequences: `input_ids` [T] int64, `loss_mask`
[T] bool, `position_ids` [T] int64 (restarting at 0 per sequence), `cu_seqlens` [B+1] int32 (for
varlen attention), `seq_index` [T] int64 (each token's sequence index in the input list, to
gather its advantage), `indices` [B] int64 (the input sequences, ascending) and `max_seqlen`.
The plan (first-fit-decreasing for the count, worst-fit-decreasing to balance tokens, count
raised to `min_micro_batches` and padded to a multiple of `multiple_of` for data-parallel ranks)
is described in csrc/packer.cpp; the C++ core writes straight into numpy arrays and
`MicroBatch.to_torch()` wraps them without copying. The option validator `check_pack_options`
lives here and the reference (`spyglass.engine.packer_ref`) imports it; the reference itself is
imported only when ``backend="python"`` asks for it.

    mbs = pack([[1, 2, 3], [4, 5]], [[0, 1, 1], [1, 1]], max_tokens=4096)

Tests: `.venv/bin/python -m pytest -q tests/test_packer.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SeqLike = Sequence[int] | np.ndarray


def check_pack_options(max_tokens: int, min_micro_batches: int, multiple_of: int) -> None:
    """Raise ValueError naming the bad option."""
    for name, value in (("max_tokens", max_tokens), ("min_micro_batches", min_micro_batches),
                        ("multiple_of", multiple_of)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_tokens > np.iinfo(np.int32).max:
        raise ValueError(f"max_tokens must fit int32 cu_seqlens, got {max_tokens}")


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch (shapes: T tokens, B sequences)."""

    input_ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] bool
    position_ids: np.ndarray  # [T] int64, 0.. per sequence
    cu_seqlens: np.ndarray  # [B+1] int32
    seq_index: np.ndarray  # [T] int64, input index of each token's sequence
    indices: np.ndarray  # [B] int64, input indices ascending
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.indices.shape[0])

    def to_torch(self, device: Any = None) -> dict[str, Any]:
        """The arrays as torch tensors (zero-copy on CPU) plus max_seqlen."""
        import torch

        out: dict[str, Any] = {
            name: torch.from_numpy(getattr(self, name))
            for name in ("input_ids", "loss_mask", "position_ids", "cu_seqlens", "seq_index",
                         "indices")
        }
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        out["max_seqlen"] = self.max_seqlen
        return out


def _as_1d(seq: SeqLike, i: int, what: str, kinds: str) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{what} {i} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in kinds:
        raise ValueError(f"{what} {i} must hold integers, got dtype {arr.dtype}")
    return arr


def flatten(token_ids: Sequence[SeqLike], loss_masks: Sequence[SeqLike]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and concatenate: tokens [N] int64, masks [N] bool, lengths [n] int64.

    Errors name the offending sequence: length mismatch, not 1-D, negative token ids, mask
    values other than 0/1, empty sequences.
    """
    if len(token_ids) != len(loss_masks):
        raise ValueError(f"got {len(token_ids)} token sequences but {len(loss_masks)} loss masks")
    n = len(token_ids)
    toks, masks = [], []
    lengths = np.empty(n, dtype=np.int64)
    for i in range(n):
        t = _as_1d(token_ids[i], i, "token_ids", "iu")
        m = _as_1d(loss_masks[i], i, "loss_mask", "biuf")
        if t.shape[0] != m.shape[0]:
            raise ValueError(f"sequence {i}: {t.shape[0]} token ids but {m.shape[0]} mask values")
        if t.shape[0] == 0:
            raise ValueError(f"sequence {i} is empty (length 0)")
        lengths[i] = t.shape[0]
        toks.append(t)
        masks.append(m)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, bool), lengths
    flat_t = np.concatenate(toks).astype(np.int64, copy=False)
    flat_m_raw = np.concatenate(masks)
    ends = np.cumsum(lengths)
    bad = np.flatnonzero(flat_t < 0)
    if bad.size:
        i = int(np.searchsorted(ends, bad[0], side="right"))
        raise ValueError(f"sequence {i} has a negative token id {int(flat_t[bad[0]])}")
    if flat_m_raw.dtype != bool:
        bad = np.flatnonzero((flat_m_raw != 0) & (flat_m_raw != 1))
        if bad.size:
            i = int(np.searchsorted(ends, bad[0], side="right"))
            raise ValueError(f"loss_mask {i} has value {flat_m_raw[bad[0]].item()!r}; expected 0 or 1")
    return flat_t, np.ascontiguousarray(flat_m_raw.astype(bool, copy=False)), lengths


def pack(token_ids: Sequence[SeqLike], loss_masks: Sequence[SeqLike], max_tokens: int, *,
         min_micro_batches: int = 1, multiple_of: int = 1, allow_oversize: bool = False,
         backend: str = "cpp") -> list[MicroBatch]:
    """Pack sequences into micro-batches of at most `max_tokens` tokens.

    `min_micro_batches` raises the count (e.g. one per gradient-accumulation step);
    `multiple_of` pads it to a multiple (e.g. the data-parallel world size), every micro-batch
    non-empty. A sequence longer than `max_tokens` is an error naming it, or with
    `allow_oversize=True` a micro-batch of its own. `backend`: "cpp" or "python" (reference).
    """
    check_pack_options(max_tokens, min_micro_batches, multiple_of)
    tokens, masks, lengths = flatten(token_ids, loss_masks)
    args = (tokens, masks, lengths, int(max_tokens), int(min_micro_batches), int(multiple_of),
            bool(allow_oversize))
    if backend == "cpp":
        from spyglass.engine import _core
        flat = _core.pack(*args)
    elif backend == "python":
        from spyglass.engine.packer_ref import pack_flat_ref  # noqa: PLC0415
        flat = pack_flat_ref(*args)
    else:
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    return [MicroBatch(*mb) for mb in flat]
