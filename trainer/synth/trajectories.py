"""Teacher trajectories for synthesized questions: rollouts through the engine, judged, kept.

A teacher is a RolloutConfig (`TeacherConfig.rollout`: any checkpoint the loader takes on the hf
backend, or vllm, sglang, openai, ... by name with their options) driven by a policy: `sample` lets the model act;
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

from spyglass.engine.env import EnvConfig
from spyglass.engine.rollout import RolloutConfig
from spyglass.engine.scheduler import EngineConfig, Prompt
from spyglass.engine.trajectory import SegmentKind, Status, Trajectory
from spyglass.trainer.judges import JudgeConfig, JudgeSession, LLMJudgeConfig, run_judge

POLICIES = ("replay", "sample")


def teacher_rollout(**kw: Any) -> RolloutConfig:
    """The teacher's RolloutConfig: the replay policy, one sample per question, up to 24 turns of
    1,024 tokens at temperature 0.7, sparse search (reproducible, no MiniLM); `kw` override."""
    engine = EngineConfig(n_samples=1, max_live=32, max_turns=24, max_tokens_per_turn=1024, temperature=0.7)
    return RolloutConfig(**{"engine": engine, "env": EnvConfig(dense_search=False), "policy": "replay", "out": "",
                            "resume": False, "progress": False, **kw})


@dataclass
class TeacherConfig:
    """Which teacher, how it rolls out (a RolloutConfig: model, backend, policy replay | sample,
    engine limits, env tools), and what is kept."""

    rollout: RolloutConfig = field(default_factory=teacher_rollout)  # the teacher's rollout (engine/rollout.py RolloutConfig)
    accuracy_judge: str = "rule_accuracy"  # judge of the answer (trainer/judges.py)
    query_judge: str = ""  # "" = not used; else rule_query | llm_query
    min_query_score: float = 0.5  # with a query judge: the score a kept trajectory needs
    judge_llm: LLMJudgeConfig | None = None  # the LLM judge's endpoint (llm_* judges)
    keep_per_question: int = 1  # accepted trajectories written per question
    require_grounded: bool = True  # keep only trajectories whose typed arguments came from context

    def __post_init__(self) -> None:
        if not isinstance(self.rollout, RolloutConfig):
            raise TypeError(f"TeacherConfig.rollout must be a RolloutConfig, got {type(self.rollout).__name__}")
        if self.rollout.policy not in POLICIES:
            raise ValueError(f"TeacherConfig.rollout.policy must be one of {POLICIES}, got {self.rollout.policy!r}")
        if self.keep_per_question < 1:
            raise ValueError(f"TeacherConfig.keep_per_question must be >= 1, got {self.keep_per_question!r}")
        if not 0 <= self.min_query_score <= 1:
            raise ValueError(f"TeacherConfig.min_query_score must be in [0, 1], got {self.min_query_score!r}")
        self.judges()  # validates the judge names

    def env(self, world: str) -> EnvConfig:
        """The EnvConfig teacher rollouts run in: the rollout's, over `world`."""
        import dataclasses  # noqa: PLC0415
        return dataclasses.replace(self.rollout.env, world_dir=world or None)

    def judges(self) -> JudgeConfig:
        return JudgeConfig(accuracy=self.accuracy_judge, query=self.query_judge or "rule_query",
                           llm=self.judge_llm)


def build_teacher(cfg: TeacherConfig, servers: int = 1) -> tuple[Any, list[Any]]:
    """(codec, backends) of the teacher (engine/rollout.py's model loading and backends)."""
    import dataclasses  # noqa: PLC0415

    from spyglass.engine.rollout import _model_and_codec, make_backends  # noqa: PLC0415
    rcfg = dataclasses.replace(cfg.rollout, servers=servers)
    loaded, codec = _model_and_codec(rcfg)
    return codec, make_backends(rcfg, loaded, prefix="teacher")


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
    """Why the trajectory is not learnable from its own context, or None: a tool error other
    than a transient one, or a typed argument (`keys`: search queries, URLs) or the answer that
    appears nowhere in what the agent had seen before typing it (the question and earlier
    observations). A teacher with oracle knowledge (a replay of the true path) types the true
    name where OCR misread it, or a page id no search returned; a student cannot learn that
    step, so it is not kept. A turn whose errors are all transient is kept: the call was right,
    the world failed (engine/faults.py), and the next turn retries it."""
    seen = [traj.meta.get("question", "")]
    turns = {t.index: t for t in traj.turns}
    for seg in traj.segments:
        if seg.kind is SegmentKind.GEN:
            turn = turns.get(seg.turn)
            bad = [e for e in turn.tool_errors if e.get("kind") != "transient"] if turn is not None else []
            if bad:
                return f"tool error at turn {seg.turn}: {bad[0].get('message', '')[:80]}"
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
    from spyglass.engine.rollout import build_engine  # noqa: PLC0415
    prompts = [question_prompt(r, root) for r in records]
    engine, backends, _ = build_engine(cfg.rollout, env, scripts=replay_scripts(records, env.cfg.search_top_k),
                                       prompts=prompts)
    kept: list[Trajectory] = []
    stats = {"questions": len(records), "trajectories": 0, "answered": 0, "accepted": 0,
             "questions_with_accepted": 0}
    try:
        async with JudgeSession(cfg.judges()) as session:
            async for group in engine.run(prompts):
                ok = [t for t in group if await judge(t, cfg, session)]
                stats["trajectories"] += len(group)
                stats["answered"] += sum(t.status is Status.ANSWERED for t in group)
                stats["accepted"] += len(ok)
                stats["questions_with_accepted"] += bool(ok)
                for t in ok[:cfg.keep_per_question]:
                    t.meta["synth"] = {"policy": cfg.rollout.policy, "teacher": cfg.rollout.model,
                                       "backend": cfg.rollout.backend}
                    kept.append(t)
    finally:
        for b in backends:
            await b.close()
    stats["engine"] = {k: v for k, v in engine.stats.summary().items() if k != "status"}
    if sharegpt is not None:
        from spyglass.trainer.sft import trajectories_to_sharegpt  # noqa: PLC0415
        stats["sharegpt"] = trajectories_to_sharegpt(kept, sharegpt, engine.codec, env.prompt_tools)
    return kept, stats

