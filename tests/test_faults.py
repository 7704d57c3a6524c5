"""Tool-failure injection (engine/faults.py): validated config, reproducible hash-keyed decisions,
failed calls never run, sticky outages, rates near the configured p; the replay policy retries a
transiently failed turn and then continues its script; a teacher keeps a transient-error turn."""
import asyncio
import json
from pathlib import Path

import pytest

from spyglass.engine.config import ConfigError, from_dict
from spyglass.engine.env import EnvConfig
from spyglass.engine.faults import FaultConfig, FaultyRunner, wrap_runner
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.policy import ReplayPolicy
from spyglass.engine.rollout import RolloutConfig, run_rollout
from spyglass.engine.trajectory import (ErrorKind, Segment, SegmentKind, Status, ToolResult, Trajectory, Turn,
                                        read_jsonl)
from spyglass.trainer.synth.trajectories import ungrounded

MSG = "Error (transient): {} is unavailable (the service did not answer); try the call again."


class Recorder:
    """A fake inner runner: records the calls it ran, answers each with 'ran <name> <n>'."""

    def __init__(self) -> None:
        self.ran: list[dict] = []

    async def __call__(self, calls, traj):
        self.ran += calls
        return [ToolResult(f"ran {c['name']} {c['arguments']}") for c in calls]


def _traj(tid: str = "q#0") -> Trajectory:
    return Trajectory(id=tid, group_id=tid.split("#")[0], sample_index=0, prompt_ids=[1, 2])


def _calls(n: int, start: int = 0) -> list[dict]:
    return [{"name": "TextSearch", "arguments": str(start + i)} for i in range(n)]


def _run(runner, traj, turns: list[int]) -> list[list[ToolResult]]:
    """Run `turns` (calls per turn) of one trajectory through `runner`; the results per turn."""
    out, k = [], 0
    for n in turns:
        out.append(asyncio.run(runner(_calls(n, k), traj)))
        k += n
    return out


def _failed(results: list[list[ToolResult]]) -> list[bool]:
    return [r.error is not None for turn in results for r in turn]


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw, bad", [({"transient_p": 1.5}, "1.5"), ({"outage_p": -0.1}, "-0.1"),
                                     ({"outage_window": 0}, "0")])
def test_config_names_the_bad_value(kw, bad) -> None:
    with pytest.raises(ConfigError) as e:
        FaultConfig(**kw)
    msg = str(e.value)
    assert "\n" not in msg and next(iter(kw)) in msg and bad in msg
    with pytest.raises(ConfigError, match=next(iter(kw))):  # the same check through the env's config
        from_dict(EnvConfig, {"faults": kw})


def test_off_by_default_and_wrap_only_when_injecting() -> None:
    inner = Recorder()
    assert EnvConfig().faults == FaultConfig() and not FaultConfig().active
    assert wrap_runner(inner, FaultConfig(seed=3)) is inner
    assert isinstance(wrap_runner(inner, FaultConfig(transient_p=0.1)), FaultyRunner)
    assert isinstance(wrap_runner(inner, FaultConfig(outage_p=0.1)), FaultyRunner)


# ------------------------------------------------------------------------------ the runner
def test_same_seed_same_decisions_other_seed_others() -> None:
    def decisions(seed: int) -> list[list[bool]]:
        r = FaultyRunner(Recorder(), FaultConfig(transient_p=0.3, outage_p=0.2, seed=seed))
        return [_failed(_run(r, _traj(f"q{i}#0"), [1, 2, 1, 3])) for i in range(50)]

    assert decisions(7) == decisions(7)
    assert decisions(7) != decisions(8)


def test_decisions_depend_on_the_call_ordinal_not_the_batching() -> None:
    cfg = FaultConfig(transient_p=0.4, seed=1)
    for i in range(20):
        a = _failed(_run(FaultyRunner(Recorder(), cfg), _traj(f"q{i}#0"), [1, 1, 1, 1, 1, 1]))
        b = _failed(_run(FaultyRunner(Recorder(), cfg), _traj(f"q{i}#0"), [2, 3, 1]))
        assert a == b


def test_same_id_in_a_later_step_gets_new_draws() -> None:
    """The scheduler names trajectories '<question>#<sample>' in every GRPO step: the runner
    counts them, so a question is not doomed to the same faults every step; a new runner
    (a rerun with the same seed) replays the same sequence."""
    cfg = FaultConfig(transient_p=0.5, outage_p=0.5, seed=0)

    def steps(runner) -> list[tuple[list[bool], int]]:
        out = []
        for _ in range(8):
            t = _traj("q#0")
            out.append((_failed(_run(runner, t, [1] * 6)), t.meta["faults"]["epoch"]))
        return out

    a, b = steps(FaultyRunner(Recorder(), cfg)), steps(FaultyRunner(Recorder(), cfg))
    assert a == b and [e for _, e in a] == list(range(8))
    assert len({tuple(f) for f, _ in a}) > 1


def test_transient_p_one_fails_every_call_without_running_it() -> None:
    inner = Recorder()
    r = FaultyRunner(inner, FaultConfig(transient_p=1.0))
    t = _traj()
    res = _run(r, t, [2, 1])
    assert inner.ran == []
    flat = [x for turn in res for x in turn]
    assert len(flat) == 3 and all(x.error is not None and x.error.kind is ErrorKind.TRANSIENT for x in flat)
    assert flat[0].shown == flat[0].text == MSG.format("TextSearch") and not flat[0].images
    assert t.meta["faults"] == {"outage_from": None, "injected": 3, "calls": 3, "epoch": 0}


def _with_outage(window: int) -> tuple[FaultyRunner, Recorder, Trajectory, int]:
    """A runner (outage_p=1) and a fresh trajectory whose outage starts at call k > 0."""
    for seed in range(100):
        inner = Recorder()
        r, t = FaultyRunner(inner, FaultConfig(outage_p=1.0, outage_window=window, seed=seed)), _traj()
        r._state(t)
        if t.meta["faults"]["outage_from"] >= 2:
            return r, inner, t, t.meta["faults"]["outage_from"]
    raise AssertionError("no seed gave an outage from call >= 2")


def test_outage_fails_every_call_from_k_and_runs_those_before() -> None:
    r, inner, t, k = _with_outage(window=6)
    res = _run(r, t, [1, 2, 1, 3, 2])  # 9 calls, the outage starts inside a batch or at its edge
    assert _failed(res) == [i >= k for i in range(9)]
    assert [c["arguments"] for c in inner.ran] == [str(i) for i in range(k)]  # only those before ran
    ok = [x for turn in res for x in turn if x.error is None]
    assert [x.text for x in ok] == [f"ran TextSearch {i}" for i in range(k)]  # in order
    assert t.meta["faults"]["outage_from"] == k and t.meta["faults"]["injected"] == 9 - k


def test_a_batch_keeps_its_order_and_only_running_calls_reach_the_inner_runner() -> None:
    inner = Recorder()
    r, t = FaultyRunner(inner, FaultConfig(transient_p=0.5, seed=4)), _traj("mixed#1")
    res = asyncio.run(r(_calls(12), t))
    failed = [x.error is not None for x in res]
    assert any(failed) and not all(failed)
    assert [c["arguments"] for c in inner.ran] == [str(i) for i, f in enumerate(failed) if not f]
    assert [x.text for x, f in zip(res, failed) if not f] == [f"ran TextSearch {c['arguments']}" for c in inner.ran]


def test_a_call_to_a_tool_not_offered_is_left_to_the_inner_runner() -> None:
    inner = Recorder()
    t = _traj()
    t.meta["tools"] = ["OCR"]
    res = asyncio.run(FaultyRunner(inner, FaultConfig(transient_p=1.0))(_calls(1), t))
    assert len(inner.ran) == 1 and res[0].error is None and t.meta["faults"]["injected"] == 0


def test_rates_are_near_the_configured_probabilities() -> None:
    r = FaultyRunner(Recorder(), FaultConfig(transient_p=0.15, seed=11))
    flat = [f for i in range(400) for f in _failed(_run(r, _traj(f"q{i}#0"), [2, 3, 1, 4]))]
    assert len(flat) == 4000 and 0.10 <= sum(flat) / len(flat) <= 0.20
    r = FaultyRunner(Recorder(), FaultConfig(outage_p=0.3, outage_window=4, seed=12))
    starts = []
    for i in range(2000):
        t = _traj(f"q{i}#3")
        r._state(t)
        starts.append(t.meta["faults"]["outage_from"])
    hit = [s for s in starts if s is not None]
    assert 0.25 <= len(hit) / len(starts) <= 0.35
    assert set(hit) == {0, 1, 2, 3} and all(abs(hit.count(k) / len(hit) - 0.25) < 0.06 for k in range(4))


# ------------------------------------------------------------------------------ the replay policy retries
class TextCodec:
    """Just what ReplayPolicy uses of a codec: characters as token ids, 0 as the stop token."""

    stop_token_ids = [0]

    def encode_text(self, s: str) -> list[int]:
        return [ord(c) for c in s]


def _turn(i: int, kinds: list[str] | None = None, n_calls: int = 1) -> Turn:
    calls = [{"name": "TextSearch", "arguments": "{}"}] * n_calls
    return Turn(i, calls=calls, tool_errors=[{"name": "TextSearch", "kind": k, "message": "x"} for k in kinds or []])


def test_replay_retries_a_transiently_failed_turn_then_continues() -> None:
    script = ["call A", "call B", "call C", "<answer>x</answer>"]
    pol, codec = ReplayPolicy(TextCodec(), {"q": script}), TextCodec()

    def emitted(t: Trajectory, turn: int) -> str:
        ids = pol.forced_ids(t, turn)
        assert ids[-1] == 0
        return "".join(map(chr, ids[:-1]))

    t = _traj("q#0")
    assert emitted(t, 0) == "call A"
    t.turns.append(_turn(0, ["transient"]))            # A failed: the world's fault
    assert emitted(t, 1) == "call A"                    # retried
    t.turns.append(_turn(1, ["transient"]))            # failed again
    assert emitted(t, 2) == "call A"
    t.turns.append(_turn(2))                            # A ran
    assert emitted(t, 3) == "call B"
    t.turns.append(_turn(3, ["bad_args"]))             # B's own error: advance as today
    assert emitted(t, 4) == "call C"
    t.turns.append(_turn(4, ["transient"], n_calls=2))  # one of two calls failed: advance
    assert emitted(t, 5) == "<answer>x</answer>"
    assert emitted(t, 6) == pol.fallback_answer
    # the cache is keyed by script index: another sample with no failures gets B at turn 1
    u = _traj("q#1")
    u.turns.append(_turn(0))
    assert emitted(u, 1) == "call B"
    assert codec.encode_text("call B") + [0] == pol.forced_ids(u, 1)


# ------------------------------------------------------------------------------ the teacher's filter
def _seg_gen(turn: int, text: str) -> Segment:
    return Segment(SegmentKind.GEN, [1], turn=turn, logprobs=[0.0], version=0, text=text)


def _seg_obs(turn: int, text: str) -> Segment:
    return Segment(SegmentKind.OBS, [2], turn=turn, text=text)


def _teacher_traj(first_error: str) -> Trajectory:
    t = _traj("q#0")
    t.meta["question"] = "Who painted the red harbour?"
    call = {"name": "TextSearch", "arguments": json.dumps({"query": "red harbour"})}
    t.turns = [Turn(0, calls=[call], tool_errors=[{"name": "TextSearch", "kind": first_error, "message": "Error"}]),
               Turn(1, calls=[call]), Turn(2, answered=True)]
    t.segments = [_seg_gen(0, "s"), _seg_obs(0, MSG.format("TextSearch")), _seg_gen(1, "s"),
                  _seg_obs(1, "The red harbour was painted by Ana Vidal."), _seg_gen(2, "a")]
    t.answer, t.status = "Ana Vidal", Status.ANSWERED
    return t


def test_ungrounded_keeps_a_transient_error_turn_and_rejects_a_bad_args_one() -> None:
    assert ungrounded(_teacher_traj("transient")) is None
    why = ungrounded(_teacher_traj("bad_args"))
    assert why is not None and why.startswith("tool error at turn 0")


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


def _rollout(world: Path, out: Path, faults: dict) -> list[Trajectory]:
    cfg = from_dict(RolloutConfig, {"env": {"world_dir": str(world), "questions": 2, "dense_search": False,
                                            "faults": faults},
                                    "engine": {"n_samples": 3, "check_tokens": True, "strict_tokens": True},
                                    "out": str(out), "progress": False})
    run_rollout(cfg)
    return read_jsonl(out)


def test_replay_rollout_under_transient_faults_retries_and_answers(world: Path, tmp_path: Path) -> None:
    """Real tools, tiny model, the replay policy: failed calls are retried, images keep their
    names (a failed Crop adds none), and every trajectory without a cascade answers right."""
    trajs = _rollout(world, tmp_path / "r.jsonl", {"transient_p": 0.25, "seed": 5})
    assert len(trajs) == 6 and all("faults" in t.meta for t in trajs)
    assert sum(t.meta["faults"]["injected"] for t in trajs) > 0
    retried = 0
    for t in trajs:
        failed = [turn for turn in t.turns if turn.tool_errors]
        assert all(e["kind"] == "transient" and e["message"] == MSG.format(e["name"])
                   for turn in failed for e in turn.tool_errors)
        assert sum(len(turn.tool_errors) for turn in t.turns) == t.meta["faults"]["injected"]
        for a, b in zip(t.turns, t.turns[1:]):
            if a.tool_errors:  # the next turn retries the same call
                assert b.calls == a.calls
        if t.status is Status.ANSWERED:
            assert t.answer == t.meta["answer"]
            retried += bool(failed)
        else:
            assert t.status is Status.FATAL  # only a run of fatal_k failures stops a replay
    assert retried > 0


def test_replay_rollout_under_a_sticky_outage_ends_in_the_cascade(world: Path, tmp_path: Path) -> None:
    trajs = _rollout(world, tmp_path / "r.jsonl", {"outage_p": 1.0, "outage_window": 2})
    assert len(trajs) == 6
    for t in trajs:
        k = t.meta["faults"]["outage_from"]
        assert k in (0, 1) and t.status is Status.FATAL
        calls = [turn for turn in t.turns if turn.calls]
        assert all(not turn.tool_errors for turn in calls[:k]) and all(turn.tool_errors for turn in calls[k:])
