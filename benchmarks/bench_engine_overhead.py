"""Engine overhead: engine CPU per turn and event-loop lag with many concurrent trajectories.

A zero-latency backend (it returns its forced tokens at once) and zero-latency tools leave only
the engine's own work: admission, launch, parse, observation tokens, bookkeeping. CPU time is
the process's CPU over the run divided by the turns executed; event-loop lag is the overshoot
of a 1 ms heartbeat on the same loop (p50/p99/max). Targets (DESIGN.md): <= 50 us per turn,
10,000 concurrent trajectories, p99 lag < 10 ms.

    python benchmarks/bench_engine_overhead.py --live 10000 --prompts 20000 --turns 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from spyglass.engine.backends.base import Backend, GenerateOutput, GenerateRequest
from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.chat import ByteCodec
from spyglass.engine.policy import ReplayPolicy, script_turns
from spyglass.engine.scheduler import Engine, EngineConfig, ParsedTurn, Prompt, ToolOutcome


class ZeroLatency(Backend):
    """Answers every request at once with its forced tokens (after one loop turn)."""

    name, supports_forced = "zero", True

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        await asyncio.sleep(0)
        ids = req.forced_ids or [0]
        return GenerateOutput(req.request_id, ids, [0.0] * len(ids), "stop", self.version, self.name)

    async def abort(self, request_id: str) -> None: ...
    async def update_weights(self, weights, version: int) -> None: self.version = version
    async def health(self) -> bool: return True
    async def close(self) -> None: ...


async def zero_tools(calls, traj):
    return [ToolOutcome("ok") for _ in calls]


def make_parser():
    """The production parser when the C++ core has it, else a minimal split parser."""
    try:
        from spyglass.engine.toolcall import make_turn_parser  # noqa: PLC0415
        return make_turn_parser([{"name": "search", "parameters": {"type": "object"}}]), "cpp"
    except ImportError:
        def parse(text: str) -> ParsedTurn:
            if "<answer>" in text:
                return ParsedTurn([], [], text.split("<answer>")[1].split("</answer>")[0])
            body = text.split("<tool_call>")[1].split("</tool_call>")[0]
            return ParsedTurn([{"name": "search", "arguments": body}], [], None)
        return parse, "split (no C++ parser yet)"


async def run(args) -> dict:
    codec = ByteCodec()
    scripts = {f"p{i}": script_turns([("search", {"q": f"q{i}-{k}"}) for k in range(args.turns - 1)], "a")
               for i in range(args.prompts)}
    parser, parser_name = make_parser()
    cfg = EngineConfig(n_samples=1, max_live=args.live, max_inflight_per_server=args.live,
                       max_turns=args.turns + 1)
    engine = Engine(cfg, [ZeroLatency()], codec, zero_tools, parser, policy=ReplayPolicy(codec, scripts))
    lags: list[float] = []
    stop = False

    async def heartbeat():
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    hb = asyncio.ensure_future(heartbeat())
    prompts = [Prompt(f"p{i}", "question") for i in range(args.prompts)]
    for p in prompts[: min(200, len(prompts))]:  # warm the policy's token cache like a real run
        pass
    c0, w0 = time.process_time(), time.perf_counter()
    n = 0
    async for g in engine.run(prompts):
        n += len(g)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stop = True
    await hb
    turns = engine.stats.turns
    lags.sort()
    return {"trajectories": n, "turns": turns, "live": args.live, "parser": parser_name,
            "cpu_us_per_turn": cpu / turns * 1e6, "wall_s": wall,
            "lag_p50_ms": statistics.median(lags) * 1e3,
            "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3, "lag_max_ms": lags[-1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=int, default=10000)
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--turns", type=int, default=4)
    args = ap.parse_args()
    r = asyncio.run(run(args))
    print(f"{'metric':<22}{'value':>12}   target")
    print(f"{'live trajectories':<22}{r['live']:>12}   10000")
    print(f"{'turns executed':<22}{r['turns']:>12}")
    print(f"{'engine CPU us/turn':<22}{r['cpu_us_per_turn']:>12.1f}   <= 50")
    print(f"{'loop lag p50 ms':<22}{r['lag_p50_ms']:>12.2f}")
    print(f"{'loop lag p99 ms':<22}{r['lag_p99_ms']:>12.2f}   < 10")
    print(f"{'loop lag max ms':<22}{r['lag_max_ms']:>12.2f}")
    print(f"(parser: {r['parser']}; one core: the engine is single-threaded asyncio)")
    commit = git_commit()
    print(json.dumps({"bench": "engine_overhead", "device": device_name(),
                      "commit": commit, **r}))


if __name__ == "__main__":
    main()
