"""ToolExecutor: runs parsed tool calls — cached, coalesced, rate-limited, timed out, retried.

One call = (tool name, canonical JSON args, the trajectory's ToolContext). The executor
  1. looks the tool up (unknown -> bad_args) and parses the args (malformed -> bad_args);
  2. builds the key: the args re-serialised canonically with every image argument
     (Tool.image_args, an img_N ref or a list of them) replaced by the image's content digest,
     so identical requests from different trajectories share one key;
  3. answers from the disk cache (ToolCache) when it holds an unexpired result;
  4. otherwise submits the key for execution. With a coalescer (the C++ Coalescer, built by
     `coalescer_factory(dispatch)`), identical in-flight keys run once and per-tool batches
     reach `dispatch(tool, [keys])`, which maps each key back to the (args, ctx) of its first
     submitter and calls Tool.batch_fn (when set) or Tool.fn per item concurrently. Without a
     coalescer, identical in-flight calls are de-duplicated by a dict of asyncio tasks;
  5. each attempt runs under the tool's concurrency limit (asyncio.Semaphore) and timeout;
     transient failures are retried with exponential backoff and jitter (Tool.retries times),
     and a transient failure that persists is reported as fatal;
  6. classifies every failure: ToolError keeps its kind, a timeout is transient, any other
     exception is fatal with its type and message (read by the fatal-step detector);
  7. publishes new images per caller: a result with images and no meta["image_refs"] (the
     tool left them unpublished, captions in meta["captions"]) has them appended to *this*
     caller's ctx and named img_N in its text (imgutil.publish). Results are cached and shared
     unpublished, so a coalesced or cached image result names the right images in every
     trajectory. (A tool that publishes itself gets no such fix: its image names are those of
     the first caller's context.)

    ex = ToolExecutor({"TextSearch": tool}, cache=ToolCache("cache.sqlite"),
                      coalescer_factory=functools.partial(Coalescer, max_batch=16))  # or None
    result = await ex.execute("TextSearch", '{"query":"eiffel tower"}', ctx)
    ex.stats()   # calls, cache_hits, coalesced, retries, errors by kind, latency per tool
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from spyglass.engine.tools.base import (ErrorKind, Tool, ToolContext, ToolError, ToolResult,
                                        registered_tools)
from spyglass.engine.tools.cache import ToolCache
from spyglass.engine.tools.imgutil import publish

log = logging.getLogger(__name__)

Dispatch = Callable[[str, list[str]], Awaitable[list[object]]]


class CoalescerLike(Protocol):
    """What the executor needs from spyglass.engine.coalescer.Coalescer."""

    stats: dict

    async def submit(self, tool: str, canonical_args: str) -> object: ...


CoalescerFactory = Callable[[Dispatch], CoalescerLike]


@dataclass
class ExecutorConfig:
    """Retry policy: delay_i = min(backoff_max_s, backoff_base_s * 2**i) * U(1 - jitter, 1)."""

    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    jitter: float = 0.5
    seed: int | None = None
    latency_window: int = 2048  # recent latencies kept per tool for percentiles

    def __post_init__(self) -> None:
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError(f"bad backoff: base={self.backoff_base_s} max={self.backoff_max_s}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.latency_window < 1:
            raise ValueError(f"latency_window must be >= 1, got {self.latency_window}")


@dataclass
class _ToolStats:
    calls: int = 0
    errors: int = 0
    latencies_s: deque = field(default_factory=deque)
    total_s: float = 0.0
    max_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)

        def pct(q: float) -> float:
            return 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0
        mean = 1e3 * self.total_s / self.calls if self.calls else 0.0
        return {"calls": self.calls, "errors": self.errors, "latency_ms": {
            "mean": mean, "p50": pct(0.5), "p99": pct(0.99), "max": 1e3 * self.max_s}}


def copy_result(res: ToolResult, **meta: Any) -> ToolResult:
    """A per-caller copy of a shared result (fan-out must not share mutable lists/dicts)."""
    return ToolResult(text=res.text, images=list(res.images), error=res.error,
                      meta={**res.meta, **meta})


class ToolExecutor:
    """Executes tool calls by name with caching, coalescing, limits, retries and stats."""

    def __init__(self, tools: dict[str, Tool] | None = None, cache: ToolCache | None = None,
                 coalescer_factory: CoalescerFactory | None = None,
                 config: ExecutorConfig | None = None) -> None:
        self.tools = dict(registered_tools() if tools is None else tools)
        for name, tool in self.tools.items():
            if not isinstance(tool, Tool) or tool.name != name:
                raise ValueError(f"tools[{name!r}] must be a Tool named {name!r}, got {tool!r}")
        self.cache = cache
        self.config = config or ExecutorConfig()
        self._rng = random.Random(self.config.seed)
        self._sems = {n: asyncio.Semaphore(t.max_concurrency) for n, t in self.tools.items()}
        self._inflight: dict[tuple[str, str], asyncio.Task] = {}
        self._pending: dict[tuple[str, str], list[Any]] = {}  # key -> [args, ctx, refcount]
        self._coalescer = coalescer_factory(self.dispatch) if coalescer_factory else None
        self._counts = {"calls": 0, "cache_hits": 0, "coalesced": 0, "retries": 0}
        self._errors = {k.value: 0 for k in ErrorKind}
        self._per_tool: dict[str, _ToolStats] = {}

    # ---------------------------------------------------------------- the public entry point
    async def execute(self, name: str, canonical_args: str, ctx: ToolContext) -> ToolResult:
        """Run one call and return its result; never raises for tool failures."""
        t0 = time.perf_counter()
        self._counts["calls"] += 1
        try:
            res = await self._execute(name, canonical_args, ctx)
        except ToolError as e:
            res = ToolResult(error=e)
        if res.images and res.ok and "image_refs" not in res.meta:
            res = publish(ctx, res)  # name new images in *this* caller's context
        if res.error is not None and not res.error.tool:
            res.error.tool = name
        self._record(name, res, time.perf_counter() - t0)
        return res

    async def _execute(self, name: str, canonical_args: str, ctx: ToolContext) -> ToolResult:
        tool = self.tools.get(name)
        if tool is None:
            raise ToolError(ErrorKind.BAD_ARGS,
                            f"unknown tool {name!r}; available tools: {sorted(self.tools)}", name)
        args = parse_args(name, canonical_args)
        key = self.make_key(tool, args, ctx)
        if self.cache is not None and tool.cacheable:
            hit = self.cache.get(name, key)  # WAL reads never wait on writers: inline
            if hit is not None:
                self._counts["cache_hits"] += 1
                return copy_result(hit, cache_hit=True)
        if self._coalescer is not None:
            return await self._submit_coalesced(tool, key, args, ctx)
        return await self._submit_direct(tool, key, args, ctx)

    @staticmethod
    def make_key(tool: Tool, args: dict[str, Any], ctx: ToolContext) -> str:
        """Canonical args with image refs replaced by content digests (bad ref -> bad_args)."""
        keyed = dict(args)
        for arg in tool.image_args:
            if arg not in keyed:
                continue
            ref = keyed[arg]
            if isinstance(ref, list):
                keyed[arg] = ["sha:" + ctx.image_key(r) for r in ref]
            else:
                keyed[arg] = "sha:" + ctx.image_key(ref)
        return json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    # --------------------------------------------------------------------------- submission
    async def _submit_direct(self, tool: Tool, key: str, args: dict[str, Any],
                             ctx: ToolContext) -> ToolResult:
        """Without a coalescer: the first caller of a key runs it inline (no extra task); later
        identical callers wait on its future. If that first caller is cancelled, its waiters
        are told so and one of them runs the call again."""
        fkey = (tool.name, key)
        while (fut := self._inflight.get(fkey)) is not None:
            try:
                res = await asyncio.shield(fut)  # a cancelled waiter leaves the run alone
            except _LeaderCancelled:
                continue
            self._counts["coalesced"] += 1
            return copy_result(res, coalesced=True)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._inflight[fkey] = fut
        try:
            res = (await self._run_items(tool, [key], [(args, ctx)]))[0]
        except BaseException as e:
            fut.set_exception(_LeaderCancelled() if isinstance(e, asyncio.CancelledError) else e)
            raise
        finally:
            del self._inflight[fkey]
        fut.set_result(res)
        return copy_result(res)

    async def _submit_coalesced(self, tool: Tool, key: str, args: dict[str, Any],
                                ctx: ToolContext) -> ToolResult:
        fkey = (tool.name, key)
        entry = self._pending.get(fkey)
        coalesced = entry is not None
        if entry is None:
            self._pending[fkey] = [args, ctx, 1]
        else:
            entry[2] += 1
            self._counts["coalesced"] += 1
        try:
            out = await self._coalescer.submit(tool.name, key)  # type: ignore[union-attr]
        except ToolError as e:
            return ToolResult(error=e)
        except Exception as e:  # the dispatch or the coalescer itself failed
            return ToolResult.fail(ErrorKind.FATAL, f"{type(e).__name__}: {e}", tool.name)
        finally:
            entry = self._pending[fkey]
            entry[2] -= 1
            if entry[2] == 0:
                del self._pending[fkey]
        if not isinstance(out, ToolResult):
            return ToolResult.fail(ErrorKind.FATAL, f"coalescer returned {type(out).__name__}, "
                                   f"not a ToolResult", tool.name)
        return copy_result(out, coalesced=True) if coalesced else copy_result(out)

    async def dispatch(self, name: str, keys: list[str]) -> list[object]:
        """The coalescer's dispatch: run a batch of keys of one tool, results in order."""
        tool = self.tools.get(name)
        if tool is None:
            raise KeyError(f"dispatch for unknown tool {name!r}")
        out: list[object] = [None] * len(keys)
        live, items = [], []
        for i, key in enumerate(keys):
            entry = self._pending.get((name, key))
            if entry is None:  # every caller withdrew (cancelled) before the batch started
                out[i] = ToolError(ErrorKind.FATAL, f"{name}: call withdrawn before it ran", name)
                continue
            live.append(i)
            items.append((entry[0], entry[1]))
        results = await self._run_items(tool, [keys[i] for i in live], items) if items else []
        for i, res in zip(live, results):
            out[i] = res
        return out

    # ---------------------------------------------------------------------------- execution
    async def _run_items(self, tool: Tool, keys: list[str],
                         items: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
        if tool.batch_fn is not None and len(items) > 1:
            results = await self._run_batch(tool, items)
        elif len(items) == 1:
            results = [await self._run_one(tool, *items[0])]
        else:
            results = list(await asyncio.gather(*(self._run_one(tool, a, c) for a, c in items)))
        if self.cache is not None and tool.cacheable:
            for key, res in zip(keys, results):
                if res.ok:
                    try:
                        await self.cache.aput(tool.name, key, res, ttl_s=tool.cache_ttl_s)
                    except Exception as e:  # a cache failure must not fail the call
                        log.warning("tool cache write for %s failed: %s", tool.name, e)
        return results

    async def _attempt(self, tool: Tool, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        """One attempt under the concurrency limit and timeout; failures become ToolResults."""
        async with self._sems[tool.name]:
            try:
                return await _with_timeout(coro_fn(), tool.timeout_s)
            except ToolError as e:
                return ToolResult(error=e)
            except asyncio.TimeoutError:
                return ToolResult.fail(ErrorKind.TRANSIENT,
                                       f"{tool.name} timed out after {tool.timeout_s:g}s", tool.name)
            except Exception as e:  # an uncaught exception in a tool is fatal
                return ToolResult.fail(ErrorKind.FATAL, f"{type(e).__name__}: {e}", tool.name)

    async def _run_one(self, tool: Tool, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        res: ToolResult = ToolResult()
        for attempt in range(tool.retries + 1):
            res = _as_result(tool, await self._attempt(tool, lambda: tool.fn(args, ctx)))
            if not _is_transient(res):
                return res
            if attempt < tool.retries:
                self._counts["retries"] += 1
                await asyncio.sleep(self._backoff(attempt))
        return _exhausted(tool, res)

    async def _run_batch(self, tool: Tool,
                         items: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
        results: list[ToolResult] = [ToolResult()] * len(items)
        todo = list(range(len(items)))
        for attempt in range(tool.retries + 1):
            sub = [items[i] for i in todo]
            out = await self._attempt(tool, lambda: tool.batch_fn(sub))  # type: ignore[misc]
            if isinstance(out, ToolResult):  # the whole batch failed
                out = [out] * len(sub)
            elif not isinstance(out, list) or len(out) != len(sub):
                n = len(out) if isinstance(out, list) else type(out).__name__
                out = [ToolResult.fail(ErrorKind.FATAL, f"{tool.name}.batch_fn returned {n} "
                                       f"results for {len(sub)} calls", tool.name)] * len(sub)
            for i, r in zip(todo, out):
                results[i] = _as_result(tool, r)
            todo = [i for i in todo if _is_transient(results[i])]
            if not todo:
                return results
            if attempt < tool.retries:
                self._counts["retries"] += len(todo)
                await asyncio.sleep(self._backoff(attempt))
        for i in todo:
            results[i] = _exhausted(tool, results[i])
        return results

    def _backoff(self, attempt: int) -> float:
        c = self.config
        delay = min(c.backoff_max_s, c.backoff_base_s * (2 ** attempt))
        return delay * self._rng.uniform(1.0 - c.jitter, 1.0)

    # -------------------------------------------------------------------------------- stats
    def _record(self, name: str, res: ToolResult, dt: float) -> None:
        st = self._per_tool.get(name)
        if st is None:
            st = self._per_tool[name] = _ToolStats(
                latencies_s=deque(maxlen=self.config.latency_window))
        st.calls += 1
        st.total_s += dt
        st.max_s = max(st.max_s, dt)
        st.latencies_s.append(dt)
        if res.error is not None:
            st.errors += 1
            self._errors[res.error.kind.value] += 1

    def stats(self) -> dict[str, Any]:
        """Counters: calls, cache_hits, coalesced, retries, errors by kind, latency per tool."""
        out: dict[str, Any] = dict(self._counts)
        out["errors"] = dict(self._errors)
        out["per_tool"] = {n: s.summary() for n, s in sorted(self._per_tool.items())}
        if self._coalescer is not None:
            out["coalescer"] = dict(getattr(self._coalescer, "stats", {}) or {})
        return out


async def _with_timeout(coro: Awaitable[Any], timeout_s: float) -> Any:
    """await coro with a deadline; asyncio.timeout (3.11+) avoids wait_for's extra task."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout_s)


def parse_args(name: str, canonical_args: str) -> dict[str, Any]:
    """json-parse a call's arguments; anything but a JSON object is bad_args."""
    try:
        args = json.loads(canonical_args)
    except (TypeError, ValueError) as e:
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: arguments are not valid JSON ({e}): "
                        f"{str(canonical_args)[:200]!r}", name) from None
    if not isinstance(args, dict):
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: arguments must be a JSON object, got "
                        f"{type(args).__name__}: {str(canonical_args)[:200]!r}", name)
    return args


class _LeaderCancelled(Exception):
    """The caller running a de-duplicated call was cancelled: a waiter must run it again."""


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a shared future's exception as seen (its waiters may all be gone)."""
    if not fut.cancelled():
        fut.exception()


def _as_result(tool: Tool, out: Any) -> ToolResult:
    if isinstance(out, ToolResult):
        return out
    if isinstance(out, ToolError):
        return ToolResult(error=out)
    if isinstance(out, BaseException):
        return ToolResult.fail(ErrorKind.FATAL, f"{type(out).__name__}: {out}", tool.name)
    return ToolResult.fail(ErrorKind.FATAL, f"{tool.name} returned {type(out).__name__}, "
                           f"not a ToolResult", tool.name)


def _is_transient(res: ToolResult) -> bool:
    return res.error is not None and res.error.kind is ErrorKind.TRANSIENT


def _exhausted(tool: Tool, res: ToolResult) -> ToolResult:
    """A transient failure that outlived its retries is reported as fatal."""
    assert res.error is not None
    msg = f"{res.error.message} (still failing after {tool.retries + 1} attempts)"
    return ToolResult(error=ToolError(ErrorKind.FATAL, msg, tool.name),
                      meta={**res.meta, "transient_exhausted": True, "attempts": tool.retries + 1})
