"""The Trajectory record: masks, fatal step, lossless JSONL, messages view."""
import json

import numpy as np
import pytest
from PIL import Image

from spyglass.engine.trajectory import (
    Segment, SegmentKind, Status, Trajectory, Turn, fatal_step_of, iter_jsonl, read_jsonl,
    write_jsonl)


def _img(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _traj() -> Trajectory:
    t = Trajectory(id="g0-1", group_id="g0", sample_index=1, prompt_ids=[1, 2, 3],
                   prompt_images=[_img(0)],
                   prompt_messages=[{"role": "user", "content": "what is this? ünïcödé"}])
    t.segments = [
        Segment(SegmentKind.GEN, [10, 11], turn=0, logprobs=[-0.5, -0.25], version=3,
                text="<tool_call>…</tool_call>", finish_reason="stop"),
        Segment(SegmentKind.OBS, [20, 21, 22], turn=0, images=[_img(1), _img(2, "L")], text="ok"),
        Segment(SegmentKind.GEN, [12], turn=1, logprobs=[-1e-9], version=4, text="x"),
        Segment(SegmentKind.OBS, [23], turn=1, text="error"),
        Segment(SegmentKind.GEN, [13, 14], turn=2, logprobs=[-2.0, -3.5], version=4),
    ]
    t.turns = [Turn(0, calls=[{"name": "crop", "arguments": "{}"}]),
               Turn(1, tool_errors=[{"name": "ocr", "kind": "fatal", "message": "x"}]),
               Turn(2, answered=True)]
    t.status = Status.ANSWERED
    t.reward = {"fmt": 2 / 3, "acc": 1.0}
    return t


def test_masks_and_views() -> None:
    t = _traj()
    assert t.token_ids() == [1, 2, 3, 10, 11, 20, 21, 22, 12, 23, 13, 14]
    assert t.loss_mask() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1]
    t.fatal_step = 1
    assert t.loss_mask(fatal=True) == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert len(t.logprobs()) == t.num_tokens == 12
    assert t.versions() == [3, 4, 4]
    assert len(t.images()) == 3
    msgs = t.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[2]["images"] == ["img_2", "img_3"]


def test_jsonl_roundtrip_is_lossless(tmp_path) -> None:
    t = _traj()
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [t, t])
    back = read_jsonl(p)
    assert len(back) == 2
    assert json.dumps(back[0].to_json(), sort_keys=True) == json.dumps(t.to_json(), sort_keys=True)
    for a, b in zip(t.images(), back[0].images()):
        assert a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()
    assert back[0].segments[2].logprobs.tolist() == [-1e-9]


def test_torn_tail_is_skipped_but_corruption_elsewhere_is_named(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [_traj()])
    with open(p, "a") as f:
        f.write('{"format": 1, "id": "trunc')  # a crash mid-write
    assert len(list(iter_jsonl(p))) == 1
    with open(p, "a") as f:
        f.write("\n")
    write_jsonl(p, [_traj()])
    with pytest.raises(ValueError, match=r"t.jsonl:2"):
        read_jsonl(p)


def test_fatal_step_rules() -> None:
    # K=3 consecutive errors: f is the first of the run; a success resets the count
    assert fatal_step_of([True, False, False, True, False, False, False, True], k=3) == 4
    assert fatal_step_of([False, False, True, False, False], k=3) is None
    # no cascade: never fatal, answered or not (max turns, repetition: an anomaly, not a cascade)
    assert fatal_step_of([True, False, True], k=3) is None
    assert fatal_step_of([None, False, None, False, False], k=3) == 1  # None neither counts nor resets
    assert fatal_step_of([False, None, True, False, False], k=3) is None
    assert fatal_step_of([None, None, None], k=1) is None
    with pytest.raises(ValueError):
        fatal_step_of([], k=0)
    t = _traj()
    assert t.compute_fatal_step() is None
    t.status = Status.TRUNCATED
    assert t.compute_fatal_step() is None  # truncated without a cascade: an anomaly, not fatal


def test_turn_ok() -> None:
    assert not Turn(0).ok  # no call, no answer: a format error
    assert Turn(0, answered=True).ok
    assert not Turn(0, calls=[{"name": "a"}], parse_errors=[{"kind": "invalid_json"}]).ok


def test_cascade_flag_by_fatal_errors() -> None:
    """Each kind of step under "any" and "tool": (any, tool)."""
    call, bad = [{"name": "Crop"}], [{"kind": "invalid_json"}]
    tool_err = [{"name": "Crop", "kind": "fatal"}]
    table = [
        (Turn(0, calls=call), (True, True)),  # a call that ran
        (Turn(0, answered=True), (True, True)),
        (Turn(0, calls=call, tool_errors=tool_err), (False, False)),  # a tool failed
        (Turn(0), (False, None)),  # no call, no answer
        (Turn(0, parse_errors=[{"kind": "unterminated_tag"}]), (False, None)),  # a runaway turn
        (Turn(0, calls=call, parse_errors=bad), (False, None)),  # one good call, one malformed
        (Turn(0, calls=call, parse_errors=bad, tool_errors=tool_err), (False, False)),  # both
        (Turn(0, env_ok=False), (False, False)),  # a custom environment's verdict, as given
        (Turn(0, env_ok=True), (True, True)),
    ]
    for turn, want in table:
        assert (turn.cascade_flag("any"), turn.cascade_flag("tool")) == want, turn
    with pytest.raises(ValueError, match="errors must be one of"):
        Turn(0).cascade_flag("format")


def test_segment_validation() -> None:
    with pytest.raises(ValueError, match="2 tokens has 1 logprobs"):
        Segment(SegmentKind.GEN, [1, 2], turn=0, logprobs=[0.0], version=0)
    with pytest.raises(ValueError, match="version"):
        Segment(SegmentKind.GEN, [1], turn=0, logprobs=[0.0])
    with pytest.raises(ValueError):
        Segment("bogus", [1], turn=0)
    with pytest.raises(ValueError, match="format"):
        Trajectory.from_json({"format": 99})


def test_truncate_torn_tail(tmp_path) -> None:
    from spyglass.engine.trajectory import truncate_torn_tail
    p = tmp_path / "t.jsonl"
    write_jsonl(p, [_traj()])
    good = p.read_bytes()
    assert truncate_torn_tail(p) == 0
    with open(p, "ab") as f:
        f.write(b'{"format": 1, "id": "half')
    assert truncate_torn_tail(p) == 25 and p.read_bytes() == good
    p.write_bytes(b"no newline at all")
    assert truncate_torn_tail(p) == 17 and p.read_bytes() == b""
