"""The end-to-end proof that training works, on CPU: synthesize -> SFT -> GRPO -> ablation.

Every stage is the product's own entry point, called as a library; nothing here is a second
implementation. On the bundled offline world (engine/offline/world.py):

  1. world      generate the world (seeded)
  2. synth      the synthesis pipeline (trainer/synth): paths, grounding, template questions,
                the degradation subset, teacher trajectories (replay of the solve script through
                the engine, real tools), kept when the judge accepts the answer and the
                trajectory is grounded (every query / URL it types was in its context)
  3. split      questions split by image (an image's every question on one side); held-out
                questions are never trained on, not by SFT, not by GRPO
  4. warmup     copy + recall warm-up of the tiny Qwen2-VL (random init; trainer/warmup.py): without it
                the SFT model learns the protocol but cannot copy unseen names
  5. sft        SFT from the warmed model on the training trajectories (+ the optional copy
                curriculum, trainer/synth/curriculum.py)
  6. sft-direct the no-tool baseline: the same warmed model, steps and seed, fine-tuned to answer
                the training questions directly (image + question -> answer, no tools)
  7. grpo-<arm> GRPO from the SFT model on the training questions, one run per arm of the RL
                ablation (vanilla | fatal_mask | fatal_mask_clamp), same seeds
  8. eval       held-out accuracy (rule judge, greedy decoding) of: the no-tool baseline,
                the SFT model (with tools, and direct), every GRPO arm (with tools)

Stages are cached under --out (a finished stage is skipped on a rerun, so a crashed run
resumes); prints a table, the SFT model against the no-tool baseline and each GRPO arm against
the SFT model question by question (gained, lost, the exact sign test's p: run-to-run noise is as
large as the effects), and one final JSON line. Figures: benchmarks/README.md.

    .venv/bin/python benchmarks/proof_learning.py --out runs/proof            # ~1 h on 2 cores (stage times: benchmarks/README.md)
    .venv/bin/python benchmarks/proof_learning.py --out /tmp/p --n-questions 40 --warmup-steps 2 \\
        --sft-steps 4 --grpo-steps 1 --arms fatal_mask_clamp                  # a smoke run
    .venv/bin/python benchmarks/proof_learning.py --out runs/recite --recite-question   # the question
        # recited at the end of every observation (data, GRPO, evals): the strongest SFT lift measured
    .venv/bin/python benchmarks/proof_learning.py --out runs/proof --grpo-sft-coef 1.0  # GRPO steps
        # anchored by the SFT data's NLL (PPO-ptx): keeps the tool-call format at lr up to 1e-3
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from spyglass.engine.env import EnvConfig
from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.rollout import RolloutConfig
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.chat import pixel_inputs
from spyglass.engine.loader import load_model
from spyglass.engine.offline.tiny import parse_tiny_spec
from spyglass.engine.trajectory import SegmentKind, iter_jsonl, write_jsonl
from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.kernels.policy_loss import PolicyLossConfig
from spyglass.trainer.algorithm import FILTERS, MODES, AlgoConfig
from spyglass.trainer.eval import DIRECT_SYSTEM, EvalConfig, run_eval
from spyglass.trainer.grpo import GRPOConfig, run_grpo
from spyglass.trainer.reward import RewardConfig
from spyglass.trainer.sft import SFTConfig, SFTDataConfig, run_sft
from spyglass.trainer.synth.paths import PathConfig
from spyglass.trainer.synth.pipeline import SynthConfig, run_pipeline
from spyglass.trainer.synth.trajectories import TeacherConfig, teacher_rollout
from spyglass.trainer.update import UpdateConfig
from spyglass.trainer.warmup import WarmupConfig, run_warmup

TOOLS = ["Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect", "OCR", "ImageSearch", "TextSearch", "Visit"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--world-scale", type=int, default=4, help="world size as a multiple of the default world")
    ap.add_argument("--n-questions", type=int, default=1600)
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2], help="path lengths (the pipeline's default: 2 3 4)")
    ap.add_argument("--hop-probs", type=float, nargs="+", default=[0.5, 0.5], help="(the pipeline's: 0.4 0.4 0.2)")
    ap.add_argument("--held-frac", type=float, default=0.2, help="fraction of images held out")
    ap.add_argument("--model", default="tiny:qwen2_vl:128x2:64",
                    help="the student, random init (hidden x layers : image tokens)")
    ap.add_argument("--teacher-model", default="",
                    help="the teacher's model (it only replays the solve scripts, so its size only costs time; "
                         "default: the student's family and image tokens at 32x1, the same tokens)")
    ap.add_argument("--copy-curriculum", type=int, default=0,
                    help="text-only copy records (trainer/synth/curriculum.py) mixed into the SFT data")
    ap.add_argument("--warmup-steps", type=int, default=2000,
                    help="copy warm-up steps before SFT (trainer/warmup.py; 0: none): the student and the "
                         "no-tool baseline both start from the warmed model")
    ap.add_argument("--sft-steps", type=int, default=1200)
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--arms", nargs="+", default=["vanilla", "fatal_mask", "fatal_mask_clamp"], choices=MODES)
    ap.add_argument("--grpo-steps", type=int, default=32,
                    help="GRPO steps per arm (at 16 the arms did not differ; at 32 vanilla fell in two of three runs)")
    ap.add_argument("--grpo-groups", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--grpo-samples", type=int, default=4, help="samples per prompt (group size)")
    ap.add_argument("--grpo-lr", type=float, default=2e-4)
    ap.add_argument("--grpo-warmup", type=int, default=0, help="GRPO lr warm-up, in updates (UpdateConfig.warmup_steps)")
    ap.add_argument("--grpo-adam-eps", type=float, default=1e-8, help="GRPO's AdamW eps (UpdateConfig.eps)")
    ap.add_argument("--grpo-freeze-vision", action="store_true", help="no GRPO updates to the vision tower")
    ap.add_argument("--grpo-epochs", type=int, default=1, help="passes over each GRPO batch (PPO epochs)")
    ap.add_argument("--grpo-kl", type=float, default=0.0, help="k3 KL coefficient to the SFT model (0: none)")
    ap.add_argument("--grpo-alpha", type=float, default=0.8,
                    help="reward r = r_fmt * (alpha * r_acc + (1 - alpha) * r_query) (the paper's 0.8; offline the "
                         "query judge is the rule heuristic, trainer/judges.py)")
    ap.add_argument("--grpo-estimator", default="grpo", choices=["grpo", "rloo", "drgrpo"],
                    help="group advantage estimator (grpo: (r - mean) / std, the paper's)")
    ap.add_argument("--grpo-replay", type=int, default=0,
                    help="samples per GRPO group that replay the teacher's solve script (policy 'mixed'; 0: 'sample')")
    ap.add_argument("--grpo-filter", default="none", choices=FILTERS,
                    help="drop groups flat in this score from each update (AlgoConfig.filter_groups)")
    ap.add_argument("--grpo-neg-scale", type=float, default=1.0,
                    help="weight of negative advantages (AlgoConfig.neg_scale; 1: GRPO, 0: positive only)")
    ap.add_argument("--grpo-sft-coef", type=float, default=0.0,
                    help="weight of the SFT data's NLL added to each GRPO step (UpdateConfig.sft_coef, "
                         "PPO-ptx; 0: none)")
    ap.add_argument("--grpo-sft-batch", type=int, default=4, help="SFT trajectories in that term per step")
    ap.add_argument("--temperature", type=float, default=0.7, help="GRPO sampling temperature")
    ap.add_argument("--recite-question", action="store_true",
                    help="every observation ends with the question (EngineConfig.recite_question), in the "
                         "teacher's data, GRPO's rollouts and the evals")
    ap.add_argument("--max-turns", type=int, default=14)
    ap.add_argument("--max-tokens-per-turn", type=int, default=96)
    ap.add_argument("--stop-after", choices=["data", "sft"], help="run the stages up to this one, then stop")
    return ap.parse_args(argv)


COPY = re.compile(r'"(?:query|url|goal)": "([^"]*)"|<answer>(.*?)</answer>', re.S)


def teacher_forced(model_dir: Path, trajectories: Path, ids: set[str], n: int = 40) -> dict[str, float]:
    """Greedy next-token accuracy of a model on up to `n` teacher trajectories of the questions
    `ids`: over every generated token, and over the 'copy' tokens (inside a query, URL or answer
    value: strings the agent has to copy from what it has seen), and the fraction of those
    copies whose every token is right (what greedy decoding needs). Says what SFT learned when
    the held-out answer accuracy is zero."""
    vlm = load_model(str(model_dir))
    model, tok = vlm.model, vlm.tokenizer
    trajs = [t for t in iter_jsonl(trajectories) if t.group_id in ids][:n]
    hits = {"gen": [0, 0], "copy": [0, 0], "span": [0, 0]}
    for t in trajs:
        ids_t = torch.tensor([t.token_ids()])                                          # [1, L]
        mask = torch.ones_like(ids_t)
        kw = pixel_inputs(vlm.image_processor, t.images())
        mm = (ids_t == model.config.image_token_id).int()  # the model derives M-RoPE positions itself
        with torch.no_grad():
            pred = model(input_ids=ids_t, attention_mask=mask, mm_token_type_ids=mm,
                         **kw).logits[0].argmax(-1).tolist()                          # [L]
        at = len(t.prompt_ids)
        for seg in t.segments:
            toks = list(seg.token_ids)
            if seg.kind is SegmentKind.GEN:
                starts = [len(tok.decode(toks[:i])) for i in range(len(toks))]      # char offset of each token
                spans = [m.span(1) if m.group(1) is not None else m.span(2) for m in COPY.finditer(tok.decode(toks))]
                span_ok = [True] * len(spans)
                for i, tid in enumerate(toks):
                    ok = pred[at + i - 1] == tid
                    hits["gen"][0] += ok
                    hits["gen"][1] += 1
                    inside = [j for j, (a, b) in enumerate(spans) if a <= starts[i] < b]
                    if inside:
                        hits["copy"][0] += ok
                        hits["copy"][1] += 1
                    for j in inside:
                        span_ok[j] &= ok
                hits["span"][0] += sum(span_ok)
                hits["span"][1] += len(spans)
            at += len(toks)
    return {"trajectories": len(trajs), "gen_token_acc": hits["gen"][0] / max(1, hits["gen"][1]),
            "copy_token_acc": hits["copy"][0] / max(1, hits["copy"][1]), "copy_tokens": hits["copy"][1],
            "copy_exact": hits["span"][0] / max(1, hits["span"][1]), "copies": hits["span"][1]}


def paired(base: Path, other: Path) -> dict[str, float]:
    """Two evals of the same held-out questions (their judged trajectories: an eval's
    agentic.jsonl or direct.jsonl), paired per question: `gained` (right only in `other`), `lost`
    (right only in `base`) and the exact two-sided sign test's p-value on those discordant pairs
    (McNemar's exact test): is `other` different?"""
    def right(f: Path) -> dict[str, bool]:
        return {t.meta["item_id"]: t.reward.get("acc", 0.0) > 0.5 for t in iter_jsonl(f)}
    a, b = right(base), right(other)
    if a.keys() != b.keys():
        raise ValueError(f"{base} and {other} judged different questions "
                         f"(only in the first: {sorted(a.keys() - b.keys())[:5]}, "
                         f"only in the second: {sorted(b.keys() - a.keys())[:5]})")
    gained = sum(b[q] and not a[q] for q in a)
    lost = sum(a[q] and not b[q] for q in a)
    n = gained + lost
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0
    return {"gained": gained, "lost": lost, "p": round(p, 4)}


def teacher_spec(student: str) -> str:
    """The smallest tiny model with the student's tokens: same family, same image-token cap."""
    if not student.startswith("tiny:"):
        raise ValueError(f"--teacher-model is needed when --model is not a tiny spec, got {student!r}")
    family, _, _, image_tokens = parse_tiny_spec(student)
    return f"tiny:{family}:32x1:{image_tokens}"


class Proof:
    """The stages, their cache and the timings."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.world, self.synth = self.out / "world", self.out / "synth"
        self.timings: dict[str, float] = {}

    def stage(self, name: str, done: Path, fn: Any) -> None:
        """Run `fn` unless `done` exists (a finished stage writes it last)."""
        if done.exists():
            print(f"[proof] {name}: cached ({done})", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[proof] {name} ...", flush=True)
        fn()
        self.timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[proof] {name}: {self.timings[name]} s", flush=True)

    def env(self, questions: str) -> EnvConfig:
        return EnvConfig(world_dir=str(self.world), tools=list(TOOLS), dense_search=False,
                         prompt_schemas=False, search_top_k=1, questions_file=str(questions))

    def engine(self, n: int, temperature: float) -> EngineConfig:
        return EngineConfig(n_samples=n, max_live=64, max_turns=self.a.max_turns,
                            max_tokens_per_turn=self.a.max_tokens_per_turn, temperature=temperature,
                            seed=self.a.seed, recite_question=self.a.recite_question)

    # ------------------------------------------------------------------------------ stages
    def make_data(self) -> None:
        a = self.a
        k = a.world_scale
        world = WorldConfig(seed=a.seed, n_people=90 * k, n_places=60 * k, n_orgs=60 * k, n_products=50 * k,
                            n_events=40 * k, n_sign_images=48 * k, n_scenes=8 * k, n_emblem_queries=10 * k)
        self.stage("world", self.world / "manifest.json", lambda: generate_world(self.world, world))
        base = teacher_rollout()
        teacher = TeacherConfig(rollout=teacher_rollout(
            model=a.teacher_model or teacher_spec(a.model),
            engine=dataclasses.replace(base.engine, seed=a.seed, recite_question=a.recite_question),
            env=dataclasses.replace(base.env, tools=list(TOOLS), prompt_schemas=False, search_top_k=1)))
        paths = PathConfig(hop_lengths=tuple(a.hops), hop_probs=tuple(a.hop_probs), seed=a.seed)
        cfg = SynthConfig(out=str(self.synth), world=str(self.world), n_questions=a.n_questions,
                          seed=a.seed, paths=paths, teacher=teacher)
        self.stage("synth", self.synth / "report.json", lambda: asyncio.run(run_pipeline(cfg)))
        self.stage("split", self.synth / "split.json", self.split)
        if a.copy_curriculum:
            self.stage("copy curriculum", self.out / "sft_data.jsonl", self.mix_copy_curriculum)

    def sft_data(self) -> Path:
        """The SFT stage's data: the training trajectories, plus the copy curriculum if asked."""
        return self.out / "sft_data.jsonl" if self.a.copy_curriculum else self.synth / "train_trajectories.jsonl"

    def mix_copy_curriculum(self) -> None:
        from spyglass.engine.chat import HFCodec
        from spyglass.trainer.sft import load_sharegpt
        from spyglass.trainer.synth.curriculum import write_copy_curriculum
        path = write_copy_curriculum(self.out / "copy.sharegpt.jsonl", self.a.copy_curriculum, seed=self.a.seed + 1)
        copies = load_sharegpt(path, HFCodec.from_model(load_model(self.a.model)))
        mix = list(iter_jsonl(self.synth / "train_trajectories.jsonl")) + copies
        random.Random(self.a.seed).shuffle(mix)
        write_jsonl(self.out / "sft_data.jsonl.part", mix, append=False)
        (self.out / "sft_data.jsonl.part").rename(self.out / "sft_data.jsonl")

    def split(self) -> None:
        qs = [json.loads(x) for x in (self.synth / "questions.jsonl").read_text().splitlines() if x.strip()]
        images = sorted({q["image"] for q in qs})
        random.Random(self.a.seed).shuffle(images)
        held = set(images[: max(1, round(len(images) * self.a.held_frac))])
        sides = {"train": [q for q in qs if q["image"] not in held], "held": [q for q in qs if q["image"] in held]}
        for side, rows in sides.items():
            (self.synth / f"{side}_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
        train_ids = {q["id"] for q in sides["train"]}
        # by id, not in the order the teacher's rollouts finished (which varies with timing): the
        # SFT data order, and so the SFT model, must not change from run to run
        trajs = sorted((t for t in iter_jsonl(self.synth / "trajectories.jsonl") if t.group_id in train_ids),
                       key=lambda t: t.id)
        write_jsonl(self.synth / "train_trajectories.jsonl", trajs, append=False)
        with open(self.synth / "train_direct.sharegpt.jsonl", "w", encoding="utf-8") as f:
            for q in sides["train"]:  # the no-tool baseline's data: image + question -> answer
                f.write(json.dumps({"id": q["id"], "system": DIRECT_SYSTEM, "tools": "[]",
                                    "images": [q["image_file"]],
                                    "conversations": [{"from": "human", "value": "<image>" + q["question"]},
                                                      {"from": "gpt", "value": f"<answer>{q['answer']}</answer>"}]})
                        + "\n")
        info = {"images": len(images), "held_images": len(held), "train_questions": len(sides["train"]),
                "held_questions": len(sides["held"]), "train_trajectories": len(trajs)}
        (self.synth / "split.json").write_text(json.dumps(info, indent=1) + "\n")

    def warmup(self) -> str:
        """The SFT runs' starting model: the student spec, or the copy-warmed student."""
        a, d = self.a, self.out / "warmup"
        if not a.warmup_steps:
            return a.model
        cfg = WarmupConfig(model=a.model, out=str(d), steps=a.warmup_steps, seed=a.seed)
        self.stage("warmup", d / "warmup.jsonl", lambda: run_warmup(cfg))
        return str(d)

    def sft(self, name: str, data: Path) -> Path:
        a, d = self.a, self.out / name
        cfg = SFTConfig(model=self.warmup(), out_dir=str(d), data=SFTDataConfig(path=str(data)), steps=a.sft_steps,
                        batch_size=a.sft_batch, lr=a.sft_lr, seed=a.seed,
                        save_every=max(1, a.sft_steps // 5))  # a crashed SFT resumes from its last checkpoint
        self.stage(name, d / "final" / "config.json", lambda: run_sft(cfg))  # final/ appears whole (loader.save_model)
        return d / "final"

    def grpo(self, arm: str, init: Path) -> Path:
        a, d = self.a, self.out / f"grpo-{arm}"
        rollout = RolloutConfig(engine=dataclasses.replace(self.engine(a.grpo_samples, a.temperature),
                                                           groups_per_step=a.grpo_groups),
                                env=self.env(self.synth / "train_questions.jsonl"), model=str(init),
                                policy="mixed" if a.grpo_replay else "sample", out=str(d / "rollouts.jsonl"),
                                progress=False)
        algo = AlgoConfig(mode=arm, estimator=a.grpo_estimator, filter_groups=a.grpo_filter, neg_scale=a.grpo_neg_scale)
        cfg = GRPOConfig(rollout=rollout, algo=algo,
                         reward=RewardConfig(alpha=a.grpo_alpha),
                         update=UpdateConfig(lr=a.grpo_lr, temperature=a.temperature, ppo_epochs=a.grpo_epochs,
                                             warmup_steps=a.grpo_warmup, eps=a.grpo_adam_eps,
                                             freeze_vision=a.grpo_freeze_vision,
                                             loss=PolicyLossConfig(kl_coef=a.grpo_kl), sft_coef=a.grpo_sft_coef),
                         sft_data=str(self.sft_data()) if a.grpo_sft_coef > 0 else "", sft_batch=a.grpo_sft_batch,
                         replay_per_group=a.grpo_replay, steps=a.grpo_steps, ckpt_dir=str(d / "ckpt"),
                         log_dir=str(d), export_dir=str(d / "final"), seed=a.seed)
        self.stage(f"grpo-{arm}", d / "final" / "config.json", lambda: run_grpo(cfg))
        return d / "final"

    def evaluate(self, name: str, model: Path, direct: bool, agentic: bool = True) -> dict[str, Any]:
        d = self.out / "eval" / name
        held = self.synth / "held_questions.jsonl"
        rollout = RolloutConfig(model=str(model), policy="sample", engine=self.engine(1, 0.0), env=self.env(held),
                                out="", progress=False)
        cfg = EvalConfig(rollout=rollout, agentic=agentic, direct_baseline=direct, direct_max_tokens=self.a.max_tokens_per_turn,
                         out_dir=str(d))
        self.stage(f"eval {name}", d / "report.json", lambda: run_eval(cfg))
        rep = json.loads((d / "report.json").read_text())
        return {mode: {"accuracy": m["average_accuracy"], "n": m["overall"]["n"],
                       "answered": m["overall"]["answered_rate"], "calls_per_traj": m["overall"]["tool_calls_per_traj"],
                       "fatal_rate": m["overall"]["fatal_rate"], "wall_s": m["wall_s"]}
                for mode, m in rep["modes"].items()}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    p, t0 = Proof(a), time.perf_counter()
    p.make_data()
    if a.stop_after == "data":
        return 0
    sft = p.sft("sft", p.sft_data())
    sft_direct = p.sft("sft-direct", p.synth / "train_direct.sharegpt.jsonl")
    if a.stop_after == "sft":
        return 0
    rows: dict[str, dict[str, Any]] = {}
    rows["no-tool SFT (direct)"] = p.evaluate("sft-direct", sft_direct, direct=True, agentic=False)["direct"]
    r = p.evaluate("sft", sft, direct=True)
    rows["SFT (direct, tools off)"], rows["SFT (with tools)"] = r["direct"], r["agentic"]
    for arm in a.arms:
        rows[f"SFT + GRPO {arm}"] = p.evaluate(f"grpo-{arm}", p.grpo(arm, sft), direct=False)["agentic"]
    split = json.loads((p.synth / "split.json").read_text())
    sides = {side: {json.loads(x)["id"] for x in (p.synth / f"{side}_questions.jsonl").read_text().splitlines() if x.strip()}
             for side in ("train", "held")}
    forced = {side: teacher_forced(sft, p.synth / "trajectories.jsonl", q) for side, q in sides.items()}
    print(f"\nheld-out: {split['held_questions']} questions on {split['held_images']} unseen images; "
          f"train: {split['train_questions']} questions, {split['train_trajectories']} teacher trajectories")
    print("| model | held-out accuracy | answered | tool calls / traj | fatal | eval wall s |\n|---|---:|---:|---:|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {100 * v['accuracy']:.1f}% | {100 * v['answered']:.0f}% | {v['calls_per_traj']:.2f} | "
              f"{100 * v['fatal_rate']:.0f}% | {v['wall_s']:.0f} |")
    ev = p.out / "eval"
    lift = paired(ev / "sft-direct" / "direct.jsonl", ev / "sft" / "agentic.jsonl")
    pairs = {arm: paired(ev / "sft" / "agentic.jsonl", ev / f"grpo-{arm}" / "agentic.jsonl") for arm in a.arms}
    for what, c in [("SFT with tools vs the no-tool baseline", lift)] + \
            [(f"GRPO {arm} vs the SFT model", c) for arm, c in pairs.items()]:
        print(f"{what}, the same questions: {c['gained']} gained, {c['lost']} lost (exact sign test p = {c['p']:.3f})")
    print("\nSFT model, teacher-forced on the teacher's trajectories (greedy next-token accuracy):")
    for side, f in forced.items():
        print(f"  {side}: {100 * f['gen_token_acc']:.1f}% of generated tokens, {100 * f['copy_token_acc']:.1f}% of "
              f"the {f['copy_tokens']} tokens copied into queries / URLs / goals / answers, {100 * f['copy_exact']:.1f}% of the "
              f"{f['copies']} copies exactly ({f['trajectories']} trajectories)")
    print(json.dumps({"bench": "proof_learning", "device": device_name(), "commit": git_commit(),
                      "threads": torch.get_num_threads(), "args": vars(a), "split": split,
                      "accuracy": {k: round(v["accuracy"], 4) for k, v in rows.items()},
                      "sft_vs_no_tool": lift, "grpo_vs_sft": pairs,
                      "sft_teacher_forced": {k: {m: round(x, 4) for m, x in f.items()} for k, f in forced.items()},
                      "stages_s": p.timings,
                      "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
