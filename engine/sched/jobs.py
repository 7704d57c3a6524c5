"""The engine's jobs (the "execute" of schedule -> execute -> update): a generation, a turn's
tools, a custom environment's step, each an asyncio task that posts exactly one typed event
(engine/sched/events.py) when it ends, and never raises into the loop: a dead server, a tool
bug, an environment bug or a bad policy becomes that trajectory's event.

    jobs = Jobs(cfg, backends, tools, env, policy, stop_ids, inbox)
    jobs.loop = asyncio.get_running_loop()        # at the start of a run
    task = jobs.generate(lv)                      # -> Generated | GenTimedOut | ServerFailed | RequestFailed
    jobs.run_tools(lv, calls)                     # -> ToolsDone
    jobs.step_env(lv, parsed)                     # -> EnvStepped
    jobs.cancel(lv, generating=True, now=now)     # the deadline: cancel (and abort at the server)

A generation request carries the whole context, this turn's token budget (max_tokens_per_turn,
capped by what max_context leaves), a seed derived from (seed, trajectory id, turn) and stable
across processes, and the policy's forced ids when it has them.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any, Coroutine, Sequence

from ..backends.base import BackendError, GenerateRequest, SamplingParams
from ..trajectory import EnvStep, ParsedTurn, ToolResult
from .events import EnvStepped, Generated, GenTimedOut, Inbox, Live, RequestFailed, ServerFailed, ToolsDone


class Jobs:
    """Starts and cancels the engine's jobs (see the module docstring); `tasks` holds every
    job and abort task in flight."""

    def __init__(self, cfg: Any, backends: Sequence[Any], tools: Any, env: Any, policy: Any,
                 stop_ids: Sequence[int], inbox: Inbox) -> None:
        self.cfg, self.backends, self.tools, self.env, self.policy = cfg, backends, tools, env, policy
        self.stop_ids = list(stop_ids)
        self.inbox = inbox
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sampling: SamplingParams | None = None  # the engine's sampling, max_tokens/seed per turn

    # -- starting and cancelling ----------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], lv: Live) -> asyncio.Task:
        """Run a job as a task (no done-callback: the job reports its own end, and `cancel`, the
        only canceller during a run, reports for a job cancelled before it started)."""
        lv.reported = False
        task = lv.job = self.loop.create_task(coro)
        self.tasks.add(task)
        return task

    def generate(self, lv: Live) -> asyncio.Task:
        return self._spawn(self._generate(lv), lv)

    def run_tools(self, lv: Live, calls: list[dict[str, Any]]) -> asyncio.Task:
        return self._spawn(self._run_tools(lv, calls), lv)

    def step_env(self, lv: Live, parsed: ParsedTurn) -> asyncio.Task:
        return self._spawn(self._run_env(lv, parsed), lv)

    def cancel(self, lv: Live, generating: bool, now: float) -> None:
        """Cancel `lv`'s job in flight (a generation is also aborted at its server); a job
        cancelled before its coroutine started is reported here, as it never will be."""
        if lv.job is None or lv.job.done():
            return
        if generating:
            abort = asyncio.ensure_future(self.backends[lv.server].abort(lv.request_id))
            self.tasks.add(abort)
            abort.add_done_callback(lambda t: (self.tasks.discard(t), t.cancelled() or t.exception()))
        lv.job.cancel()
        if not lv.reported:
            lv.reported = True
            self.tasks.discard(lv.job)
            self.inbox.put_nowait(GenTimedOut(lv, now, now) if generating else ToolsDone(lv, None, now, now))

    def cancel_all(self) -> None:
        for t in list(self.tasks):
            t.cancel()

    # -- the jobs --------------------------------------------------------------------------
    def request(self, lv: Live) -> GenerateRequest:
        """The generation request of `lv`'s next turn (see the module docstring)."""
        t, cfg = lv.traj, self.cfg
        turn = len(t.turns)
        budget = min(cfg.max_tokens_per_turn, cfg.max_context - lv.ntok)
        forced = self.policy.forced_ids(t, turn) if self.policy is not None else None
        if self._sampling is None:  # validated once; each turn re-checks only what changes
            self._sampling = SamplingParams(max_tokens=cfg.max_tokens_per_turn, temperature=cfg.temperature,
                                            top_p=cfg.top_p, stop_token_ids=list(self.stop_ids))
        return GenerateRequest(
            request_id=lv.request_id, prompt_ids=t.token_array(),
            images=t.images() if lv.n_images else [],
            sampling=self._sampling.for_turn(budget, zlib.crc32(f"{cfg.seed}/{t.id}/{turn}".encode())),
            forced_ids=forced[:budget] if forced is not None else None)

    async def _generate(self, lv: Live) -> None:
        t0 = time.perf_counter()
        post = self.inbox.put_nowait
        try:
            req = self.request(lv)
        except Exception as e:  # noqa: BLE001 - a bad policy/prompt ends this trajectory, not the run
            lv.reported = True
            self.tasks.discard(lv.job)
            post(RequestFailed(lv, e))
            return
        lv.reported = True  # from here the coroutine itself reports how it ended
        try:
            limit, call = self.cfg.request_timeout_s, self.backends[lv.server].generate(req)
            out = await (asyncio.wait_for(call, limit) if limit > 0 else call)
            post(Generated(lv, out, t0, time.perf_counter()))
        except asyncio.CancelledError:  # the deadline cancelled it
            post(GenTimedOut(lv, t0, time.perf_counter()))
        except TimeoutError:  # a hung server: fail over like a refused request
            name = getattr(self.backends[lv.server], "name", lv.server)
            post(ServerFailed(lv, BackendError(name, f"no reply in {limit:g} s (request_timeout_s)")))
        except Exception as e:  # noqa: BLE001 - a dead server must not kill the run
            post(ServerFailed(lv, e))
        self.tasks.discard(lv.job)  # lv.job is this task until its event is handled

    async def _run_tools(self, lv: Live, calls: list[dict[str, Any]]) -> None:
        lv.reported = True
        t0 = time.perf_counter()
        try:
            outs = await self.tools(calls, lv.traj)
        except asyncio.CancelledError:  # the deadline cancelled it
            outs = None
        except Exception as e:  # noqa: BLE001 - a tool bug becomes a fatal observation
            outs = [ToolResult(f"tool runner failed: {type(e).__name__}: {e}", error="fatal") for _ in calls]
        self.tasks.discard(lv.job)
        self.inbox.put_nowait(ToolsDone(lv, outs, t0, time.perf_counter()))

    async def _run_env(self, lv: Live, parsed: ParsedTurn) -> None:
        lv.reported = True
        t0 = time.perf_counter()
        try:
            step: EnvStep | None = await self.env.step(lv.traj, parsed)
        except asyncio.CancelledError:  # the deadline cancelled it
            step = None
        except Exception as e:  # noqa: BLE001 - an environment bug becomes a failed step, not a dead run
            step = EnvStep(f"environment failed: {type(e).__name__}: {e}", ok=False)
        self.tasks.discard(lv.job)
        self.inbox.put_nowait(EnvStepped(lv, step, parsed.answer, t0, time.perf_counter()))
