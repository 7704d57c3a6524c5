"""The asynchronous multi-turn rollout scheduler: an explicit step machine on one asyncio loop.

Every live trajectory is in one of three places: the ready queue of its server (waiting for a
generation slot), in flight at a backend, or in its tools. Jobs (a generation, a turn's tool
calls) run as tasks that post one typed event when they end; the loop is

    while work remains:
        admit()      # THE admission rule: live < max_live, staleness bound, not paused
        launch()     # ready trajectories -> their server, while it has free slots
        handle(next events)   # generation done -> parse -> tools or finish;
                              # tools done -> observation tokens -> ready again

so a generation request goes out the moment its trajectory is ready, tools run while other
trajectories generate, and per-event cost is O(1) whatever the number of live trajectories.
Groups of n samples per prompt stream out as soon as all n are done (`Engine.run` is an async
iterator of groups). Limits (turns, context, tokens per turn, wall clock), the repetition
detector and the K-consecutive-errors cascade end trajectories without crashing the run.
Weight updates: `pause()` stops launches (and optionally aborts in-flight turns, which are
redone at the turn boundary under the new version), `resume()` restarts; no group is dropped.

The parts are objects (engine/sched/): Admission (the rule), a LaunchPolicy (Continuous, or
LockStep for the baseline), Placement (servers, failover), Limits and Deadlines, Jobs (the
tasks that generate, run tools, step an environment), the ObservationBuilder with its hooks
(recitation is one), FrozenGC around the run, typed events with one handler each here.
The records (Prompt, ParsedTurn, ToolResult, EnvStep) live with the Trajectory
(engine/trajectory.py) and are importable from here as before.

    engine = Engine(cfg, backends, codec, tools=runner, parser=parser)
    async for group in engine.run(prompts): ...

Tests: `.venv/bin/python -m pytest -q tests/test_scheduler.py tests/test_scheduler_parts.py`.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, Sequence

from PIL import Image

from .chat import Codec
from .config import check
from .metrics import EngineStats
from .sched.admission import Admission
from .sched.events import (WAKE, Ended, EnvStepped, Event, GenerationEnd, Generated, GenTimedOut, Inbox, Live,
                           RequestFailed, ServerFailed, ToolsDone)
from .sched.gcpolicy import FrozenGC
from .sched.jobs import Jobs
from .sched.launch import Continuous, LaunchPolicy, LockStep
from .sched.limits import Deadlines, Limits, is_repetitive
from .sched.observe import ObservationBuilder, ObservationHook, format_error_result, recite_question, \
    unparsed_call_results
from .sched.placement import Placement
from .sched.tokencheck import check_tokens
from .trajectory import (FATAL_ERRORS, EnvStep, ParsedTurn, Prompt, Segment, SegmentKind, Status, ToolOutcome,
                         ToolResult, Trajectory, Turn, as_ids)

__all__ = ["Engine", "EngineConfig", "Prompt", "ParsedTurn", "EnvStep", "AgentEnv", "ToolOutcome", "ToolResult",
           "TurnParser", "ToolRunner", "Policy", "is_repetitive"]


# ----------------------------------------------------------------------------- configuration
@dataclass
class EngineConfig:
    """Rollout limits and admission (defaults: the papers' settings)."""

    n_samples: int = 8  # group size
    max_turns: int = 50  # assistant turns per trajectory; at the limit it ends TRUNCATED
    max_context: int = 65536  # max context tokens (prompt, turns, observations); then TRUNCATED
    max_tokens_per_turn: int = 4096  # generated tokens per turn (capped by what max_context leaves)
    temperature: float = 0.7  # sampling temperature, 0 = greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]; 1.0 = off
    timeout_s: float = 3600.0  # wall clock per trajectory
    max_live: int = 256  # live trajectories
    max_inflight_per_server: int = 256  # generation requests in flight per backend server
    fatal_k: int = 3  # consecutive error steps that stop a rollout FATAL (the cascade; also GRPO's fatal step)
    fatal_errors: str = field(default="any", metadata={"choices": FATAL_ERRORS})  # the cascade's error steps:
    #   any (not ok: a failed tool, a malformed or unterminated call, no call and no answer; the paper's
    #   count) | tool (only a called tool's failure; the model's own format errors neither count nor reset)
    repetition_min_tokens: int = 256  # the detector looks only at turns at least this long
    repetition_max_period: int = 64  # longest repeated block (tokens) the detector looks for
    repetition_min_repeats: int = 8  # a turn whose tail repeats a block this often ends INTERRUPTED
    max_images_per_obs: int = 4  # images kept per observation (later ones are omitted, the text says so)
    max_image_tokens: int = 32768  # in the whole context (over it, or one the model's processor
    #                                 cannot size, an image is omitted and the observation says why)
    max_version_lag: int = -1  # staleness bound in policy versions: -1 off; else admitted groups are
    #                            limited to (version - base + lag + 1) * groups_per_step, and GRPO's
    #                            update masks tokens sampled more than this many versions ago
    groups_per_step: int = 0  # prompts (groups) per policy version: GRPO's batch per step (0: no steps)
    max_server_retries: int = 3  # a turn moves servers at most this often before ERROR
    request_timeout_s: float = 0.0  # a generation request unanswered this long counts as a server
    #   failure (the turn moves to another server, as for a refused one); 0 = off (timeout_s only)
    seed: int = 0  # sampling seed; each turn's seed derives from it, the trajectory id and the turn
    gc_freeze: bool = True  # keep long-lived objects out of full cyclic-GC passes (engine/sched/gcpolicy.py)
    gc_freeze_interval_s: float = 0.1  # seconds between gc.freeze() calls during a run (with gc_freeze)
    lockstep: bool = False  # baseline launch policy: TRL-style batches (engine/sched/launch.py LockStep)
    check_tokens: bool = False  # compare each finished context with a fresh tokenization
    strict_tokens: bool = False  # ... and raise on a mismatch (tests)
    # recitation: every observation ends with "Question: <the prompt's question>", so the task
    # stays in the recent context (for a small model the question is hundreds of tokens back by
    # the last tool call); off by default, and a model must be trained and evaluated the same way
    recite_question: bool = False

    def __post_init__(self) -> None:
        for name in ("n_samples", "max_turns", "max_context", "max_tokens_per_turn", "max_live",
                     "max_inflight_per_server", "fatal_k", "repetition_max_period",
                     "repetition_min_repeats", "max_images_per_obs"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.fatal_errors in FATAL_ERRORS, f"fatal_errors must be one of {FATAL_ERRORS}, got {self.fatal_errors!r}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        check(self.request_timeout_s >= 0, f"request_timeout_s must be >= 0, got {self.request_timeout_s}")
        check(self.max_version_lag >= -1, f"max_version_lag must be >= -1, got {self.max_version_lag}")
        check(self.max_version_lag < 0 or self.groups_per_step >= 1,
              f"max_version_lag={self.max_version_lag} needs groups_per_step >= 1, got {self.groups_per_step}")


# ----------------------------------------------------------------------------- plug-in roles
class AgentEnv(Protocol):
    """Bring your own environment (SkyRL's BaseTextEnv, rLLM's BaseEnv shape): the prompt is the
    reset observation; after every assistant turn `step` says what the model sees next, or that
    the episode is done and its reward. The engine keeps its limits (turns, context, time,
    repetition, the cascade) and its token-faithful observations."""

    async def step(self, traj: Trajectory, turn: ParsedTurn) -> EnvStep: ...


class TurnParser(Protocol):
    def __call__(self, text: str) -> ParsedTurn: ...


class ToolRunner(Protocol):
    async def __call__(self, calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolResult]: ...


class Policy(Protocol):
    """Chooses what a turn generates; None means the backend samples (the RL policy)."""

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int] | None: ...


# ----------------------------------------------------------------------------- the engine
def _part(part: str, name: str) -> Any:
    """An Engine attribute that is its collaborator's (one value, read where it is used)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value))


class Engine:
    """Runs groups of trajectories over backends, tools and a parser (see module docstring).

    With cfg.lockstep the launch policy is LockStep (engine/sched/launch.py): the same loop
    behaves like a lock-step batch rollout (TRL's GRPO), the baseline the benchmarks compare to.
    `observation_hooks` run on every observation's text (after recitation, cfg.recite_question).
    `cfg`, `policy`, `tools` and `env` may be reassigned between runs (trainer/grpo.py's eval
    does): the parts that read them follow.
    """

    EVENTS_PER_SLICE = 32  # events handled before the loop yields (bounds event-loop lag)
    # A turn makes up to two events (generation, tools), so launching at most half as many
    # turns per slice as the slice handles events keeps a saturated engine's backlog in the
    # ready queues (a bare Live each) rather than in the event queue (each event holding its
    # output, task and coroutine alive: more memory and more young-GC work per turn).
    LAUNCHES_PER_SLICE = EVENTS_PER_SLICE // 2

    policy = _part("jobs", "policy")
    tools = _part("jobs", "tools")
    env = _part("jobs", "env")  # a custom environment steps every turn instead of the tools (AgentEnv)

    def __init__(self, cfg: EngineConfig, backends: Sequence[Any], codec: Codec,
                 tools: ToolRunner, parser: TurnParser, tool_schemas: Sequence[dict] = (),
                 policy: Policy | None = None, image_tokens: Callable[[Image.Image], int] | None = None,
                 record_spans: bool = False,
                 on_turn: Callable[[Trajectory, Turn], None] | None = None,
                 reward: Callable[[list[Trajectory]], Awaitable[Any]] | None = None,
                 env: AgentEnv | None = None, launch: LaunchPolicy | None = None,
                 observation_hooks: Sequence[ObservationHook] = ()) -> None:
        if not backends:
            raise ValueError("Engine needs at least one backend")
        self.backends, self.codec, self.parser = list(backends), codec, parser
        self.tool_schemas = list(tool_schemas)
        self.image_tokens = image_tokens or (lambda im: 0)
        self.record_spans, self.on_turn = record_spans, on_turn
        self.reward = reward  # async hook scoring each finished group before it is yielded
        self.stats = EngineStats()
        self._stop_ids = list(codec.stop_token_ids)
        self._events = Inbox()
        self._hooks, self._launch_given = list(observation_hooks), launch
        # the collaborators (the ones that read the config are built by the cfg setter)
        self.jobs = Jobs(cfg, self.backends, tools, env, policy, self._stop_ids, self._events)
        self.admission = Admission(cfg, lambda: self.version)
        self.placement = Placement(len(self.backends), cfg.max_inflight_per_server, cfg.max_server_retries)
        self.deadlines = Deadlines(self._events.wake)
        self.launcher: LaunchPolicy = launch or Continuous(self.LAUNCHES_PER_SLICE)
        self.cfg = cfg
        # the loop's state
        self._gen_tasks: dict[str, tuple[asyncio.Task, Live]] = {}  # generations in flight by request id
        self._tool_jobs = 0  # tool and environment jobs in flight
        self._live = 0
        self._groups: dict[str, list[Trajectory]] = {}  # admitted groups not yet emitted
        self._paused = False
        self._idle = asyncio.Event()
        self._busy_since = 0.0
        self._request_seq = itertools.count()  # request ids: unique per engine, cheap
        self._handlers: dict[type, Callable[[Any], bool]] = {
            type(WAKE): lambda ev: False, Generated: self._on_generated, GenTimedOut: self._on_gen_timeout,
            ServerFailed: self._on_server_error, RequestFailed: self._on_request_failed,
            ToolsDone: self._on_tools, EnvStepped: self._on_env, Ended: self._on_ended}

    @property
    def cfg(self) -> EngineConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: EngineConfig) -> None:
        self._cfg = cfg
        self.jobs.cfg = cfg
        self.admission.configure(cfg)
        self.placement.configure(cfg.max_inflight_per_server, cfg.max_server_retries)
        self.limits = Limits(cfg, self._stop_ids)
        hooks = [recite_question] if cfg.recite_question else []
        self.observer = ObservationBuilder(self.codec, self.image_tokens, cfg.max_images_per_obs,
                                           cfg.max_image_tokens, hooks=[*hooks, *self._hooks])
        if self._launch_given is None and isinstance(self.launcher, LockStep) != cfg.lockstep:
            self.launcher = LockStep() if cfg.lockstep else Continuous(self.LAUNCHES_PER_SLICE)

    # -- public control -----------------------------------------------------------------
    @property
    def version(self) -> int:
        return max(getattr(b, "version", 0) for b in self.backends)

    async def pause(self, abort: bool = False) -> None:
        """Stop launching generations; with abort, in-flight turns are aborted (redone later)."""
        self._paused = True
        if abort:
            await asyncio.gather(*(self.backends[lv.server].abort(rid)
                                   for rid, (_, lv) in list(self._gen_tasks.items())),
                                 return_exceptions=True)
        if self._gen_tasks:
            self._idle.clear()
            await self._idle.wait()  # in-flight turns end (finished or aborted) first

    def resume(self) -> None:
        self._paused = False
        self._events.wake()

    # -- the loop -----------------------------------------------------------------------
    async def run(self, prompts: Iterable[Prompt]) -> AsyncIterator[list[Trajectory]]:
        """Yield each group (n trajectories of one prompt) as soon as all its members end.

        The step loop runs as its own task, so pause()/resume() from the consumer work while
        it holds a group; leaving the iteration early cancels the loop."""
        out: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._main(prompts, out))
        try:
            while True:
                group = await out.get()
                if group is None:
                    break
                if self.reward is not None:  # the loop task keeps generating meanwhile
                    await self.reward(group)
                yield group
            await task  # re-raise what stopped the loop, if anything
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.jobs.cancel_all()

    async def _main(self, prompts: Iterable[Prompt], out: asyncio.Queue) -> None:
        self.stats.started = time.perf_counter()
        self.jobs.loop = asyncio.get_running_loop()
        self._live, self._groups = 0, {}
        self.admission.start(prompts)
        self.launcher.reset()
        try:
            with FrozenGC(self.cfg.gc_freeze, self.cfg.gc_freeze_interval_s) as gc_policy:
                await self._loop(out, gc_policy)
        finally:
            self.deadlines.cancel()
            self._idle.set()  # a pause() waiting on a dead loop returns
            out.put_nowait(None)

    async def _loop(self, out: asyncio.Queue, gc_policy: FrozenGC) -> None:
        events, handle = self._events.items, self._handle
        while True:
            more = self._admit()
            if self._live == 0 and self.admission.exhausted:
                break
            more = self._launch() or more
            self._expire(time.perf_counter())
            if more:
                self._events.wake()
            if events:  # yield once per slice so the loop's other tasks (I/O, timers) keep running
                await asyncio.sleep(0)
            else:
                await self._events.wait()
            take = events.popleft
            for _ in range(min(len(events), self.EVENTS_PER_SLICE)):
                ev = take()
                if handle(ev):
                    self._retire(ev.live, out)
            if not self._gen_tasks:
                self._idle.set()
            gc_policy.tick()
        self.stats.ended = time.perf_counter()

    def _admit(self) -> bool:
        """Admit groups by the one rule, a bounded number per slice; True if the budget cut it short."""
        launcher = self.launcher
        launcher.open_slice(self._live)
        for _ in range(self.EVENTS_PER_SLICE):
            p = self.admission.next(self._live, not self._paused and launcher.admitting())
            if p is None:
                launcher.admission_stopped()
                return False
            self._start_group(p)
        return True

    def _launch(self) -> bool:
        """Start generations for ready trajectories as the launch policy allows; True if the
        slice budget cut it short."""
        if self._paused:
            return False
        for lv, calls in self.launcher.release(len(self._gen_tasks)):
            self._start_tools(lv, calls)
        budget = self.launcher.budget(len(self._gen_tasks), self._tool_jobs)
        if budget <= 0:
            return False
        n = 0
        for lv in self.placement.pop_ready(budget):
            n += 1
            if lv.expired:  # its deadline passed while it waited for a slot
                self._events.put_nowait(Ended(lv, Status.TRUNCATED, "timeout"))
                continue
            self.placement.start(lv)
            lv.request_id = f"{lv.traj.id}/{next(self._request_seq)}"
            task = self.jobs.generate(lv)
            if not self._gen_tasks:  # (idle is set only while no generation is in flight)
                self._busy_since = time.perf_counter()
                self._idle.clear()
            self._gen_tasks[lv.request_id] = (task, lv)
        return n == budget

    def _handle(self, ev: Event) -> bool:
        """Advance one trajectory by one event; True when it has just finished."""
        if isinstance(ev, GenerationEnd):
            lv = ev.live
            if self._gen_tasks.pop(lv.request_id, None) is not None and not self._gen_tasks:
                self.stats.busy_s += time.perf_counter() - self._busy_since
            self.placement.ended(lv)
        return self._handlers[type(ev)](ev)

    def _retire(self, lv: Live, out: asyncio.Queue) -> None:
        """`lv` finished: free its place; emit its group when it was the group's last."""
        self._live -= 1
        self.placement.release(lv)
        g = self._groups[lv.traj.group_id]
        if all(t.is_done() for t in g):
            del self._groups[lv.traj.group_id]
            out.put_nowait(g)

    def _expire(self, now: float) -> None:
        """Expire trajectories past their wall-clock deadline: a job in flight is cancelled, a
        waiting one ends at launch; the timer is armed for the next deadline."""
        for lv in self.deadlines.due(now):
            lv.expired = True
            self.jobs.cancel(lv, lv.request_id in self._gen_tasks, now)
        self.deadlines.arm(now)

    def _schemas(self, names: Sequence[str] | None) -> list[dict]:
        """The engine's tool schemas, or those of `names` (a prompt's own tool list)."""
        if names is None:
            return self.tool_schemas
        return [s for s in self.tool_schemas if s.get("function", s).get("name") in names]

    def _start_group(self, p: Prompt) -> None:
        cfg = self._cfg
        prompt_ids = as_ids(self.codec.encode_prompt(p.question, p.images, self._schemas(p.tools), system=p.system))
        now = time.perf_counter()
        server = self.placement.pick()
        image_tokens = sum(self.image_tokens(im) for im in p.images)
        group = self._groups[p.id] = []
        for i in range(cfg.n_samples):
            t = Trajectory(id=f"{p.id}#{i}", group_id=p.id, sample_index=i,
                           prompt_ids=prompt_ids, prompt_images=list(p.images),
                           prompt_messages=[{"role": "user", "content": p.question}],
                           meta={**p.meta, **({"tools": list(p.tools)} if p.tools is not None else {}),
                                 **({"system": p.system} if p.system is not None else {})}, started_at=time.time())
            lv = Live(t, server, now + cfg.timeout_s,
                      image_tokens=image_tokens, ntok=len(t.prompt_ids), n_images=len(t.prompt_images), ready_since=now)
            self.deadlines.add(lv)
            self.placement.load[server] += 1
            if len(prompt_ids) >= cfg.max_context:  # finished when the event is handled
                self._events.put_nowait(Ended(lv, Status.TRUNCATED, "max_context"))
            else:
                self.placement.ready_up(lv)
            group.append(t)
            self._live += 1

    def _start_tools(self, lv: Live, calls: list[dict[str, Any]]) -> None:
        self.jobs.run_tools(lv, calls)
        self._tool_jobs += 1

    # -- event handlers (each True when the trajectory has just finished) -------------------
    def _on_ended(self, ev: Ended) -> bool:
        return self._finish(ev.live, ev.status, ev.reason)

    def _on_gen_timeout(self, ev: GenTimedOut) -> bool:
        return self._finish(ev.live, Status.TRUNCATED, "timeout")

    def _on_request_failed(self, ev: RequestFailed) -> bool:
        ev.live.traj.meta["engine_error"] = f"{type(ev.error).__name__}: {ev.error}"
        return self._finish(ev.live, Status.ERROR, "engine_error")

    def _on_server_error(self, ev: ServerFailed) -> bool:
        lv = ev.live
        if not self.placement.failover(lv):
            lv.traj.meta["engine_error"] = f"{type(ev.error).__name__}: {ev.error}"
            return self._finish(lv, Status.ERROR, "backend_error")
        self.stats.server_moves += 1
        return False

    def _on_generated(self, ev: Generated) -> bool:
        lv, out, t0, t1 = ev.live, ev.out, ev.t0, ev.t1
        t = lv.traj
        self.placement.answered(lv.server)
        if lv.expired:
            return self._finish(lv, Status.TRUNCATED, "timeout")
        if out.finish_reason == "abort":  # redo this turn at the boundary, under the new version
            self.stats.aborted_turns += 1
            lv.ready_since = t1
            self.placement.ready_up(lv)
            return False
        ids = out.token_ids
        text = self.codec.decode(ids)
        parsed = self.parser(text)
        turn = Turn(index=len(t.turns), calls=parsed.calls, parse_errors=parsed.errors,
                    queue_s=t0 - lv.ready_since, gen_s=t1 - t0, gen_tokens=len(ids))
        seg = Segment(SegmentKind.GEN, ids, turn=turn.index, logprobs=out.logprobs,
                      version=out.version, text=text, finish_reason=out.finish_reason)
        t.segments.append(seg)
        lv.ntok += len(seg.token_ids)
        t.turns.append(turn)
        self._account(lv, "gen", t0, t1, turn, server_queue_s=min(max(out.queue_s, 0.0), t1 - t0))
        if self.jobs.env is not None:  # the environment decides what comes next (after the repetition check)
            if self.limits.repetitive(ids):
                return self._finish(lv, Status.INTERRUPTED, "repetition")
            self.jobs.step_env(lv, parsed)
            self._tool_jobs += 1
            return False
        if parsed.answer is not None and not parsed.calls:
            turn.answered, t.answer = True, parsed.answer
            return self._finish(lv, Status.ANSWERED, "answer")
        if self.limits.repetitive(ids):
            return self._finish(lv, Status.INTERRUPTED, "repetition")
        stop = self.limits.after_turn(t)
        if stop is not None:
            return self._finish(lv, *stop)
        if not parsed.calls:  # a format error: tell the model, go on
            return self._observe(lv, [format_error_result(parsed.errors)], t1, t1)
        if not self.launcher.hold(lv, parsed.calls):
            self._start_tools(lv, parsed.calls)
        return False

    def _on_env(self, ev: EnvStepped) -> bool:
        self._tool_jobs -= 1
        lv, step, t0, t1 = ev.live, ev.step, ev.t0, ev.t1
        t, turn = lv.traj, lv.traj.turns[-1]
        turn.tool_s = t1 - t0
        if step is None:
            return self._finish(lv, Status.TRUNCATED, "timeout")
        turn.env_ok = bool(step.ok)
        if step.done:
            if step.reward is not None:
                t.reward["total"] = float(step.reward)
            t.answer = step.answer if step.answer is not None else ev.answer
            turn.answered = t.answer is not None
            return self._finish(lv, Status.ANSWERED if turn.answered else Status.TRUNCATED, "env_done")
        stop = self.limits.after_turn(t)
        if stop is not None:
            return self._finish(lv, *stop)
        return self._observe(lv, [ToolResult(step.observation, list(step.images),
                                             None if step.ok else "bad_args")], t0, t1)

    def _on_tools(self, ev: ToolsDone) -> bool:
        self._tool_jobs -= 1
        lv, outs, t0, t1 = ev.live, ev.results, ev.t0, ev.t1
        turn = lv.traj.turns[-1]
        if outs is None:
            turn.tool_s = t1 - t0
            return self._finish(lv, Status.TRUNCATED, "timeout")
        errors = [{"name": c["name"], "kind": o.error_kind, "message": o.shown}
                  for c, o in zip(turn.calls, outs) if o.error is not None]
        if errors:  # else the Turn keeps its own empty list
            turn.tool_errors = errors
        self.stats.tool_latencies.append(t1 - t0)
        if turn.parse_errors:  # the calls that did not parse are answered too, after the ones that ran
            outs = outs + unparsed_call_results(turn)
        return self._observe(lv, outs, t0, t1)

    def _observe(self, lv: Live, outs: list[ToolResult], t0: float, t1: float) -> bool:
        """Append the observation of `outs` to `lv`; it is ready again unless a limit ends it."""
        t = lv.traj
        turn = t.turns[-1]
        turn.tool_s = t1 - t0
        self._account(lv, "tool", t0, t1, None)
        obs = self.observer.build(outs, t, lv.n_images, lv.image_tokens)
        t.segments.append(Segment(SegmentKind.OBS, obs.token_ids, turn=turn.index, images=obs.images, text=obs.text))
        n = len(t.segments[-1].token_ids)
        lv.ntok += n
        lv.n_images += len(obs.images)
        lv.image_tokens = obs.image_tokens
        turn.obs_tokens = n
        self.stats.obs_tokens += n
        if self.on_turn is not None:
            self.on_turn(t, turn)
        now = time.perf_counter()
        stop = self.limits.after_observation(lv, now)
        if stop is not None:
            return self._finish(lv, *stop)
        lv.ready_since = now
        self.placement.ready_up(lv)
        return False

    def _account(self, lv: Live, kind: str, t0: float, t1: float, turn: Turn | None,
                 server_queue_s: float = 0.0) -> None:
        s = self.stats
        if kind == "gen" and turn is not None:
            s.turns += 1
            s.gen_requests += 1
            s.gen_tokens += turn.gen_tokens
            s.gen_s += turn.gen_s
            s.queue_s += turn.queue_s
        else:
            s.tool_s += t1 - t0
        if self.record_spans:
            if kind == "gen" and turn is not None and turn.queue_s + server_queue_s > 0:
                # waiting for a slot: in the engine's ready queue, then in the server's own queue
                s.spans.append((lv.traj.id, "wait", t0 - turn.queue_s, t0 + server_queue_s))
                t0 += server_queue_s
            if kind == "tool" and lv.traj.turns:  # "tool:Crop+OCR": the timeline colours by tool
                names = sorted({str(c.get("name", "?")) for c in lv.traj.turns[-1].calls})
                kind = "tool:" + "+".join(names) if names else kind
            s.spans.append((lv.traj.id, kind, t0, t1))

    def _finish(self, lv: Live, status: Status, reason: str) -> bool:
        lv.done = True
        t = lv.traj
        t.status, t.stop_reason, t.finished_at = status, reason, time.time()
        cfg = self._cfg
        t.fatal_step = t.compute_fatal_step(cfg.fatal_k, cfg.fatal_errors)
        if cfg.check_tokens:
            check_tokens(self.codec, t, self._schemas(t.meta.get("tools")), self.stats.token_check,
                         strict=cfg.strict_tokens)
        self.stats.finished += 1
        self.stats.by_status[status.value] += 1
        return True
