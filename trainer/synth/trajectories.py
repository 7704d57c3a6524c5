"""Teacher trajectories for synthesized questions: rollouts through the engine, judged, kept.

A teacher is any engine backend (hf with a tiny VLM or a saved model directory; vllm, sglang,
openai, ... by name with their options) driven by a policy: `sample` lets the model act;
`replay` (the offline default) force-decodes the solve script built from the question's hops
(engine/env.solve_script: fix the image, OCR it, search, visit each hop's page, answer), so the
backend still runs real forward passes and the tools really run. Every trajectory is judged by
the accuracy judge (trainer/judges.py, rule or LLM) and optionally the query judge; only those
accepted are kept; the pipeline writes them as Trajectory JSONL (engine/trajectory.py) and in
the SFT format (ShareGPT, trainer/sft.trajectories_to_sharegpt; `spyglass sft` reads both).

    env = build_env(EnvConfig(world_dir=..., dense_search=False))
    kept, stats = asyncio.run(teacher_rollouts(records, env, TeacherConfig(), out_dir,
                                               sharegpt=out_dir / "trajectories.sharegpt.jsonl"))
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from spyglass.engine.scheduler import Engine, EngineConfig, Prompt
from spyglass.engine.trajectory import SegmentKind, Status, Trajectory
from spyglass.trainer.judges import JudgeConfig, JudgeSession, LLMJudgeConfig, run_judge

POLICIES = ("replay", "sample")


@dataclass
class TeacherConfig:
    """Which teacher, how it rolls out, and what is kept."""

    model: str = "tiny:qwen2_vl"  # a checkpoint dir, a hub id in the local HF cache, or tiny:<family> (engine/loader.py)
    backend: str = "hf"  # any kind in engine/backends (hf builds from `model`)
    backend_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "replay"
    n_samples: int = 1
    max_turns: int = 24
    max_tokens_per_turn: int = 1024
    temperature: float = 0.7
    accuracy_judge: str = "rule_accuracy"
    query_judge: str = ""  # "" = not used; else rule_query | llm_query
    min_query_score: float = 0.5
    judge_llm: LLMJudgeConfig | None = None
    keep_per_question: int = 1  # accepted trajectories written per question
    seed: int = 0
    tools: tuple[str, ...] = ()  # the environment's tools; () = all
    prompt_schemas: bool = True  # tool schemas in the system prompt (engine/env.EnvConfig)
    search_top_k: int = 3  # results the solve scripts ask TextSearch / ImageSearch for
    require_grounded: bool = True  # keep only trajectories whose typed arguments came from context
    recite_question: bool = False  # every observation ends with the question (EngineConfig.recite_question)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"TeacherConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        from spyglass.engine.loader import check_model_spec  # noqa: PLC0415
        if self.backend == "hf":
            check_model_spec(self.model, "TeacherConfig.model")
        for k in ("n_samples", "max_turns", "max_tokens_per_turn", "keep_per_question"):
            if getattr(self, k) < 1:
                raise ValueError(f"TeacherConfig.{k} must be >= 1, got {getattr(self, k)!r}")
        if not 0 <= self.min_query_score <= 1:
            raise ValueError(f"TeacherConfig.min_query_score must be in [0, 1], got {self.min_query_score!r}")
        self.judges()  # validates the judge names
        self.tools = tuple(self.tools)
        self.env("")  # validates tools and search_top_k

    def env(self, world: str) -> Any:
        """The EnvConfig teacher rollouts run in (sparse search: reproducible, no MiniLM)."""
        from spyglass.engine.env import ALL_TOOLS, EnvConfig  # noqa: PLC0415
        return EnvConfig(world_dir=world or None, dense_search=False, tools=list(self.tools or ALL_TOOLS),
                         prompt_schemas=self.prompt_schemas, search_top_k=self.search_top_k)

    def judges(self) -> JudgeConfig:
        return JudgeConfig(accuracy=self.accuracy_judge, query=self.query_judge or "rule_query",
                           llm=self.judge_llm)


def build_teacher(cfg: TeacherConfig, servers: int = 1) -> tuple[Any, list[Any]]:
    """(codec, backends) of the teacher."""
    from spyglass.engine.backends import backend_config, make_backend  # noqa: PLC0415
    from spyglass.engine.backends.hf import HFBackend  # noqa: PLC0415
    from spyglass.engine.loader import load_model  # noqa: PLC0415
    vlm = load_model(cfg.model, seed=cfg.seed)
    codec = vlm.codec()
    if cfg.backend == "hf":
        opts = {k: v for k, v in cfg.backend_options.items() if k != "name"}
        return codec, [HFBackend.from_model(vlm, name=f"teacher-{i}", **opts) for i in range(servers)]
    return codec, [make_backend(backend_config(cfg.backend, **{**cfg.backend_options, "name": f"teacher-{i}"}))
                   for i in range(servers)]


def question_prompt(rec: dict[str, Any], root: Path) -> Prompt:
    """An engine prompt for a synthesized question (image from root/rec["image_file"])."""
    with Image.open(root / rec["image_file"]) as im:
        img = im.convert("RGB")
    return Prompt(rec["id"], rec["question"], images=[img],
                  meta={"question": rec["question"], "answer": rec["answer"],
                        "aliases": rec.get("aliases", []), "kind": rec.get("kind", "")})


def replay_scripts(records: list[dict[str, Any]], top_k: int = 3) -> dict[str, list[str]]:
    """The forced-decoding script of each question, from its hops."""
    from spyglass.engine.env import solve_script  # noqa: PLC0415
    return {r["id"]: solve_script(r, top_k) for r in records}


GROUNDED_ARGS = ("query", "url")


def ungrounded(traj: Trajectory, keys: tuple[str, ...] = GROUNDED_ARGS) -> str | None:
    """Why the trajectory is not learnable from its own context, or None: a tool error, or a
    typed argument (`keys`: search queries, URLs) or the answer that appears nowhere in what
    the agent had seen before typing it (the question and earlier observations). A teacher with
    oracle knowledge (a replay of the true path) types the true name where OCR misread it, or a
    page id no search returned; a student cannot learn that step, so it is not kept."""
    seen = [traj.meta.get("question", "")]
    turns = {t.index: t for t in traj.turns}
    for seg in traj.segments:
        if seg.kind is SegmentKind.GEN:
            turn = turns.get(seg.turn)
            if turn is not None and turn.tool_errors:
                return f"tool error at turn {seg.turn}: {turn.tool_errors[0].get('message', '')[:80]}"
            ctx = "".join(seen)
            typed = [json.loads(c["arguments"]).get(k) for c in (turn.calls if turn else []) for k in keys]
            if turn is not None and turn.answered and traj.answer is not None:
                typed.append(traj.answer)
            for v in typed:
                if isinstance(v, str) and v and v not in ctx:
                    return f"turn {seg.turn} types {v[:60]!r}, not in its context"
        else:
            seen.append(seg.text)
    return None


async def judge(traj: Trajectory, cfg: TeacherConfig, session: JudgeSession) -> bool:
    """Score a trajectory into traj.reward; True when it is accepted."""
    if traj.status is not Status.ANSWERED:
        traj.reward.update(acc=0.0, accepted=False, reason=traj.status.value)
        return False
    why = ungrounded(traj) if cfg.require_grounded else None
    if why is not None:
        traj.reward.update(acc=0.0, accepted=False, reason=f"ungrounded: {why}")
        return False
    acc = await run_judge(cfg.accuracy_judge, traj, session)
    traj.reward.update(acc=acc.score, judge={"accuracy": acc.record()})
    ok = acc.score >= 1.0
    if ok and cfg.query_judge:
        q = await run_judge(cfg.query_judge, traj, session)
        traj.reward.update(query=q.score)
        traj.reward["judge"]["query"] = q.record()
        ok = q.score >= cfg.min_query_score
    traj.reward["accepted"] = ok
    return ok


async def teacher_rollouts(records: list[dict[str, Any]], env: Any, cfg: TeacherConfig, root: Path,
                           sharegpt: Path | None = None) -> tuple[list[Trajectory], dict[str, Any]]:
    """Roll every question out with the teacher; returns (accepted trajectories, counts).
    With `sharegpt`, the accepted ones are also written there in the SFT (ShareGPT) format."""
    from spyglass.engine.policy import ReplayPolicy  # noqa: PLC0415
    from spyglass.engine.toolcall import make_turn_parser  # noqa: PLC0415
    codec, backends = build_teacher(cfg)
    policy = ReplayPolicy(codec, replay_scripts(records, env.cfg.search_top_k)) if cfg.policy == "replay" else None
    ecfg = EngineConfig(n_samples=cfg.n_samples, max_turns=cfg.max_turns, max_live=32,
                        max_tokens_per_turn=cfg.max_tokens_per_turn, temperature=cfg.temperature,
                        seed=cfg.seed, recite_question=cfg.recite_question)
    engine = Engine(ecfg, backends, codec, env.runner, make_turn_parser(env.schemas),
                    tool_schemas=env.prompt_tools, policy=policy, image_tokens=codec.image_tokens)
    kept: list[Trajectory] = []
    stats = {"questions": len(records), "trajectories": 0, "answered": 0, "accepted": 0,
             "questions_with_accepted": 0}
    try:
        async with JudgeSession(cfg.judges()) as session:
            async for group in engine.run([question_prompt(r, root) for r in records]):
                ok = [t for t in group if await judge(t, cfg, session)]
                stats["trajectories"] += len(group)
                stats["answered"] += sum(t.status is Status.ANSWERED for t in group)
                stats["accepted"] += len(ok)
                stats["questions_with_accepted"] += bool(ok)
                for t in ok[:cfg.keep_per_question]:
                    t.meta["synth"] = {"policy": cfg.policy, "teacher": cfg.model, "backend": cfg.backend}
                    kept.append(t)
    finally:
        for b in backends:
            await b.close()
    stats["engine"] = {k: v for k, v in engine.stats.summary().items() if k != "status"}
    if sharegpt is not None:
        from spyglass.trainer.sft import trajectories_to_sharegpt  # noqa: PLC0415
        stats["sharegpt"] = trajectories_to_sharegpt(kept, sharegpt, codec, env.prompt_tools)
    return kept, stats

