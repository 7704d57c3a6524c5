"""Latency-modelled backend: .venv/bin/python -m pytest -q tests/test_backend_simulated.py"""
from __future__ import annotations

import asyncio
import math
import statistics
import time

import pytest
from waiting import until

from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
from spyglass.engine.backends.simulated import SimulatedBackend, SimulatedConfig

FAST = dict(time_scale=0.001)


def _req(rid: str, n_prompt: int = 10, **sp) -> GenerateRequest:
    return GenerateRequest(rid, list(range(1, n_prompt + 1)), SamplingParams(**sp))


def test_step_time_model_is_exact_in_model_units():
    cfg = SimulatedConfig(lengths="fixed", mean_tokens=50, prefill_per_token_s=1e-4, **FAST)

    async def go():
        async with SimulatedBackend(cfg) as be:
            outs = await asyncio.gather(*(be.generate(_req(f"r{i}", 20)) for i in range(8)))
            return be.stats(), outs
    st, outs = asyncio.run(go())
    assert st["steps"] == 50 and st["tokens_out"] == 400 and st["tokens_in"] == 160
    assert math.isclose(st["busy_time"], 50 * (0.020 + 0.00005 * 8) + 1e-4 * 160)
    assert all(o.finish_reason == "stop" and len(o.token_ids) == 50 and o.token_ids[-1] == 2 for o in outs)


def test_concurrency_cap_and_fifo_admission():
    cfg = SimulatedConfig(lengths="fixed", mean_tokens=10, max_seqs=2, **FAST)

    async def go():
        async with SimulatedBackend(cfg) as be:
            outs = await asyncio.gather(*(be.generate(_req(f"r{i}")) for i in range(5)))
            return be.stats(), outs
    st, outs = asyncio.run(go())
    assert st["max_active_seen"] == 2 and st["steps"] == 30  # 5 requests, 2 at a time, 10 steps each
    assert math.isclose(st["busy_time"], 20 * (0.020 + 2 * 0.00005) + 10 * (0.020 + 0.00005))
    q = [o.queue_s for o in outs]  # admitted in FIFO pairs at steps 0, 10, 20
    assert max(q[:2]) < min(q[2:4]) and max(q[2:4]) < q[4]


def test_late_request_joins_at_a_step_boundary():
    cfg = SimulatedConfig(lengths="fixed", mean_tokens=400, time_scale=0.01)

    async def go():
        async with SimulatedBackend(cfg) as be:
            first = asyncio.ensure_future(be.generate(_req("a")))
            await until(lambda: be.steps >= 10, lambda: f"{be.steps} steps, waited for 10")
            late = await be.generate(_req("b"))
            joined = be.steps - 400  # b ran exactly 400 steps, ending at the last one
            await first
            return be.steps, joined, late
    steps, joined, late = asyncio.run(go())
    assert 10 <= joined < 400 and steps == joined + 400 and len(late.token_ids) == 400


def test_tokens_lengths_and_logprobs_are_deterministic():
    cfg = SimulatedConfig(mean_tokens=100, sigma=0.5, vocab_size=1000, **FAST)

    async def go(extra: int):
        async with SimulatedBackend(cfg) as be:
            reqs = [_req(f"r{i}", max_tokens=4096, stop_token_ids=[7]) for i in range(20)]
            noise = [_req(f"n{i}") for i in range(extra)]
            outs = await asyncio.gather(*(be.generate(r) for r in reqs + noise))
            return outs[:20]
    a, b = asyncio.run(go(0)), asyncio.run(go(30))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert all(o.token_ids[-1] == 7 and all(16 <= t < 1000 for t in o.token_ids[:-1]) for o in a)
    assert all(-4 <= lp < 0 for o in a for lp in o.logprobs)
    assert len({len(o.token_ids) for o in a}) > 5
    be = SimulatedBackend(cfg)
    lengths = []
    for i in range(3000):
        s = type("S", (), {})()
        s.req, s.rng_seed = _req(f"x{i}", max_tokens=10**6), 1000 + i
        be._plan(s)
        lengths.append(s.length)
    assert abs(statistics.mean(lengths) - 100) < 5


def test_forced_ids_max_tokens_and_seed():
    async def go():
        async with SimulatedBackend(SimulatedConfig(mean_tokens=500, **FAST)) as be:
            forced = await be.generate(GenerateRequest("f", [1], SamplingParams(), forced_ids=[9, 8, 7]))
            cut = await be.generate(GenerateRequest("c", [1], SamplingParams(max_tokens=2), forced_ids=[9, 8, 7]))
            capped = await be.generate(_req("m", max_tokens=5))
            s1 = await be.generate(_req("s1", seed=3))
            s2 = await be.generate(_req("s2", seed=3))
            return forced, cut, capped, s1, s2
    forced, cut, capped, s1, s2 = asyncio.run(go())
    assert forced.token_ids == [9, 8, 7] and forced.finish_reason == "stop"
    assert cut.token_ids == [9, 8] and cut.finish_reason == "length"
    assert len(capped.token_ids) == 5 and capped.finish_reason == "length"
    assert s1.token_ids == s2.token_ids


def test_abort_kill_and_weight_versions():
    cfg = SimulatedConfig(lengths="fixed", mean_tokens=1000, max_seqs=1, time_scale=0.01)

    async def go():
        be = SimulatedBackend(cfg)
        run = asyncio.ensure_future(be.generate(_req("run")))
        wait = asyncio.ensure_future(be.generate(_req("wait")))
        await until(lambda: be.steps >= 5, lambda: f"{be.steps} steps, waited for 5")
        await be.update_weights({}, version=3)
        await be.abort("wait")
        await be.abort("run")
        a, b = await run, await wait
        steps_at_abort = be.steps
        doomed = asyncio.ensure_future(be.generate(_req("doomed")))
        await asyncio.sleep(0.01)
        be.kill()
        with pytest.raises(BackendError, match="died"):
            await doomed
        with pytest.raises(BackendError, match="dead") as err:
            await be.generate(_req("later"))
        healthy = await be.health()
        await be.close()
        return a, b, steps_at_abort, err.value, healthy
    a, b, steps, err, healthy = asyncio.run(go())
    assert a.finish_reason == "abort" and 5 <= len(a.token_ids) <= steps and len(a.logprobs) == len(a.token_ids)
    assert a.version == 3 and a.version_start == 0
    assert b.finish_reason == "abort" and b.token_ids == [] and b.version == 3
    assert err.server == "sim-0" and not healthy


def test_time_scale_runs_a_long_workload_fast():
    # 64 requests x 2000 tokens = 2000 steps of ~23 ms: ~46 s modelled, ~0.46 s at time_scale 0.01
    cfg = SimulatedConfig(lengths="fixed", mean_tokens=2000, time_scale=0.01)

    async def go():
        async with SimulatedBackend(cfg) as be:
            t0 = time.perf_counter()
            await asyncio.gather(*(be.generate(_req(f"r{i}", max_tokens=4096)) for i in range(64)))
            return time.perf_counter() - t0, be.busy_time
    wall, busy = asyncio.run(go())
    assert math.isclose(busy, 2000 * (0.020 + 64 * 0.00005))
    assert 0.5 * busy * 0.01 < wall < busy * 0.01 * 4 + 1.0


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="time_scale"):
        SimulatedConfig(time_scale=0)
    with pytest.raises(ValueError, match="'zipf'"):
        SimulatedConfig(lengths="zipf")
    with pytest.raises(ValueError, match="max_seqs"):
        SimulatedConfig(max_seqs=0)
