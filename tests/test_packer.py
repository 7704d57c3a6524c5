"""Trajectory packer: C++ equals the Python reference exactly, plus packing invariants."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spyglass.engine import _core
from spyglass.engine.packer import MicroBatch, pack
from spyglass.engine.packer_ref import pack_bins_ref

BACKENDS = ["cpp", "python"]


def _seqs(lengths: list[int], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    toks = [rng.integers(0, 1000, size=n) for n in lengths]
    masks = [rng.integers(0, 2, size=n).astype(bool) for n in lengths]
    return toks, masks


def _check_invariants(mbs: list[MicroBatch], toks: list[np.ndarray], masks: list[np.ndarray],
                      max_tokens: int) -> None:
    seen = np.concatenate([mb.indices for mb in mbs])
    assert sorted(seen.tolist()) == list(range(len(toks)))  # every sequence exactly once
    assert sum(mb.num_tokens for mb in mbs) == sum(len(t) for t in toks)  # every token once
    for mb in mbs:
        assert mb.num_sequences >= 1
        assert mb.num_tokens <= max_tokens or mb.num_sequences == 1
        assert mb.input_ids.dtype == np.int64 and mb.loss_mask.dtype == bool
        assert mb.position_ids.dtype == np.int64 and mb.seq_index.dtype == np.int64
        assert mb.cu_seqlens.dtype == np.int32 and mb.cu_seqlens.shape == (mb.num_sequences + 1,)
        assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.num_tokens
        assert list(mb.indices) == sorted(mb.indices)
        lens = np.diff(mb.cu_seqlens)
        assert mb.max_seqlen == lens.max()
        for j, idx in enumerate(mb.indices):
            s = slice(mb.cu_seqlens[j], mb.cu_seqlens[j + 1])
            assert lens[j] == len(toks[idx])
            np.testing.assert_array_equal(mb.input_ids[s], toks[idx])
            np.testing.assert_array_equal(mb.loss_mask[s], masks[idx])
            np.testing.assert_array_equal(mb.position_ids[s], np.arange(lens[j]))
            assert (mb.seq_index[s] == idx).all()


def _assert_same(a: list[MicroBatch], b: list[MicroBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("input_ids", "loss_mask", "position_ids", "cu_seqlens", "seq_index",
                     "indices"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype, name
            np.testing.assert_array_equal(u, v, err_msg=name)
        assert x.max_seqlen == y.max_seqlen


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_example_exact(backend: str) -> None:
    toks, masks = _seqs([5, 3, 7, 2, 2])
    mbs = pack(toks, masks, max_tokens=8, backend=backend)
    # FFD needs 3 micro-batches; worst-fit-decreasing over 3 balances them as 7 | 5+2 | 3+2.
    assert [mb.indices.tolist() for mb in mbs] == [[2], [0, 4], [1, 3]]
    assert mbs[1].cu_seqlens.tolist() == [0, 5, 7]
    assert mbs[1].position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert mbs[1].seq_index.tolist() == [0] * 5 + [4] * 2
    _check_invariants(mbs, toks, masks, 8)


def test_lists_of_ints_accepted_and_split_fallback_matches() -> None:
    # Worst-fit-decreasing cannot fit this at 11 micro-batches: first-fit-decreasing bins split.
    lengths = [3, 2, 2, 2, 2, 3, 2, 3, 3, 3, 3, 2, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 3, 2]
    toks = [list(range(i, i + n)) for i, n in enumerate(lengths)]
    masks = [[1] * n for n in lengths]
    cpp = pack(toks, masks, 6, min_micro_batches=11)
    ref = pack(toks, masks, 6, min_micro_batches=11, backend="python")
    _assert_same(cpp, ref)
    assert len(cpp) == 11
    assert [mb.indices.tolist() for mb in cpp][-1] == [4]
    _check_invariants(cpp, [np.asarray(t) for t in toks], [np.asarray(m, bool) for m in masks], 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_and_multiple_of_micro_batches(backend: str) -> None:
    toks, masks = _seqs([10] * 12)
    mbs = pack(toks, masks, 1000, min_micro_batches=3, multiple_of=4, backend=backend)
    assert len(mbs) == 4 and all(mb.num_tokens == 30 for mb in mbs)
    with pytest.raises(ValueError, match="cannot form 16 non-empty micro-batches from 12"):
        pack(toks, masks, 1000, min_micro_batches=13, multiple_of=8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversize_error_and_flag(backend: str) -> None:
    toks, masks = _seqs([4, 9, 3, 12])
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens > max_tokens 8"):
        pack(toks, masks, 8, backend=backend)
    mbs = pack(toks, masks, 8, allow_oversize=True, backend=backend)
    assert [mb.indices.tolist() for mb in mbs] == [[0, 2], [1], [3]]
    _check_invariants(mbs, toks, masks, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_names_offender(backend: str) -> None:
    toks, masks = _seqs([4, 5, 6])
    with pytest.raises(ValueError, match="sequence 1: 5 token ids but 4 mask values"):
        pack(toks, [masks[0], masks[1][:4], masks[2]], 64, backend=backend)
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        pack([[1], [2], []], [[1], [1], []], 64, backend=backend)
    with pytest.raises(ValueError, match="sequence 1 has a negative token id -3"):
        pack([[1, 2], [5, -3]], [[1, 1], [1, 1]], 64, backend=backend)
    with pytest.raises(ValueError, match="loss_mask 2 has value 2"):
        pack([[1], [2], [3, 4]], [[1], [0], [1, 2]], 64, backend=backend)
    with pytest.raises(ValueError, match="token_ids 0 must be 1-D"):
        pack([np.zeros((2, 2), np.int64)], [np.ones(4)], 64, backend=backend)
    with pytest.raises(ValueError, match="token_ids 1 must hold integers"):
        pack([[1], [1.5]], [[1], [1]], 64, backend=backend)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        pack(toks, masks, 0, backend=backend)
    with pytest.raises(ValueError, match="no sequences to pack"):
        pack([], [], 64, backend=backend)
    with pytest.raises(ValueError, match="2 token sequences but 1 loss masks"):
        pack(toks[:2], masks[:1], 64, backend=backend)


def test_bindings_check_arguments() -> None:
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        _core.pack_bins(np.array([3, 0]), 8)
    with pytest.raises(ValueError, match="lengths must be a 1-D integer array"):
        _core.pack_bins(np.array([3.0, 1.0]), 8)
    with pytest.raises(ValueError, match="lengths sum to 5 but tokens has 4"):
        _core.pack(np.arange(4), np.ones(4, bool), np.array([2, 3]), 8)
    with pytest.raises(ValueError, match="masks must be a contiguous 1-D bool array"):
        _core.pack(np.arange(5), np.ones(5, np.int8), np.array([2, 3]), 8)
    with pytest.raises(ValueError, match="multiple_of must be >= 1, got 0"):
        _core.pack_bins(np.array([3]), 8, 1, 0)
    with pytest.raises(ValueError, match="max_tokens must fit int32"):
        _core.pack_bins(np.array([3]), 2**31)


def test_balanced_when_room_is_ample() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(50, 2000, size=64).tolist()
    toks, masks = _seqs(lengths)
    mbs = pack(toks, masks, 10**6, min_micro_batches=8)
    loads = [mb.num_tokens for mb in mbs]
    assert len(loads) == 8
    assert max(loads) - min(loads) <= max(lengths)  # worst-fit-decreasing bound


def test_to_torch_is_zero_copy() -> None:
    torch = pytest.importorskip("torch")
    toks, masks = _seqs([5, 3, 7])
    mb = pack(toks, masks, 64)[0]
    t = mb.to_torch()
    assert t["input_ids"].dtype == torch.int64 and t["cu_seqlens"].dtype == torch.int32
    assert t["loss_mask"].dtype == torch.bool and t["max_seqlen"] == 7
    assert t["input_ids"].data_ptr() == mb.input_ids.ctypes.data


lengths_st = st.one_of(
    st.lists(st.integers(1, 40), min_size=1, max_size=40),
    st.integers(1, 12).flatmap(lambda lo: st.lists(st.integers(lo, lo + 3), min_size=1,
                                                   max_size=40)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=lengths_st, max_tokens=st.integers(1, 64), min_mb=st.integers(1, 12),
       multiple_of=st.integers(1, 4), allow_oversize=st.booleans())
def test_property_cpp_equals_reference(lengths: list[int], max_tokens: int, min_mb: int,
                                       multiple_of: int, allow_oversize: bool) -> None:
    args = (max_tokens, min_mb, multiple_of, allow_oversize)
    try:
        ref_bins = pack_bins_ref(lengths, *args)
    except ValueError as exc:
        with pytest.raises(ValueError) as cpp_exc:
            _core.pack_bins(np.asarray(lengths), *args)
        assert str(cpp_exc.value) == str(exc)
        return
    assert _core.pack_bins(np.asarray(lengths), *args) == ref_bins
    toks, masks = _seqs(lengths, seed=len(lengths))
    kw = dict(min_micro_batches=min_mb, multiple_of=multiple_of, allow_oversize=allow_oversize)
    cpp = pack(toks, masks, max_tokens, **kw)
    _assert_same(cpp, pack(toks, masks, max_tokens, backend="python", **kw))
    _check_invariants(cpp, toks, masks, max_tokens)
    assert len(cpp) % multiple_of == 0 and len(cpp) >= min_mb
    if max(lengths) <= max_tokens:  # no more micro-batches than first-fit-decreasing + padding
        ffd = pack_bins_ref(lengths, max_tokens)
        need = -(-max(len(ffd), min_mb) // multiple_of) * multiple_of
        assert len(cpp) == max(need, len(ffd))
