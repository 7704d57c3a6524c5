"""The embedded HF backend's two caches: in-place KV growth (decode) and the prefix cache (turns).

1. Decode step, B rows of T context tokens on the tiny student (tiny:qwen2_vl:128x2:64; timings
   do not depend on the weights): a cache rebuilt around the KV every step (the backend before
   in-place growth: a plain DynamicLayer concatenates, copying the whole KV each step) vs the
   backend's growing cache (writes the new column in place). Median ms per step.
2. Held-out evaluation through the engine (`run_eval`, real tools), prefix cache off vs on:
   multi-turn agents resend their whole context every turn; with the cache a turn prefills only
   its new tokens and images. Same answers either way (greedy): the script checks it.
   Default: the bundled world's questions replayed by the tiny model (policy replay: teacher
   forcing, what the synthesis pipeline's teacher does). With --model and --questions (e.g. a
   proof run's SFT model and held-out questions) the model samples (greedy), as in the proof.

    .venv/bin/python benchmarks/bench_hf_backend.py --threads 2
    .venv/bin/python benchmarks/bench_hf_backend.py --threads 2 --model runs/proof/sft/final \\
        --world runs/proof/world --questions runs/proof/synth/held_questions.jsonl --limit 100
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from spyglass.engine.backends.hf import _cache_from, _layers_of
from spyglass.engine.env import EnvConfig
from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.loader import load_model
from spyglass.engine.offline.world import ensure_world
from spyglass.engine.rollout import RolloutConfig
from spyglass.trainer.eval import EvalConfig, run_eval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proof_learning import TOOLS  # noqa: E402  (the proof's tool set: same workload)


def decode_ms(model: torch.nn.Module, b: int, t: int, steps: int, rebuild: bool) -> float:
    """Median ms of a decode step over `steps` steps from a random KV of b rows x t tokens."""
    tc = model.config.get_text_config()
    hd = tc.hidden_size // tc.num_attention_heads
    layers = [(torch.randn(b, tc.num_key_value_heads, t, hd), torch.randn(b, tc.num_key_value_heads, t, hd))
              for _ in range(tc.num_hidden_layers)]
    ids, mask, cache, times = torch.randint(0, 100, (b, 1)), torch.ones(b, t, dtype=torch.long), _cache_from(layers), []
    with torch.inference_mode():
        for i in range(steps + 2):
            t0 = time.perf_counter()
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            if rebuild:
                cache = _cache_from(_layers_of(cache))
            model(input_ids=ids, attention_mask=mask, position_ids=torch.full((3, b, 1), t + i),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def eval_wall(a: argparse.Namespace, world: str, questions: str, cache_tokens: int | None, out: Path) -> dict:
    env = EnvConfig(world_dir=world, tools=list(TOOLS), dense_search=False, prompt_schemas=False, search_top_k=1,
                    questions_file=questions, questions=0 if questions else a.limit)
    rollout = RolloutConfig(model=a.model, policy="sample" if questions else "replay", env=env,
                            backend_options={"prefix_cache_tokens": cache_tokens}, out="", progress=False,
                            engine=EngineConfig(n_samples=1, max_live=64, max_turns=14, max_tokens_per_turn=96,
                                                temperature=0.0))
    cfg = EvalConfig(rollout=rollout, agentic=True, direct_baseline=False, limit=a.limit, out_dir=str(out))
    t0 = time.perf_counter()
    run_eval(cfg)
    wall = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())["modes"]["agentic"]
    rows = [json.loads(x) for x in (out / "agentic.jsonl").read_text().splitlines()]
    answers = {r["id"]: r.get("answer") for r in rows}  # finished in any order
    return {"wall_s": round(wall, 1), "accuracy": rep["average_accuracy"], "n": rep["overall"]["n"],
            "turns": round(rep["overall"]["turns_mean"] * rep["overall"]["n"]), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's setting)")
    ap.add_argument("--model", default="tiny:qwen2_vl:128x2:64")
    ap.add_argument("--world", default="", help="world dir (default: the bundled world)")
    ap.add_argument("--questions", default="", help="questions JSONL (default: the world's own, replayed)")
    ap.add_argument("--limit", type=int, default=48, help="questions evaluated")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per shape")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model).model.eval()
    shapes = [(8, 512), (32, 512), (8, 2048), (32, 2048)]
    dec = {f"{b}x{t}": {"copy": round(decode_ms(model, b, t, a.steps, True), 2),
                        "in_place": round(decode_ms(model, b, t, a.steps, False), 2)} for b, t in shapes}
    print("| rows x context | copy each step (ms) | in place (ms) | speed-up |\n|---|---:|---:|---:|")
    for k, v in dec.items():
        print(f"| {k} | {v['copy']:.2f} | {v['in_place']:.2f} | {v['copy'] / v['in_place']:.1f}x |")
    world = a.world or str(ensure_world().root)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: eval_wall(a, world, a.questions, c, Path(tmp) / name) for name, c in (("off", 0), ("on", None))}
    same = runs["off"]["answers"] == runs["on"]["answers"]
    print(f"\n| prefix cache | wall s | turns | accuracy |\n|---|---:|---:|---:|")
    for k, v in runs.items():
        print(f"| {k} | {v['wall_s']:.1f} | {v['turns']} | {100 * v['accuracy']:.1f}% |")
    print(f"speed-up {runs['off']['wall_s'] / runs['on']['wall_s']:.2f}x; same answers: {same}")
    print(json.dumps({"bench": "hf_backend", "device": device_name(), "commit": git_commit(),
                      "threads": torch.get_num_threads(), "args": vars(a), "decode_ms": dec,
                      "eval": {k: {m: x for m, x in v.items() if m != "answers"} for k, v in runs.items()},
                      "same_answers": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
