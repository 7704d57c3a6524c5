"""Benchmark: what the OpenAI-compatible gateway adds per request over the bare backend.

Workload: C concurrent clients, each running S two-turn sessions (a question with tools; then
the tool result) against a latency-modelled server (engine/backends/simulated.py: fixed-length
replies of T tokens, decode steps of `step_ms`), with the tiny Qwen2 checkpoint's tokenizer and
chat template. "bare" sends the same token prompts straight to the backend (the engine's path);
"gateway" sends OpenAI chat requests over HTTP on loopback to `engine/gateway.py` (JSON, the
template, the session index, the C++ parser, the recording). Reports requests/s and the mean
latency per request of each, and the gateway's added latency; prints a table, then one JSON
line with the device and git commit.

    .venv/bin/python benchmarks/bench_gateway.py [--clients 32] [--sessions 4] [--tokens 32] [--step-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from typing import Any

import aiohttp
from aiohttp import web

from spyglass.engine.backends.base import GenerateRequest, SamplingParams
from spyglass.engine.backends.simulated import SimulatedBackend, SimulatedConfig
from spyglass.engine.gateway import Gateway, ServeConfig, make_app
from spyglass.engine.loader import load_model
from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.scheduler import EngineConfig

TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def backend(codec: Any, a: argparse.Namespace) -> SimulatedBackend:
    return SimulatedBackend(SimulatedConfig(name="sim-0", lengths="fixed", mean_tokens=a.tokens,
                                            step_base_s=a.step_ms / 1000, vocab_size=len(codec.tokenizer),
                                            first_token_id=16, max_seqs=1024))


async def bare(codec: Any, a: argparse.Namespace) -> list[float]:
    """Latency of each request sent straight to the backend (token ids in, token ids out)."""
    be = backend(codec, a)
    sp = SamplingParams(max_tokens=a.tokens + 1, temperature=1.0, stop_token_ids=[10**9 - 1])
    prompt = codec.encode_prompt("What is the tallest building in the photo's city?", [], TOOLS)
    lat: list[float] = []

    async def client(c: int) -> None:
        for s in range(a.sessions):
            ids = list(prompt)
            for turn in range(2):
                t0 = time.perf_counter()
                out = await be.generate(GenerateRequest(f"{c}-{s}-{turn}", ids, sp))
                lat.append(time.perf_counter() - t0)
                ids += out.token_ids + codec.encode_observation("result text", [], closed=False)
    await asyncio.gather(*(client(c) for c in range(a.clients)))
    await be.close()
    return lat


async def gateway(codec: Any, a: argparse.Namespace) -> list[float]:
    """Latency of each OpenAI chat request through the gateway over HTTP (loopback)."""
    gw = Gateway(ServeConfig(out="", max_concurrency=4 * a.clients), EngineConfig(max_tokens_per_turn=a.tokens + 1),
                 codec, [backend(codec, a)])
    runner = web.AppRunner(make_app(gw))
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url, lat = f"http://127.0.0.1:{port}/v1/chat/completions", []

    async def client(c: int, http: aiohttp.ClientSession) -> None:
        for s in range(a.sessions):
            msgs: list[dict[str, Any]] = [{"role": "user", "content": "What is the tallest building in the photo's city?"}]
            for turn in range(2):
                t0 = time.perf_counter()
                async with http.post(url, json={"model": "policy", "messages": msgs, "tools": TOOLS, "temperature": 1.0,
                                                "session_id": f"{c}-{s}"}) as r:
                    body = await r.json()
                lat.append(time.perf_counter() - t0)
                if r.status != 200:
                    raise RuntimeError(f"gateway answered {r.status}: {body}")
                msgs += [body["choices"][0]["message"], {"role": "user", "content": "result text"}]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(client(c, http) for c in range(a.clients)))
    await runner.cleanup()
    return lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=4, help="two-turn sessions per client")
    ap.add_argument("--tokens", type=int, default=32, help="reply length (tokens)")
    ap.add_argument("--step-ms", type=float, default=20.0, help="the simulated server's decode step")
    a = ap.parse_args(argv)
    codec = load_model("tiny:qwen2").codec()
    rows = {}
    for name, fn in (("bare", bare), ("gateway", gateway)):
        t0 = time.perf_counter()
        lat = asyncio.run(fn(codec, a))
        wall = time.perf_counter() - t0
        rows[name] = {"requests": len(lat), "wall_s": wall, "requests_per_s": len(lat) / wall,
                      "latency_ms_mean": 1000 * statistics.fmean(lat), "latency_ms_p99": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))]}
    added = rows["gateway"]["latency_ms_mean"] - rows["bare"]["latency_ms_mean"]
    print(f"gateway vs bare backend: {a.clients} clients x {a.sessions} two-turn sessions, replies of {a.tokens} "
          f"tokens, {a.step_ms:g} ms decode steps (simulated server)")
    print(f"{'path':<10}{'requests':>10}{'req/s':>9}{'mean ms':>10}{'p99 ms':>9}")
    for name, r in rows.items():
        print(f"{name:<10}{r['requests']:>10}{r['requests_per_s']:>9.1f}{r['latency_ms_mean']:>10.1f}{r['latency_ms_p99']:>9.1f}")
    print(f"added latency per request: {added:.1f} ms")
    print(json.dumps({"bench": "gateway", "device": device_name(), "commit": git_commit(), "args": vars(a),
                      "added_latency_ms": added, **{f"{n}_{k}": v for n, r in rows.items() for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
