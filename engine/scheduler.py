"""The asynchronous multi-turn rollout scheduler: an explicit step machine on one asyncio loop.

Every live trajectory is in one of three places: the ready queue of its server (waiting for a
generation slot), in flight at a backend, or in its tools. Jobs (a generation, a turn's tool
calls) run as tasks that put one event on the engine's queue when they end; the loop is

    while work remains:
        admit()      # THE admission rule: live < max_live, staleness bound, not paused
        launch()     # ready trajectories -> their server, while it has free slots
        handle(await next event)   # generation done -> parse -> tools or finish;
                                   # tools done -> observation tokens -> ready again

so a generation request goes out the moment its trajectory is ready, tools run while other
trajectories generate, and per-event cost is O(1) whatever the number of live trajectories.
Groups of n samples per prompt stream out as soon as all n are done (`Engine.run` is an async
iterator of groups). Limits (turns, context, tokens per turn, wall clock), the repetition
detector and the K-consecutive-errors cascade end trajectories without crashing the run.
Weight updates: `pause()` stops launches (and optionally aborts in-flight turns, which are
redone at the turn boundary under the new version), `resume()` restarts; no group is dropped.

    engine = Engine(cfg, backends, codec, tools=runner, parser=parser)
    async for group in engine.run(prompts): ...
"""
from __future__ import annotations

import asyncio
import collections
import gc
import heapq
import weakref
import time
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, Sequence

from PIL import Image

from .backends.base import BackendError, GenerateRequest, SamplingParams
from .chat import Codec
from .config import check
from .metrics import EngineStats
from .trajectory import Segment, SegmentKind, Status, Trajectory, Turn, as_ids


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
    fatal_k: int = 3  # consecutive tool/format errors that make the cascade (also GRPO's fatal step)
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
    gc_freeze: bool = True  # keep long-lived objects out of full cyclic-GC passes (see _loop)
    gc_freeze_interval_s: float = 0.1  # seconds between gc.freeze() calls during a run (with gc_freeze)
    lockstep: bool = False  # baseline policy: TRL-style batches (see Engine docstring)
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
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        check(self.request_timeout_s >= 0, f"request_timeout_s must be >= 0, got {self.request_timeout_s}")
        check(self.max_version_lag >= -1, f"max_version_lag must be >= -1, got {self.max_version_lag}")
        check(self.max_version_lag < 0 or self.groups_per_step >= 1,
              f"max_version_lag={self.max_version_lag} needs groups_per_step >= 1, got {self.groups_per_step}")


@dataclass
class Prompt:
    """One dataset item: a question with its images; `meta` travels to the reward."""

    id: str
    question: str
    images: list[Image.Image] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[str] | None = None  # this item's tool names (None: every tool of the engine)
    system: str | None = None  # this item's system prompt (None: the codec's)


# ----------------------------------------------------------------------------- plug-in roles
@dataclass
class ParsedTurn:
    """What the parser made of one assistant turn."""

    calls: list[dict[str, Any]]  # {"name", "arguments" (canonical JSON)}
    errors: list[dict[str, Any]]  # {"kind", "message", ...}
    answer: str | None


@dataclass
class EnvStep:
    """A custom environment's answer to one assistant turn (Engine(env=...))."""

    observation: str = ""  # the next observation shown to the model (when not done)
    images: list[Image.Image] = field(default_factory=list)  # images of that observation
    done: bool = False  # the episode ends with this turn
    reward: float | None = None  # when done: written to traj.reward["total"]
    answer: str | None = None  # when done: the final answer (None: the turn's own <answer>)
    ok: bool = True  # the step counts as well-formed (r_fmt and the K-error cascade)


class AgentEnv(Protocol):
    """Bring your own environment (SkyRL's BaseTextEnv, rLLM's BaseEnv shape): the prompt is the
    reset observation; after every assistant turn `step` says what the model sees next, or that
    the episode is done and its reward. The engine keeps its limits (turns, context, time,
    repetition, the cascade) and its token-faithful observations."""

    async def step(self, traj: Trajectory, turn: ParsedTurn) -> EnvStep: ...


@dataclass
class ToolOutcome:
    """One call's observation: text and images, or an error with its class."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    error_kind: str | None = None  # bad_args | transient | fatal | None
    image_refs: list[str] | None = None  # names the runner already gave the images in `text`


class TurnParser(Protocol):
    def __call__(self, text: str) -> ParsedTurn: ...


class ToolRunner(Protocol):
    async def __call__(self, calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolOutcome]: ...


class Policy(Protocol):
    """Chooses what a turn generates; None means the backend samples (the RL policy)."""

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int] | None: ...


# ----------------------------------------------------------------------------- helpers
def is_repetitive(ids: Sequence[int], max_period: int, min_repeats: int) -> bool:
    """True when the tail is one block of <= max_period tokens repeated >= min_repeats times."""
    n = len(ids)
    for p in range(1, max_period + 1):
        span = p * min_repeats
        if span > n:
            break
        tail = ids[n - span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False


@dataclass
class _Live:
    traj: Trajectory
    server: int
    deadline: float
    image_tokens: int = 0
    ntok: int = 0  # context length so far (= traj.num_tokens, kept without a walk over segments)
    n_images: int = 0  # images in the context so far (= len(traj.images()))
    ready_since: float = 0.0
    request_id: str = ""
    moves: int = 0
    job: asyncio.Future | None = None  # the generation or tools task in flight
    expired: bool = False
    reported: bool = True  # the job in flight has posted (or will post) its own event
    done: bool = False


class _Inbox:
    """The engine's event queue: a deque and at most one waiter (the loop). asyncio.Queue does
    the same with bookkeeping (putters, unfinished-task counts, an Event) the loop never uses."""

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, event: tuple[str, Any, Any]) -> None:
        self.items.append(event)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        """Return once an event is queued."""
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _gone(ref: Any) -> bool:
    lv = ref()
    return lv is None or lv.done


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Runs groups of trajectories over backends, tools and a parser (see module docstring).

    With cfg.lockstep the same loop behaves like a lock-step batch rollout (TRL's GRPO): a batch
    of max_live trajectories is admitted only when the last one is done, generation starts only
    when no generation or tool job is in flight (every member's turn together), and tools start
    only when the whole batch has generated. It exists as the baseline the benchmarks compare to.
    """

    EVENTS_PER_SLICE = 32  # events handled before the loop yields (bounds event-loop lag)
    # A turn makes up to two events (generation, tools), so launching at most half as many
    # turns per slice as the slice handles events keeps a saturated engine's backlog in the
    # ready queues (a bare _Live each) rather than in the event queue (each event holding its
    # output, task and coroutine alive: more memory and more young-GC work per turn).
    LAUNCHES_PER_SLICE = EVENTS_PER_SLICE // 2

    def __init__(self, cfg: EngineConfig, backends: Sequence[Any], codec: Codec,
                 tools: ToolRunner, parser: TurnParser, tool_schemas: Sequence[dict] = (),
                 policy: Policy | None = None, image_tokens: Callable[[Image.Image], int] | None = None,
                 record_spans: bool = False,
                 on_turn: Callable[[Trajectory, Turn], None] | None = None,
                 reward: Callable[[list[Trajectory]], Awaitable[Any]] | None = None,
                 env: AgentEnv | None = None) -> None:
        if not backends:
            raise ValueError("Engine needs at least one backend")
        self.cfg, self.backends, self.codec = cfg, list(backends), codec
        self.tools, self.parser, self.policy = tools, parser, policy
        self.tool_schemas = list(tool_schemas)
        self.image_tokens = image_tokens or (lambda im: 0)
        self.record_spans, self.on_turn = record_spans, on_turn
        self.reward = reward  # async hook scoring each finished group before it is yielded
        self.env = env  # a custom environment steps every turn instead of the tools (AgentEnv)
        self.stats = EngineStats()
        self._stop_ids = list(codec.stop_token_ids)
        self._stops = frozenset(self._stop_ids)
        self._sampling: SamplingParams | None = None  # this engine's sampling, max_tokens/seed per turn
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._events = _Inbox()
        self._ready: list[collections.deque[_Live]] = [collections.deque() for _ in self.backends]
        self._inflight = [0] * len(self.backends)
        self._load = [0] * len(self.backends)  # live trajectories per server (affinity)
        self._up = [True] * len(self.backends)
        self._gen_tasks: dict[str, tuple[asyncio.Task, _Live]] = {}
        self._paused = False
        self._idle = asyncio.Event()
        self._deadlines: list[tuple[float, int, Any]] = []  # heap of (deadline, id, weakref to _Live)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # perf_counter time the timer fires
        self._tool_jobs = 0
        self._batch_open = False
        self._busy_since = 0.0
        self._gc_thresholds = gc.get_threshold()
        self._request_seq = itertools.count()  # request ids: unique per engine, cheap
        self._jobs: set[asyncio.Task] = set()  # every generation, tool and abort task in flight
        self._tool_wait: list[tuple[_Live, list[dict[str, Any]]]] = []  # lockstep: tools held
        self._admitted_groups = 0
        self._base_version = self.version

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
        self._events.put_nowait(("wake", None, None))

    # -- the loop -----------------------------------------------------------------------
    async def run(self, prompts: Iterable[Prompt]) -> AsyncIterator[list[Trajectory]]:
        """Yield each group (n trajectories of one prompt) as soon as all its members end.

        The step loop runs as its own task, so pause()/resume() from the consumer work while
        it holds a group; leaving the iteration early cancels the loop."""
        out: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._main(iter(prompts), out))
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
            for t in list(self._jobs):
                t.cancel()

    async def _main(self, pending: Iterable[Prompt], out: asyncio.Queue) -> None:
        try:
            await self._loop(iter(pending), out)
        finally:
            if self.cfg.gc_freeze:
                gc.unfreeze()
                gc.set_threshold(*self._gc_thresholds)
            if self._timer is not None:
                self._timer.cancel()
            self._idle.set()  # a pause() waiting on a dead loop returns
            out.put_nowait(None)

    async def _loop(self, pending: Any, out: asyncio.Queue) -> None:
        exhausted = False
        groups: dict[str, list[Trajectory]] = {}
        live = 0
        self.stats.started = time.perf_counter()
        self._aloop = asyncio.get_running_loop()
        # GC policy: a full collection walks every tracked object, and ten thousand live
        # trajectories make that a stall of 100+ ms on the loop. During a run, objects alive at
        # start (models, datasets) are frozen as vLLM does after start-up, and the ones made
        # since that survive a young (generation-0) collection are frozen every
        # gc_freeze_interval_s; generation-1 and full collections are held off, since what they
        # would scan is what the next freeze takes out of scanning anyway (each survivor is
        # scanned once, not twice, and no 5-15 ms generation-1 pass stalls the loop). Young
        # collections go on, so short-lived cycles are still collected. Trajectories are freed
        # by reference counting as usual; run() restores the thresholds and unfreezes at the
        # end, so any reference cycle that outlived a young collection is collected then. The
        # start collects only the young generations (a full pass over a process with torch
        # loaded is ~100 ms on the loop): old garbage would wait for a full collection anyway.
        self._gc_thresholds = gc.get_threshold()
        if self.cfg.gc_freeze:
            gc.collect(1)
            gc.freeze()
            gc.set_threshold(self._gc_thresholds[0], 1_000_000, 1_000_000)
        next_freeze = time.perf_counter() + self.cfg.gc_freeze_interval_s
        cap = max(self.cfg.max_live, self.cfg.n_samples)
        self._batch_open = False  # lockstep: a batch is being admitted
        while True:
            # admit: the one admission rule (a bounded number per slice)
            more = False
            if self.cfg.lockstep and live == 0:
                self._batch_open = True
            for _ in range(self.EVENTS_PER_SLICE):
                if exhausted or self._paused or live + self.cfg.n_samples > cap \
                        or not self._fresh_enough() or (self.cfg.lockstep and not self._batch_open):
                    self._batch_open = False
                    break
                p = next(pending, None)
                if p is None:
                    exhausted, self._batch_open = True, False
                    break
                groups[p.id] = []
                for lv in self._start_group(p):
                    groups[p.id].append(lv.traj)
                    live += 1
                self._admitted_groups += 1
            else:
                more = True
            if live == 0 and exhausted:
                break
            more = self._launch() or more
            self._sweep_deadlines()
            if more:
                self._events.put_nowait(("wake", None, None))
            events = self._events.items
            if events:  # yield once per slice so the loop's other tasks (I/O, timers) keep running
                await asyncio.sleep(0)
            else:
                await self._events.wait()
            take = events.popleft
            for _ in range(min(len(events), self.EVENTS_PER_SLICE)):
                kind, lv, payload = take()
                if kind == "wake":
                    continue
                if self._handle(kind, lv, payload):
                    live -= 1
                    self._load[lv.server] -= 1
                    g = groups[lv.traj.group_id]
                    if all(t.is_done() for t in g):
                        del groups[lv.traj.group_id]
                        out.put_nowait(g)
            if not self._gen_tasks:
                self._idle.set()
            if self.cfg.gc_freeze and time.perf_counter() >= next_freeze:
                gc.freeze()
                next_freeze = time.perf_counter() + self.cfg.gc_freeze_interval_s
        self.stats.ended = time.perf_counter()

    def _sweep_deadlines(self) -> None:
        """Expire trajectories past their wall-clock deadline: a generation or tool job in
        flight is cancelled (and the server asked to abort), a waiting one ends at launch.
        One timer, armed for the earliest deadline, wakes the loop."""
        now = time.perf_counter()
        heap = self._deadlines
        while heap and (heap[0][0] <= now or _gone(heap[0][2])):
            _, _, ref = heapq.heappop(heap)
            lv = ref()
            if lv is None or lv.done or lv.expired:
                continue
            lv.expired = True
            if lv.job is not None and not lv.job.done():
                gen = lv.request_id in self._gen_tasks
                if gen:
                    abort = asyncio.ensure_future(self.backends[lv.server].abort(lv.request_id))
                    self._jobs.add(abort)
                    abort.add_done_callback(lambda t: (self._jobs.discard(t), t.cancelled() or t.exception()))
                lv.job.cancel()
                if not lv.reported:  # cancelled before its coroutine started: it never will
                    lv.reported = True
                    self._jobs.discard(lv.job)
                    self._events.put_nowait(("gen_timeout", lv, (now, now)) if gen
                                            else ("tools", lv, (None, now, now)))
        if heap and (self._timer is None or self._timer_at > heap[0][0] + 1e-3 or self._timer_at <= now):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = heap[0][0]
            self._timer = asyncio.get_running_loop().call_later(
                max(heap[0][0] - now, 0.0), self._events.put_nowait, ("wake", None, None))

    def _fresh_enough(self) -> bool:
        if self.cfg.max_version_lag < 0:
            return True
        steps = self.version - self._base_version + self.cfg.max_version_lag + 1
        return self._admitted_groups < steps * self.cfg.groups_per_step

    def _schemas(self, names: Sequence[str] | None) -> list[dict]:
        """The engine's tool schemas, or those of `names` (a prompt's own tool list)."""
        if names is None:
            return self.tool_schemas
        return [s for s in self.tool_schemas if s.get("function", s).get("name") in names]

    def _start_group(self, p: Prompt) -> list[_Live]:
        prompt_ids = as_ids(self.codec.encode_prompt(p.question, p.images, self._schemas(p.tools), system=p.system))
        now = time.perf_counter()
        server = self._pick_server()
        image_tokens = sum(self.image_tokens(im) for im in p.images)
        out = []
        for i in range(self.cfg.n_samples):
            t = Trajectory(id=f"{p.id}#{i}", group_id=p.id, sample_index=i,
                           prompt_ids=prompt_ids, prompt_images=list(p.images),
                           prompt_messages=[{"role": "user", "content": p.question}],
                           meta={**p.meta, **({"tools": list(p.tools)} if p.tools is not None else {}),
                                 **({"system": p.system} if p.system is not None else {})}, started_at=time.time())
            lv = _Live(t, server, now + self.cfg.timeout_s,
                       image_tokens=image_tokens, ntok=len(t.prompt_ids), n_images=len(t.prompt_images), ready_since=now)
            heapq.heappush(self._deadlines, (lv.deadline, id(lv), weakref.ref(lv)))
            self._load[server] += 1
            if len(prompt_ids) >= self.cfg.max_context:  # finished when the event is handled
                self._events.put_nowait(("done", lv, (Status.TRUNCATED, "max_context")))
            else:
                self._ready[server].append(lv)
            out.append(lv)
        return out

    def _pick_server(self, exclude: int | None = None) -> int:
        up = [i for i in range(len(self.backends)) if self._up[i] and i != exclude]
        if not up:
            up = [i for i in range(len(self.backends)) if i != exclude] or [0]
        return min(up, key=lambda i: self._load[i])

    def _launch(self) -> bool:
        """Start generations for ready trajectories; True if the slice budget cut it short."""
        if self._paused:
            return False
        if self.cfg.lockstep:
            if self._tool_wait and not self._gen_tasks:  # the whole batch generated: tools
                for lv, calls in self._tool_wait:
                    self._spawn(self._run_tools(lv, calls), lv)
                    self._tool_jobs += 1
                self._tool_wait.clear()
            if self._gen_tasks or self._tool_jobs or self._tool_wait or self._batch_open:
                return False
        # lock-step launches the whole batch's turn at once; otherwise a bounded slice
        budget = 1 << 62 if self.cfg.lockstep else self.LAUNCHES_PER_SLICE
        cap = self.cfg.max_inflight_per_server
        for s, q in enumerate(self._ready):
            while q and self._inflight[s] < cap and budget > 0:
                budget -= 1
                lv = q.popleft()
                if lv.expired:  # its deadline passed while it waited for a slot
                    self._events.put_nowait(("done", lv, (Status.TRUNCATED, "timeout")))
                    continue
                self._inflight[s] += 1
                lv.request_id = f"{lv.traj.id}/{next(self._request_seq)}"
                task = self._spawn(self._generate(lv), lv)
                if not self._gen_tasks:  # (idle is set only while no generation is in flight)
                    self._busy_since = time.perf_counter()
                    self._idle.clear()
                self._gen_tasks[lv.request_id] = (task, lv)
        return budget == 0

    # -- jobs (each ends by putting exactly one event) -------------------------------------
    def _spawn(self, coro: Any, lv: _Live) -> asyncio.Task:
        """Run a job as a task (no done-callback: the job reports its own end, and the deadline
        sweep, the only canceller during a run, reports for a job cancelled before it started)."""
        lv.reported = False
        task = lv.job = self._aloop.create_task(coro)
        self._jobs.add(task)
        return task

    async def _generate(self, lv: _Live) -> None:
        t0 = time.perf_counter()
        try:
            t = lv.traj
            turn = len(t.turns)
            budget = min(self.cfg.max_tokens_per_turn, self.cfg.max_context - lv.ntok)
            forced = self.policy.forced_ids(t, turn) if self.policy is not None else None
            if self._sampling is None:  # validated once; each turn re-checks only what changes
                self._sampling = SamplingParams(
                    max_tokens=self.cfg.max_tokens_per_turn, temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p, stop_token_ids=list(self._stop_ids))
            req = GenerateRequest(
                request_id=lv.request_id, prompt_ids=t.token_array(),
                images=t.images() if lv.n_images else [],
                sampling=self._sampling.for_turn(
                    budget, zlib.crc32(f"{self.cfg.seed}/{t.id}/{turn}".encode())),  # stable across processes
                forced_ids=forced[:budget] if forced is not None else None)
        except Exception as e:  # noqa: BLE001 - a bad policy/prompt ends this trajectory, not the run
            lv.reported = True
            self._jobs.discard(lv.job)
            self._events.put_nowait(("gen_fail", lv, e))
            return
        lv.reported = True  # from here the coroutine itself reports how it ended
        try:
            limit, call = self.cfg.request_timeout_s, self.backends[lv.server].generate(req)
            out = await (asyncio.wait_for(call, limit) if limit > 0 else call)
            self._events.put_nowait(("gen", lv, (out, t0, time.perf_counter())))
        except asyncio.CancelledError:  # the deadline sweep cancelled it
            self._events.put_nowait(("gen_timeout", lv, (t0, time.perf_counter())))
        except TimeoutError:  # a hung server: fail over like a refused request
            name = getattr(self.backends[lv.server], "name", lv.server)
            self._events.put_nowait(("gen_error", lv, BackendError(name, f"no reply in {limit:g} s (request_timeout_s)")))
        except Exception as e:  # noqa: BLE001 - a dead server must not kill the run
            self._events.put_nowait(("gen_error", lv, e))
        self._jobs.discard(lv.job)  # lv.job is this task until its event is handled

    async def _run_tools(self, lv: _Live, calls: list[dict[str, Any]]) -> None:
        lv.reported = True
        t0 = time.perf_counter()
        try:
            outs = await self.tools(calls, lv.traj)
        except asyncio.CancelledError:  # the deadline sweep cancelled it
            outs = None
        except Exception as e:  # noqa: BLE001 - a tool bug becomes a fatal observation
            outs = [ToolOutcome(f"tool runner failed: {type(e).__name__}: {e}", error_kind="fatal")
                    for _ in calls]
        self._jobs.discard(lv.job)
        self._events.put_nowait(("tools", lv, (outs, t0, time.perf_counter())))

    async def _run_env(self, lv: _Live, parsed: ParsedTurn) -> None:
        lv.reported = True
        t0 = time.perf_counter()
        try:
            step: EnvStep | None = await self.env.step(lv.traj, parsed)
        except asyncio.CancelledError:  # the deadline sweep cancelled it
            step = None
        except Exception as e:  # noqa: BLE001 - an environment bug becomes a failed step, not a dead run
            step = EnvStep(f"environment failed: {type(e).__name__}: {e}", ok=False)
        self._jobs.discard(lv.job)
        self._events.put_nowait(("env", lv, (step, parsed.answer, t0, time.perf_counter())))

    # -- event handling -----------------------------------------------------------------
    def _handle(self, kind: str, lv: _Live, payload: Any) -> bool:
        """Advance one trajectory; True when it has just finished."""
        if kind == "tools":
            self._tool_jobs -= 1
            return self._on_tools(lv, *payload)
        if kind == "env":
            self._tool_jobs -= 1
            return self._on_env(lv, *payload)
        if kind == "done":
            return self._finish(lv, *payload)
        if kind.startswith("gen"):
            if self._gen_tasks.pop(lv.request_id, None) is not None and not self._gen_tasks:
                self.stats.busy_s += time.perf_counter() - self._busy_since
            self._inflight[lv.server] -= 1
        if kind == "gen":
            return self._on_generated(lv, *payload)
        if kind == "gen_timeout":
            return self._finish(lv, Status.TRUNCATED, "timeout")
        if kind == "gen_error":
            return self._on_server_error(lv, payload)
        if kind == "gen_fail":
            lv.traj.meta["engine_error"] = f"{type(payload).__name__}: {payload}"
            return self._finish(lv, Status.ERROR, "engine_error")
        raise RuntimeError(f"unknown engine event {kind!r}")

    def _on_server_error(self, lv: _Live, err: Exception) -> bool:
        self._up[lv.server] = False
        lv.moves += 1
        if lv.moves > self.cfg.max_server_retries:
            lv.traj.meta["engine_error"] = f"{type(err).__name__}: {err}"
            return self._finish(lv, Status.ERROR, "backend_error")
        new = self._pick_server(exclude=lv.server)
        self._load[lv.server] -= 1
        self._load[new] += 1
        lv.server = new
        self.stats.server_moves += 1
        self._ready[new].append(lv)
        return False

    def _on_generated(self, lv: _Live, out: Any, t0: float, t1: float) -> bool:
        t, cfg = lv.traj, self.cfg
        self._up[lv.server] = True  # it answered: back in the placement rotation
        if lv.expired:
            return self._finish(lv, Status.TRUNCATED, "timeout")
        if out.finish_reason == "abort":  # redo this turn at the boundary, under the new version
            self.stats.aborted_turns += 1
            lv.ready_since = t1
            self._ready[lv.server].append(lv)
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
        self._account(lv, "gen", t0, t1, turn)
        if self.env is not None:  # the environment decides what comes next (after the repetition check)
            if self._repetitive(ids):
                return self._finish(lv, Status.INTERRUPTED, "repetition")
            self._spawn(self._run_env(lv, parsed), lv)
            self._tool_jobs += 1
            return False
        if parsed.answer is not None and not parsed.calls:
            turn.answered, t.answer = True, parsed.answer
            return self._finish(lv, Status.ANSWERED, "answer")
        if self._repetitive(ids):
            return self._finish(lv, Status.INTERRUPTED, "repetition")
        if self._cascade(t):
            return self._finish(lv, Status.FATAL, "fatal_cascade")
        if len(t.turns) >= cfg.max_turns:
            return self._finish(lv, Status.TRUNCATED, "max_turns")
        if not parsed.calls:  # a format error: tell the model, go on
            msg = "; ".join(e.get("message", e.get("kind", "")) for e in parsed.errors) or (
                "no <tool_call> and no <answer> in this turn")
            return self._observe(lv, [ToolOutcome(f"Error: {msg}", error_kind="bad_args")], t1, t1)
        if self.cfg.lockstep:
            self._tool_wait.append((lv, parsed.calls))
        else:
            self._spawn(self._run_tools(lv, parsed.calls), lv)
            self._tool_jobs += 1
        return False

    def _repetitive(self, ids: Sequence[int]) -> bool:
        """A long turn whose tail (without the stop token) repeats a block (the detector's rule)."""
        cfg = self.cfg
        n_body = len(ids) - 1 if ids and ids[-1] in self._stops else len(ids)
        return n_body >= cfg.repetition_min_tokens and is_repetitive(
            ids[:n_body], cfg.repetition_max_period, cfg.repetition_min_repeats)

    def _on_env(self, lv: _Live, step: EnvStep | None, parsed_answer: str | None, t0: float, t1: float) -> bool:
        t, turn = lv.traj, lv.traj.turns[-1]
        turn.tool_s = t1 - t0
        if step is None:
            return self._finish(lv, Status.TRUNCATED, "timeout")
        turn.env_ok = bool(step.ok)
        if step.done:
            if step.reward is not None:
                t.reward["total"] = float(step.reward)
            t.answer = step.answer if step.answer is not None else parsed_answer
            turn.answered = t.answer is not None
            return self._finish(lv, Status.ANSWERED if turn.answered else Status.TRUNCATED, "env_done")
        if self._cascade(t):
            return self._finish(lv, Status.FATAL, "fatal_cascade")
        if len(t.turns) >= self.cfg.max_turns:
            return self._finish(lv, Status.TRUNCATED, "max_turns")
        return self._observe(lv, [ToolOutcome(step.observation, images=list(step.images),
                                              error_kind=None if step.ok else "bad_args")], t0, t1)

    def _on_tools(self, lv: _Live, outs: list[ToolOutcome] | None, t0: float, t1: float) -> bool:
        if outs is None:
            lv.traj.turns[-1].tool_s = t1 - t0
            return self._finish(lv, Status.TRUNCATED, "timeout")
        turn = lv.traj.turns[-1]
        errors = [{"name": c["name"], "kind": o.error_kind, "message": o.text}
                  for c, o in zip(turn.calls, outs) if o.error_kind is not None]
        if errors:  # else the Turn keeps its own empty list
            turn.tool_errors = errors
        self.stats.tool_latencies.append(t1 - t0)
        if turn.parse_errors:  # the calls that did not parse are answered too, after the ones that ran
            outs = outs + [ToolOutcome(f"Error in tool call {e.get('index', '?')}: {e.get('message', e.get('kind'))}",
                                       error_kind="bad_args") for e in turn.parse_errors]
        return self._observe(lv, outs, t0, t1)

    def _observe(self, lv: _Live, outs: list[ToolOutcome], t0: float, t1: float) -> bool:
        t, cfg = lv.traj, self.cfg
        turn = t.turns[-1]
        turn.tool_s = t1 - t0
        self._account(lv, "tool", t0, t1, None)
        n_before = lv.n_images
        texts, images = [], []
        spent = False  # once an image is dropped, every later one is too: names stay in order
        for o in outs:
            if not o.images:  # the usual observation: its text as it is
                texts.append(o.text)
                continue
            keep, dropped, unusable = [], [], []
            for k, im in enumerate(o.images):
                ref = o.image_refs[k] if o.image_refs else "an image"
                try:
                    cost = self.image_tokens(im)
                except ValueError as e:  # the model's processor cannot take it (a 1-pixel-high crop)
                    unusable.append(f"{ref} ({im.width}x{im.height}: {e})")
                    spent = True
                    continue
                if spent or len(images) + len(keep) >= cfg.max_images_per_obs or \
                        lv.image_tokens + cost > cfg.max_image_tokens:
                    dropped.append(ref)
                    spent = True
                    continue
                lv.image_tokens += cost
                keep.append(im)
            text = o.text
            if keep and o.image_refs is None:  # the runner left naming to the engine
                names = ", ".join(f"img_{n_before + len(images) + i + 1}" for i in range(len(keep)))
                text += f" [new images: {names}]"
            if unusable:
                text += f" ({'; '.join(unusable)} omitted: the model cannot take it)"
            if dropped:
                text += (f" ({', '.join(dropped)} omitted: the image budget is spent or an earlier"
                         " image was omitted; omitted images cannot be referenced)")
            images += keep
            texts.append(text)
        text = "\n".join(texts)
        if cfg.recite_question:
            text += f"\nQuestion: {t.prompt_messages[0]['content']}"
        last = t.segments[-1].token_ids
        closed = bool(last) and last[-1] == self._stop_ids[0]  # ended by the turn's own end token
        #   (a turn ended by another stop, e.g. <|endoftext|>, keeps it and gets <|im_end|> after it)
        ids = self.codec.encode_observation(text, images, closed, n_before + 1)
        t.segments.append(Segment(SegmentKind.OBS, ids, turn=turn.index, images=images, text=text))
        lv.ntok += len(ids)
        lv.n_images += len(images)
        turn.obs_tokens = len(ids)
        self.stats.obs_tokens += len(ids)
        if self.on_turn is not None:
            self.on_turn(t, turn)
        if self._cascade(t):
            return self._finish(lv, Status.FATAL, "fatal_cascade")
        now = time.perf_counter()
        if lv.expired or now >= lv.deadline:
            return self._finish(lv, Status.TRUNCATED, "timeout")
        if lv.ntok >= cfg.max_context:
            return self._finish(lv, Status.TRUNCATED, "max_context")
        lv.ready_since = now
        self._ready[lv.server].append(lv)
        return False

    def _cascade(self, t: Trajectory) -> bool:
        """K consecutive error steps, the last not an answer (checked last turn first: cheap)."""
        turns, k = t.turns, self.cfg.fatal_k
        if len(turns) < k or turns[-1].ok or turns[-1].answered:
            return False
        return not any(x.ok for x in turns[-k:])

    def _account(self, lv: _Live, kind: str, t0: float, t1: float, turn: Turn | None) -> None:
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
            if kind == "gen" and turn is not None and turn.queue_s > 0:
                s.spans.append((lv.traj.id, "wait", t0 - turn.queue_s, t0))
            s.spans.append((lv.traj.id, kind, t0, t1))

    def _finish(self, lv: _Live, status: Status, reason: str) -> bool:
        lv.done = True
        t = lv.traj
        t.status, t.stop_reason, t.finished_at = status, reason, time.time()
        t.fatal_step = t.compute_fatal_step(self.cfg.fatal_k)
        if self.cfg.check_tokens:
            self._check_tokens(t)
        self.stats.finished += 1
        self.stats.by_status[status.value] += 1
        return True

    def _check_tokens(self, t: Trajectory) -> None:
        """Token-in/token-out invariant: the accumulated ids equal a fresh tokenization of the
        conversation, where the codec can say (a model may sample a non-canonical
        tokenization of its own text: that counts as a mismatch, not an error, unless strict)."""
        retok = getattr(self.codec, "retokenize", None)
        if retok is None:
            self.stats.token_check["unsupported"] += 1
            return
        turns: list[tuple[str, str | None, list]] = []
        for s in t.segments:
            if s.kind is SegmentKind.GEN:
                ids = s.token_ids[:-1] if len(s.token_ids) and s.token_ids[-1] in self.codec.stop_token_ids \
                    else s.token_ids
                turns.append((self.codec.decode(ids), None, []))
            else:
                said = turns.pop()[0]
                turns.append((said, s.text, s.images))
        question = t.prompt_messages[0]["content"] if t.prompt_messages else ""
        fresh = retok(question, t.prompt_images, self._schemas(t.meta.get("tools")), turns, system=t.meta.get("system"))
        ok = fresh == t.token_ids()
        self.stats.token_check["ok" if ok else "mismatch"] += 1
        if not ok and self.cfg.strict_tokens:
            got = t.token_ids()
            i = next((i for i, (a, b) in enumerate(zip(got, fresh)) if a != b), min(len(got), len(fresh)))
            raise AssertionError(f"trajectory {t.id}: accumulated ids differ from a fresh tokenization "
                                 f"at position {i} (lengths {len(got)} vs {len(fresh)})")
