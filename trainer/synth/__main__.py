"""`python -m spyglass.trainer.synth --world DIR --out DIR [...]`: run the synthesis pipeline.

Every LLM step uses --llm-url/--llm-model (any OpenAI-compatible endpoint) when given, and the
deterministic templates otherwise. Prints the report (also written to OUT/report.json).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from spyglass.engine.env import ALL_TOOLS
from spyglass.engine.tools.llm import LLMConfig

from .graph import GraphConfig
from .paths import PathConfig
from .pipeline import DIFFICULTIES, GROUNDINGS, VIEWS, SynthConfig, run_pipeline
from .questions import RewriteConfig
from .trajectories import POLICIES, TeacherConfig, teacher_rollout


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    ap = argparse.ArgumentParser(prog="python -m spyglass.trainer.synth", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--world", help="world directory (engine/offline/world.py); its docs.jsonl is the graph")
    src.add_argument("--pages", help="pages JSONL (trainer/synth/dump.py); questions only")
    ap.add_argument("--images-dir", default="", help="with --pages: the pages' image files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=24, help="questions wanted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hub-in-degree", type=int, default=10_000)
    ap.add_argument("--clues-per-bridge", type=int, default=1)
    ap.add_argument("--llm-url", default="", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--llm-model", default="")
    ap.add_argument("--llm-key-env", default="", help="env var with the API key ('' = no auth)")
    ap.add_argument("--grounding", choices=GROUNDINGS, default="page")
    ap.add_argument("--grounding-threshold", type=float, default=0.6)
    ap.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS),
                    help="how images may show the anchor: page image, scene board (crop), emblem (image search)")
    ap.add_argument("--degrade-rate", type=float, default=0.1)
    ap.add_argument("--difficulty", choices=DIFFICULTIES, default="none")
    ap.add_argument("--difficulty-max-tokens", type=int, default=256,
                    help="--difficulty engine: tokens per turn of the sampled answers")
    ap.add_argument("--no-trajectories", action="store_true")
    ap.add_argument("--teacher-model", default="tiny:qwen2_vl")
    ap.add_argument("--teacher-backend", default="hf")
    ap.add_argument("--teacher-policy", choices=POLICIES, default="replay")
    ap.add_argument("--samples", type=int, default=1, help="teacher rollouts per question")
    ap.add_argument("--max-tokens-per-turn", type=int, default=1024,
                    help="teacher generation limit per turn")
    ap.add_argument("--query-judge", default="", help="'' | rule_query | llm_query")
    ap.add_argument("--tools", nargs="+", default=[], help="the teacher environment's tools (default: all)")
    ap.add_argument("--no-prompt-schemas", action="store_true",
                    help="teacher prompts without the tool schemas (for a model fine-tuned on the agent format)")
    ap.add_argument("--search-top-k", type=int, default=3, help="results the solve scripts ask searches for")
    a = ap.parse_args(argv)
    llm = None
    if a.llm_url:
        llm = LLMConfig(base_url=a.llm_url, model=a.llm_model or "default", api_key_env=a.llm_key_env or None)
    base = teacher_rollout()
    rollout = teacher_rollout(
        model=a.teacher_model, backend=a.teacher_backend, policy=a.teacher_policy,
        engine=dataclasses.replace(base.engine, n_samples=a.samples, seed=a.seed, max_tokens_per_turn=a.max_tokens_per_turn),
        env=dataclasses.replace(base.env, tools=list(a.tools) or list(ALL_TOOLS), prompt_schemas=not a.no_prompt_schemas,
                                search_top_k=a.search_top_k))
    teacher = TeacherConfig(rollout=rollout, query_judge=a.query_judge)
    return SynthConfig(out=a.out, world=a.world or "", pages=a.pages or "", images_dir=a.images_dir,
                       n_questions=a.n, seed=a.seed, graph=GraphConfig(hub_in_degree=a.hub_in_degree),
                       paths=PathConfig(seed=a.seed),
                       rewrite=RewriteConfig(clues_per_bridge=a.clues_per_bridge, llm=llm, seed=a.seed),
                       grounding=a.grounding, grounding_threshold=a.grounding_threshold, views=tuple(a.views),
                       degrade_rate=a.degrade_rate, difficulty=a.difficulty, difficulty_llm=llm,
                       difficulty_max_tokens=a.difficulty_max_tokens,
                       trajectories=not a.no_trajectories, teacher=teacher)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = asyncio.run(run_pipeline(cfg))
    print(json.dumps(report, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
