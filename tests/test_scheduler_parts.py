"""The scheduler's parts one by one (engine/sched/): admission, placement and failover, limits and
deadlines, observation assembly and its hooks, the launch policies, typed events, the GC policy,
the token check, and the one tool-result type. The whole loop: tests/test_scheduler.py."""
import asyncio
import collections
import gc
import json
import re
import time

import pytest
from PIL import Image

import spyglass.engine as public
from spyglass.engine import scheduler
from spyglass.engine.backends.base import Backend, GenerateOutput, GenerateRequest
from spyglass.engine.chat import ByteCodec
from spyglass.engine.env import ExecutorRunner
from spyglass.engine.policy import ReplayPolicy, script_turns
from spyglass.engine.sched import events as ev
from spyglass.engine.sched.admission import Admission
from spyglass.engine.sched.events import Inbox, Live
from spyglass.engine.sched.gcpolicy import FrozenGC
from spyglass.engine.sched.launch import UNLIMITED, Continuous, LockStep
from spyglass.engine.sched.limits import Deadlines, Limits
from spyglass.engine.sched.observe import ObservationBuilder, recite_question
from spyglass.engine.sched.placement import Placement
from spyglass.engine.sched.tokencheck import check_tokens
from spyglass.engine.scheduler import Engine, EngineConfig
from spyglass.engine.tools import base as tools_base
from spyglass.engine.tools.base import Tool, ToolContext
from spyglass.engine.tools.executor import ToolExecutor
from spyglass.engine.trajectory import (ErrorKind, ParsedTurn, Prompt, Segment, SegmentKind, Status, ToolError,
                                        ToolOutcome, ToolResult, Trajectory, Turn)

CODEC = ByteCodec()


def traj(question: str = "q", turns: list[Turn] | None = None, last_gen: list[int] | None = None) -> Trajectory:
    t = Trajectory("p#0", "p", 0, [1, 2, 3], prompt_messages=[{"role": "user", "content": question}])
    t.turns = turns or []
    if last_gen is not None:
        t.segments.append(Segment(SegmentKind.GEN, last_gen, turn=0, logprobs=[0.0] * len(last_gen), version=0))
    return t


def live(t: Trajectory | None = None, server: int = 0, deadline: float = 1e18) -> Live:
    t = t or traj()
    return Live(t, server, deadline, ntok=len(t.prompt_ids))


# ----------------------------------------------------------------------------- admission
def test_admission_the_one_rule() -> None:
    cfg = EngineConfig(n_samples=4, max_live=10)
    adm = Admission(cfg, version=lambda: 0)
    assert adm.next(0) is None and adm.exhausted  # no run started
    adm.start(Prompt(f"p{i}", "q") for i in range(3))
    assert adm.next(0).id == "p0" and adm.next(4).id == "p1"
    assert adm.next(7) is None  # 7 + 4 > 10
    assert adm.next(0, open=False) is None  # paused, or the launch policy's gate is shut
    assert adm.next(6).id == "p2" and adm.admitted == 3 and not adm.exhausted
    assert adm.next(0) is None and adm.exhausted  # no prompt left
    # a group larger than max_live is still admitted alone
    big = Admission(EngineConfig(n_samples=8, max_live=2), version=lambda: 0)
    big.start([Prompt("a", "q"), Prompt("b", "q")])
    assert big.next(0).id == "a" and big.next(8) is None


def test_admission_staleness_bound_follows_the_version() -> None:
    version = [5]
    cfg = EngineConfig(n_samples=1, max_live=100, max_version_lag=1, groups_per_step=2)
    adm = Admission(cfg, version=lambda: version[0])
    adm.start(Prompt(f"p{i}", "q") for i in range(10))
    got = [adm.next(0) for _ in range(5)]
    assert [p.id for p in got[:4]] == ["p0", "p1", "p2", "p3"] and got[4] is None  # (lag + 1) * 2
    version[0] = 6
    assert adm.next(0).id == "p4" and adm.next(0).id == "p5" and adm.next(0) is None
    assert Admission(EngineConfig(), version=lambda: 0).fresh_enough()  # -1: off


# ----------------------------------------------------------------------------- placement
def test_placement_affinity_slots_and_budget() -> None:
    pl = Placement(n_servers=2, max_inflight=2, max_moves=3)
    s = pl.pick()
    assert s == 0
    pl.load[0] += 3
    assert pl.pick() == 1 and pl.pick(exclude=1) == 0
    lvs = [live(server=0) for _ in range(3)] + [live(server=1)]
    for lv in lvs:
        pl.ready_up(lv)
    started = []
    for lv in pl.pop_ready(budget=10):
        pl.start(lv)
        started.append(lv)
    assert started == [lvs[0], lvs[1], lvs[3]] and pl.inflight == [2, 1]  # server 0 is full at 2
    pl.ended(lvs[0])
    assert list(pl.pop_ready(budget=0)) == [] and len(pl.ready[0]) == 1
    assert list(pl.pop_ready(budget=1)) == [lvs[2]]


def test_placement_failover_moves_then_gives_up() -> None:
    pl = Placement(n_servers=3, max_inflight=8, max_moves=2)
    pl.load = [1, 5, 0]
    lv = live(server=0)
    assert pl.failover(lv) and lv.server == 2 and pl.up == [False, True, True]
    assert pl.load == [0, 5, 1] and list(pl.ready[2]) == [lv]
    pl.ready[2].clear()
    assert pl.failover(lv) and lv.server == 1 and pl.up == [False, True, False]  # 0 is down
    assert not pl.failover(lv) and lv.moves == 3 and lv.server == 1  # out of moves: stays
    pl.answered(0)
    assert pl.up[0] and pl.pick(exclude=1) == 0
    # every server down: any other one (never the failed one)
    pl.up = [False, False, False]
    assert pl.pick(exclude=2) in (0, 1) and Placement(1, 1, 1).pick(exclude=0) == 0


# ----------------------------------------------------------------------------- limits and deadlines
def test_limits_repetition_cascade_turns_context() -> None:
    cfg = EngineConfig(fatal_k=2, max_turns=3, max_context=100, repetition_min_tokens=16,
                       repetition_max_period=4, repetition_min_repeats=4)
    lim = Limits(cfg, CODEC.stop_token_ids)
    assert lim.repetitive([1, 2] * 10 + [CODEC.IM_END])  # the stop token is not part of the body
    assert not lim.repetitive([1, 2] * 7)  # shorter than repetition_min_tokens
    assert not lim.repetitive(list(range(40)))
    bad, good = Turn(0, parse_errors=[{"kind": "x"}]), Turn(0, calls=[{"name": "a"}])
    assert lim.after_turn(traj(turns=[good, bad])) is None
    assert lim.after_turn(traj(turns=[good, bad, bad])) == (Status.FATAL, "fatal_cascade")
    assert lim.after_turn(traj(turns=[bad, good, good])) == (Status.TRUNCATED, "max_turns")
    lv = live(traj(turns=[good]), deadline=10.0)
    assert lim.after_observation(lv, now=5.0) is None
    lv.ntok = 100
    assert lim.after_observation(lv, now=5.0) == (Status.TRUNCATED, "max_context")
    assert lim.after_observation(lv, now=10.0) == (Status.TRUNCATED, "timeout")  # the clock first
    lv.traj.turns = [bad, bad]
    assert lim.after_observation(lv, now=10.0) == (Status.FATAL, "fatal_cascade")  # the cascade first


def test_deadlines_due_skip_finished_and_the_timer_wakes() -> None:
    async def main() -> tuple[list, int]:
        woken = []
        dl = Deadlines(lambda: woken.append(time.perf_counter()))
        now = time.perf_counter()
        a, b, c = live(deadline=now - 1), live(deadline=now - 0.5), live(deadline=now + 0.05)
        b.done = True
        for lv in (c, b, a):
            dl.add(lv)
        assert list(dl.due(now)) == [a]  # b finished, c not due
        a.expired = True
        dl.arm(now)
        await asyncio.sleep(0.2)
        got = list(dl.due(time.perf_counter()))
        dl.cancel()
        return got == [c], len(woken)

    due_c, n_woken = asyncio.run(main())
    assert due_c and n_woken == 1


# ----------------------------------------------------------------------------- observation assembly
def img(w: int = 4, h: int = 4) -> Image.Image:
    return Image.new("RGB", (w, h))


def builder(max_images: int = 4, max_image_tokens: int = 100, hooks=(), cost=lambda im: im.width) -> ObservationBuilder:
    return ObservationBuilder(CODEC, cost, max_images, max_image_tokens, hooks=hooks)


def test_observation_names_budgets_and_omissions() -> None:
    t = traj(last_gen=[65, CODEC.IM_END])
    results = [ToolResult("text only"), ToolResult("two new", [img(), img()]),
               ToolResult("named", [img()], image_refs=["img_9"])]
    o = builder().build(results, t, n_images=1, image_tokens=0)
    assert o.text == "text only\ntwo new [new images: img_2, img_3]\nnamed"
    assert len(o.images) == 3 and o.image_tokens == 12
    assert o.token_ids[0] != CODEC.IM_END  # the turn ended with its own end token: not repeated
    assert o.token_ids == CODEC.encode_observation(o.text, o.images, True, 2)
    # per-observation count: the third image and every later one are omitted, and the text says so
    o = builder(max_images=2).build([ToolResult("a", [img(), img(), img()], image_refs=["img_2", "img_3", "img_4"])],
                                    t, n_images=1, image_tokens=0)
    assert len(o.images) == 2 and "(img_4 omitted: the image budget is spent" in o.text
    # the context's image-token budget
    o = builder(max_image_tokens=10).build([ToolResult("b", [img(4), img(8)])], t, n_images=1, image_tokens=3)
    assert len(o.images) == 1 and o.image_tokens == 7 and "[new images: img_2]" in o.text
    assert "(an image omitted" in o.text


def test_observation_unusable_image_error_text_and_an_open_turn() -> None:
    def cost(im: Image.Image) -> int:
        if im.height < 2:
            raise ValueError("too small")
        return 1

    t = traj(last_gen=[65, CODEC.EOS])  # ended by another stop token: the observation closes the turn
    o = builder(cost=cost).build([ToolResult("c", [img(4, 1), img()], image_refs=["img_2", "img_3"]),
                                  ToolResult.fail(ErrorKind.FATAL, "sandbox died")], t, n_images=1, image_tokens=0)
    assert o.images == [] and "img_2 (4x1: too small) omitted: the model cannot take it" in o.text
    assert "(img_3 omitted" in o.text  # after an omission every later image is omitted too
    assert o.text.endswith("\nError (fatal): sandbox died")  # an error without text
    assert o.token_ids[0] == CODEC.IM_END


def test_observation_hooks_recitation_first_then_yours() -> None:
    t = traj("Who built it?", last_gen=[CODEC.IM_END])
    o = builder(hooks=[recite_question, lambda tr, text: text.upper()]).build([ToolResult("ok")], t, 1, 0)
    assert o.text == "OK\nQUESTION: WHO BUILT IT?"
    assert "QUESTION: WHO BUILT IT?" in CODEC.decode(o.token_ids)


# ----------------------------------------------------------------------------- launch policies
def test_lockstep_policy_batches_generation_and_tools() -> None:
    p = LockStep()
    p.open_slice(live=3)
    assert not p.admitting()  # a batch is live: no admission
    p.open_slice(live=0)
    assert p.admitting() and p.budget(0, 0) == 0  # admitting a batch: nothing launches yet
    p.admission_stopped()
    assert not p.admitting() and p.budget(0, 0) == UNLIMITED  # the whole batch's turn at once
    assert p.budget(1, 0) == 0 and p.budget(0, 1) == 0  # while anything runs
    a, b = live(), live()
    assert p.hold(a, [{"name": "x"}]) and p.hold(b, [])
    assert p.budget(0, 0) == 0  # tools are held: they go first
    assert p.release(generating=1) == ()  # the batch is still generating
    assert [lv for lv, _ in p.release(generating=0)] == [a, b] and p.release(0) == ()
    p.batch_open = True
    p.reset()
    assert not p.batch_open


def test_continuous_policy_launches_a_bounded_slice_and_never_holds() -> None:
    p = Continuous(per_slice=16)
    p.open_slice(0)
    assert p.admitting() and p.budget(5, 7) == 16 and not p.hold(live(), []) and p.release(0) == ()


# ----------------------------------------------------------------------------- typed events
def test_events_one_payload_type_each_and_a_handler_for_every_type() -> None:
    lv = live()
    gens = [ev.Generated(lv, None, 0.0, 1.0), ev.GenTimedOut(lv, 0.0, 1.0), ev.ServerFailed(lv, OSError("x")),
            ev.RequestFailed(lv, ValueError("y"))]
    assert all(isinstance(e, ev.GenerationEnd) and e.live is lv for e in gens)
    others = [ev.ToolsDone(lv, [], 0.0, 1.0), ev.EnvStepped(lv, None, None, 0.0, 1.0),
              ev.Ended(lv, Status.TRUNCATED, "timeout")]
    assert not any(isinstance(e, ev.GenerationEnd) for e in others)
    with pytest.raises(TypeError):
        ev.ToolsDone(lv, [])  # every field of the payload is required
    with pytest.raises(AttributeError):
        ev.Ended(lv, Status.ERROR, "x").extra = 1  # slots: no stray payload
    concrete = {c for c in vars(ev).values() if isinstance(c, type) and issubclass(c, ev.Event)
                and c not in (ev.Event, ev.GenerationEnd)}
    engine = Engine(EngineConfig(), [object()], CODEC, None, None)
    assert concrete == set(engine._handlers)  # no event type without its handler


def test_inbox_wakes_its_waiter() -> None:
    async def main() -> list:
        box = Inbox()
        waiter = asyncio.ensure_future(box.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        box.wake()
        await asyncio.wait_for(waiter, 1)
        return list(box.items)

    assert asyncio.run(main()) == [ev.WAKE]


# ----------------------------------------------------------------------------- the GC policy
def test_frozen_gc_holds_old_generations_off_and_restores() -> None:
    before = gc.get_threshold()
    with FrozenGC(enabled=True, interval_s=0.0) as g:
        assert gc.get_threshold() == (before[0], FrozenGC.HELD_OFF, FrozenGC.HELD_OFF)
        assert gc.get_freeze_count() > 0
        junk = [[i] for i in range(1000)]
        g.tick()  # interval 0: freezes now
        assert gc.get_freeze_count() >= 1000
        del junk
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    with FrozenGC(enabled=False):
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0


# ----------------------------------------------------------------------------- the token check
class Retokenizing(ByteCodec):
    """ByteCodec with a fresh tokenization of a conversation of answers (what HFCodec.retokenize does)."""

    def retokenize(self, question, images, tools, turns, system=None):
        self.turns = turns
        return self.encode_prompt(question, images, tools, system) + [
            i for said, _, _ in turns for i in self.encode_text(said) + [self.IM_END]]


def test_check_tokens_counts_and_strict_raises() -> None:
    codec = Retokenizing()
    t = Trajectory("p#0", "p", 0, codec.encode_prompt("q", [], []), prompt_messages=[{"role": "user", "content": "q"}])
    said = codec.encode_text("<answer>4</answer>") + [codec.IM_END]
    t.segments.append(Segment(SegmentKind.GEN, said, turn=0, logprobs=[0.0] * len(said), version=0))
    counts: collections.Counter = collections.Counter()
    assert check_tokens(codec, t, [], counts) == "ok"
    assert codec.turns == [("<answer>4</answer>", None, [])]  # the text without its stop token
    t.segments[0] = Segment(SegmentKind.GEN, said[:-1] + [0, codec.IM_END], turn=0, logprobs=[0.0] * (len(said) + 1),
                            version=0)
    assert check_tokens(codec, t, [], counts) == "ok"  # the decoded text round-trips: same ids
    t.prompt_ids.append(7)  # a context the conversation does not give back
    assert check_tokens(codec, t, [], counts) == "mismatch"
    with pytest.raises(AssertionError, match="differ from a fresh tokenization at position"):
        check_tokens(codec, t, [], counts, strict=True)
    assert check_tokens(CODEC, t, [], counts) == "unsupported"
    assert counts == {"ok": 2, "mismatch": 2, "unsupported": 1}


# ----------------------------------------------------------------------------- one tool-result type
def test_one_tool_result_type_from_tool_to_trajectory() -> None:
    assert tools_base.ToolResult is ToolResult is scheduler.ToolResult is public.ToolResult
    assert tools_base.ToolError is ToolError and tools_base.ErrorKind is ErrorKind
    for name in ("Prompt", "ParsedTurn", "EnvStep", "ToolOutcome"):
        assert getattr(scheduler, name) is getattr(__import__("spyglass.engine.trajectory", fromlist=[name]), name)
    r = ToolOutcome("boom", error_kind="transient")
    assert type(r) is ToolResult and not r.ok and r.error_kind == "transient" and r.shown == "boom"
    assert r.error.message == "boom" and ToolOutcome("x", image_refs=["img_2"]).image_refs == ["img_2"]
    assert ToolResult("a").error_kind is None and ToolResult.fail("bad_args", "no").shown == "Error (bad_args): no"
    assert ToolOutcome("", error_kind="bad_args").shown == ""  # a failed environment step with nothing to say
    with pytest.raises(ValueError):
        ToolResult("x", error="not-a-kind")


def test_executor_runner_hands_the_executors_results_on() -> None:
    async def flip(args: dict, ctx: ToolContext) -> ToolResult:
        return ToolResult("flipped", [ctx.resolve_image(args["image"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
                          meta={"captions": ["mirror"], "k": 1})

    async def broken(args: dict, ctx: ToolContext) -> ToolResult:
        raise ToolError(ErrorKind.BAD_ARGS, "wrong box")

    schema = {"type": "object", "properties": {"image": {"type": "string"}}}
    runner = ExecutorRunner(ToolExecutor({"Flip": Tool("Flip", "", schema, flip, image_args=("image",)),
                                          "Broken": Tool("Broken", "", {"type": "object"}, broken)}))
    t = Trajectory("p#0", "p", 0, [1], prompt_images=[img(3, 2)], meta={"tools": ["Flip", "Broken"]})
    calls = [{"name": "Flip", "arguments": json.dumps({"image": "img_1"})}, {"name": "Broken", "arguments": "{}"},
             {"name": "Other", "arguments": "{}"}]
    ok, bad, refused = asyncio.run(runner(calls, t))
    assert all(type(r) is ToolResult for r in (ok, bad, refused))
    assert ok.ok and ok.image_refs == ["img_2"] and ok.images[0].size == (3, 2) and ok.meta["k"] == 1
    assert "img_2: mirror" in ok.text
    assert bad.error.kind is ErrorKind.BAD_ARGS and bad.error.message == "wrong box"
    assert bad.shown == "Error (bad_args): wrong box" and bad.images == []
    assert refused.error_kind == "bad_args" and "not offered for this question" in refused.shown


# ----------------------------------------------------------------------------- the engine with its parts
class Echo(Backend):
    name, supports_forced = "echo", True

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        await asyncio.sleep(0)
        return GenerateOutput(req.request_id, list(req.forced_ids), [0.0] * len(req.forced_ids), "stop",
                              self.version, self.name)

    async def abort(self, request_id: str) -> None: ...
    async def update_weights(self, weights, version: int) -> None: ...
    async def health(self) -> bool: return True
    async def close(self) -> None: ...


def parse(text: str) -> ParsedTurn:
    calls = [{"name": json.loads(m)["name"], "arguments": "{}"} for m in re.findall(r"<tool_call>(.*?)</tool_call>", text)]
    a = re.search(r"<answer>(.*?)</answer>", text)
    return ParsedTurn(calls, [], a.group(1) if a else None)


async def tools(calls, t):
    return [ToolResult("seen") for _ in calls]


def test_the_engine_runs_its_hooks_and_a_given_launch_policy() -> None:
    class Counting(Continuous):
        budgets = 0

        def budget(self, generating: int, tool_jobs: int) -> int:
            Counting.budgets += 1
            return 1  # one launch per slice

    scripts = {f"p{i}": script_turns([("search", {})], f"a{i}") for i in range(3)}
    engine = Engine(EngineConfig(n_samples=2, recite_question=True), [Echo()], CODEC, tools, parse,
                    policy=ReplayPolicy(CODEC, scripts), launch=Counting(1),
                    observation_hooks=[lambda t, text: text + " [hooked]"])

    async def main() -> list:
        return [g async for g in engine.run([Prompt(f"p{i}", f"question {i}") for i in range(3)])]

    groups = asyncio.run(main())
    assert len(groups) == 3 and Counting.budgets >= 12  # 12 turns, at most one launched per slice
    for g in groups:
        for t in g:
            assert t.status is Status.ANSWERED
            obs = [s for s in t.segments if s.kind is SegmentKind.OBS]
            assert [s.text for s in obs] == [f"seen\nQuestion: question {t.group_id[1:]} [hooked]"]


def test_reassigning_cfg_and_policy_reaches_the_parts() -> None:
    """trainer/grpo.py's eval swaps the engine's cfg (n_samples=1) and policy between runs."""
    engine = Engine(EngineConfig(n_samples=4), [Echo()], CODEC, tools, parse)
    assert isinstance(engine.launcher, Continuous) and engine.admission.n == 4 and engine.observer.hooks == []
    cfg = EngineConfig(n_samples=1, lockstep=True, recite_question=True, fatal_k=5, max_inflight_per_server=3)
    engine.cfg = cfg
    assert engine.cfg is cfg and engine.jobs.cfg is cfg and engine.limits.cfg is cfg
    assert engine.admission.n == 1 and engine.placement.max_inflight == 3 and isinstance(engine.launcher, LockStep)
    assert engine.observer.hooks == [recite_question]
    policy = ReplayPolicy(CODEC, {})
    engine.policy = policy
    assert engine.jobs.policy is policy and engine.policy is policy
    given = Continuous(2)
    engine = Engine(EngineConfig(), [Echo()], CODEC, tools, parse, launch=given)
    engine.cfg = EngineConfig(lockstep=True)
    assert engine.launcher is given  # a launch policy given by the caller stays
