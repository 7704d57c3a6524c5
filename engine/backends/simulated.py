"""A latency-modelled generation server for benchmarks at scale (no model, no GPU).

Token-time model (continuous batching, as vLLM/SGLang schedule decoding):
  - The server runs decode steps back to back while it has work. One step takes
        step_s = a + b * n_active + c * (prompt tokens of the requests admitted this step)
    (a = step_base_s = 20 ms, b = step_per_seq_s = 0.05 ms per running sequence,
    c = prefill_per_token_s = 0 by default), i.e. a Vision-DeepResearch-shaped server whose
    step cost is dominated by weight reads and grows slowly with the batch.
  - Every running request emits exactly one token per step. A request that arrives while a
    step runs joins at the next step boundary (its prefill is charged to that step), and at
    most `max_seqs` requests run at once; the rest wait in FIFO order.
  - A request's length is drawn from `lengths` (fixed | uniform | lognormal with mean
    `mean_tokens`) by a PRNG seeded from SamplingParams.seed, or else from (seed, request_id):
    deterministic whatever the arrival order. If the draw is below max_tokens the request ends
    with "stop" and its last token is the first stop token id (SamplingParams.stop_token_ids,
    else `eos_token_id`); otherwise "length" at max_tokens. With forced_ids the tokens are
    exactly those (finish "stop", or "length" if max_tokens cuts them).
  - Token ids are a deterministic pseudo-random stream over [first_token_id, vocab_size);
    logprobs are deterministic values in [-4, 0).
  - Durations are multiplied by `time_scale` (0.01 runs a 10-minute workload in 6 s). The
    server keeps an absolute timeline: a step that starts late (event-loop timer granularity is
    ~1 ms) is followed by shorter sleeps, so throughput follows the model; all statistics
    (`busy_time`, `steps`, `tokens_out`, `tokens_in`) are in MODEL seconds/units (unscaled),
    while GenerateOutput.queue_s/gen_s are wall seconds.
  - `kill()` makes the server dead: in-flight and future requests raise BackendError.

    backend = SimulatedBackend(SimulatedConfig(name="sim-0", time_scale=0.01))
"""
from __future__ import annotations

import asyncio
import heapq
import math
import random
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           Weights, check_version)

LENGTHS = ("fixed", "uniform", "lognormal")


@dataclass
class SimulatedConfig:
    """Latency model of one server (see the module docstring)."""

    kind: ClassVar[str] = "simulated"
    name: str = "sim-0"
    step_base_s: float = 0.020
    step_per_seq_s: float = 0.00005
    prefill_per_token_s: float = 0.0
    max_seqs: int = 256
    time_scale: float = 1.0
    lengths: str = "lognormal"
    mean_tokens: float = 256.0
    sigma: float = 0.6                 # lognormal shape
    vocab_size: int = 32000
    first_token_id: int = 16           # sampled ids avoid the special tokens below this
    eos_token_id: int = 2
    update_s: float = 0.0              # modelled duration of a weight update (blocks steps)
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("step_base_s", "step_per_seq_s", "prefill_per_token_s", "update_s"):
            if not isinstance(getattr(self, k), (int, float)) or getattr(self, k) < 0:
                raise ValueError(f"{k} must be a number >= 0, got {getattr(self, k)!r}")
        if self.step_base_s + self.step_per_seq_s <= 0:
            raise ValueError("step_base_s + step_per_seq_s must be > 0 (a step must take time)")
        if not isinstance(self.max_seqs, int) or self.max_seqs < 1:
            raise ValueError(f"max_seqs must be an int >= 1, got {self.max_seqs!r}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale!r}")
        if self.lengths not in LENGTHS:
            raise ValueError(f"lengths must be one of {LENGTHS}, got {self.lengths!r}")
        if not self.mean_tokens >= 1:
            raise ValueError(f"mean_tokens must be >= 1, got {self.mean_tokens!r}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
        if not 0 <= self.first_token_id < self.vocab_size:
            raise ValueError(f"first_token_id must be in [0, vocab_size={self.vocab_size}), "
                             f"got {self.first_token_id!r}")


@dataclass(eq=False)
class _Sim:
    req: GenerateRequest
    future: asyncio.Future
    t_submit: float
    rng_seed: int
    length: int = 0          # tokens it will emit
    finish: str = "length"   # how it ends if it runs to `length`
    start_step: int = -1     # steps completed when it was admitted
    t_start: float = 0.0
    version_start: int = 0
    done: bool = False
    _order: int = field(default=0)

    def __lt__(self, other: "_Sim") -> bool:
        return self._order < other._order


class SimulatedBackend(Backend):
    """Continuous-batching server driven by the latency model above."""

    supports_images = True
    supports_forced = True

    def __init__(self, cfg: SimulatedConfig | None = None) -> None:
        self.cfg = cfg or SimulatedConfig()
        self.name = self.cfg.name
        self.version = 0
        self.steps = 0
        self.busy_time = 0.0      # model seconds spent in steps
        self.tokens_out = 0       # generated tokens (all finished/aborted requests)
        self.tokens_in = 0        # prompt tokens prefilled
        self.requests_done = 0
        self.max_active_seen = 0
        self._pending: deque[_Sim] = deque()
        self._heap: list[tuple[int, _Sim]] = []  # (finish step, seq)
        self._n_active = 0
        self._by_id: dict[str, _Sim] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self._dead = False
        self._closed = False
        self._counter = 0

    @classmethod
    def from_config(cls, cfg: SimulatedConfig) -> "SimulatedBackend":
        return cls(cfg)

    @property
    def n_active(self) -> int:
        return self._n_active

    # ------------------------------------------------------------------ the model
    def _plan(self, s: _Sim) -> None:
        sp, cfg = s.req.sampling, self.cfg
        if s.req.forced_ids is not None:
            n = len(s.req.forced_ids)
            s.length, s.finish = min(n, sp.max_tokens), ("stop" if n <= sp.max_tokens else "length")
            return
        rng = random.Random(s.rng_seed)
        if cfg.lengths == "fixed":
            natural = int(round(cfg.mean_tokens))
        elif cfg.lengths == "uniform":
            natural = rng.randint(1, max(1, int(round(2 * cfg.mean_tokens)) - 1))
        else:
            mu = math.log(cfg.mean_tokens) - cfg.sigma ** 2 / 2
            natural = max(1, int(round(rng.lognormvariate(mu, cfg.sigma))))
        if natural < sp.max_tokens:
            s.length, s.finish = natural, "stop"
        else:
            s.length, s.finish = sp.max_tokens, "length"

    def _tokens(self, s: _Sim, n: int) -> tuple[list[int], list[float]]:
        if s.req.forced_ids is not None:
            ids = list(s.req.forced_ids[:n])
        else:
            rng = random.Random(s.rng_seed * 2 + 1)
            ids = [rng.randrange(self.cfg.first_token_id, self.cfg.vocab_size) for _ in range(n)]
            if n == s.length and s.finish == "stop":
                stops = s.req.sampling.stop_token_ids
                ids[-1] = stops[0] if stops else self.cfg.eos_token_id
        lp_rng = random.Random(s.rng_seed * 2 + 2)
        return ids, [-4.0 * lp_rng.random() for _ in range(n)]

    def _resolve(self, s: _Sim, n: int, finish: str) -> None:
        if s.done:
            return
        s.done = True
        self._by_id.pop(s.req.request_id, None)
        if s.future.done():
            return
        ids, lps = self._tokens(s, n)
        self.tokens_out += n
        self.requests_done += 1
        now = asyncio.get_running_loop().time()
        start = s.t_start or now
        s.future.set_result(GenerateOutput(
            request_id=s.req.request_id, token_ids=ids, logprobs=lps if s.req.sampling.logprobs else [],
            finish_reason=finish, version=self.version, server=self.name, queue_s=start - s.t_submit,
            gen_s=now - start, version_start=s.version_start if s.start_step >= 0 else self.version))

    # ------------------------------------------------------------------ server loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg, t_next = self.cfg, loop.time()
        while not self._dead and not self._closed:
            if not self._pending and not self._n_active:
                self._wake.clear()
                await self._wake.wait()
                t_next = loop.time()  # a new busy period starts now
                continue
            async with self._lock:
                prefill = 0
                while self._pending and self._n_active < cfg.max_seqs:
                    s = self._pending.popleft()
                    s.start_step, s.t_start, s.version_start = self.steps, loop.time(), self.version
                    prefill += len(s.req.prompt_ids)
                    heapq.heappush(self._heap, (self.steps + s.length, s))
                    self._n_active += 1
                self.max_active_seen = max(self.max_active_seen, self._n_active)
                dur = cfg.step_base_s + cfg.step_per_seq_s * self._n_active + cfg.prefill_per_token_s * prefill
                t_next = max(t_next, loop.time() - 0.05) + dur * cfg.time_scale  # bounded catch-up
                await asyncio.sleep(max(0.0, t_next - loop.time()))
                if self._dead or self._closed:
                    return
                self.steps += 1
                self.busy_time += dur
                self.tokens_in += prefill
                while self._heap and self._heap[0][0] <= self.steps:
                    _, s = heapq.heappop(self._heap)
                    if not s.done:
                        self._n_active -= 1
                        self._resolve(s, s.length, s.finish)

    # ------------------------------------------------------------------ Backend API
    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.check_request(req)
        if self._dead:
            raise BackendError(self.name, "server is dead")
        if self._closed:
            raise BackendError(self.name, "backend is closed")
        if req.request_id in self._by_id:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        loop = asyncio.get_running_loop()
        seed = req.sampling.seed
        if seed is None:
            seed = zlib.crc32(f"{self.cfg.seed}/{req.request_id}".encode())
        s = _Sim(req, loop.create_future(), loop.time(), seed)
        self._counter += 1
        s._order = self._counter
        self._plan(s)
        if s.length == 0:
            raise ValueError(f"request {req.request_id!r}: nothing to generate")
        self._pending.append(s)
        self._by_id[req.request_id] = s
        if self._task is None:
            self._wake, self._lock = asyncio.Event(), asyncio.Lock()
            self._task = loop.create_task(self._run())
        self._wake.set()
        try:
            return await s.future
        except asyncio.CancelledError:
            await self.abort(req.request_id)
            raise

    async def abort(self, request_id: str) -> None:
        s = self._by_id.get(request_id)
        if s is None or s.done:
            return
        if s.start_step < 0:
            self._pending.remove(s)
            self._resolve(s, 0, "abort")
        else:
            self._n_active -= 1  # its heap entry is skipped when popped
            self._resolve(s, min(s.length, self.steps - s.start_step), "abort")

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if self._dead:
            raise BackendError(self.name, "server is dead")
        if not isinstance(weights, (dict, str)):
            raise TypeError(f"weights must be a state dict or a checkpoint dir, got {type(weights).__name__}")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # no decode step runs during the update
            await asyncio.sleep(self.cfg.update_s * self.cfg.time_scale)
            self.version = version

    async def health(self) -> bool:
        return not self._dead and not self._closed

    def kill(self) -> None:
        """Simulate a crashed server: everything in flight and later raises BackendError."""
        self._dead = True
        err = BackendError(self.name, "server died")
        for s in list(self._pending) + [s for _, s in self._heap]:
            s.done = True
            if not s.future.done():
                s.future.set_exception(err)
        self._pending.clear()
        self._heap.clear()
        self._by_id.clear()
        self._n_active = 0
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self._pending) + [s for _, s in self._heap]:
            if not s.done:
                self._resolve(s, max(0, min(s.length, self.steps - s.start_step)) if s.start_step >= 0 else 0,
                              "abort")
        self._pending.clear()
        self._heap.clear()
        if self._task is not None:
            self._wake.set()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def stats(self) -> dict[str, float]:
        """Counters in model units (see the module docstring)."""
        return {"steps": self.steps, "busy_time": self.busy_time, "tokens_out": self.tokens_out,
                "tokens_in": self.tokens_in, "requests_done": self.requests_done,
                "max_active_seen": self.max_active_seen}
