"""The learning proof on CPU: RL sharpens a strategy the SFT model already holds.

One command, every stage the product's own entry point called as a library (the synthesis
pipeline, run_sft, run_grpo, run_eval, the loader), cached under --out (a finished stage is
skipped on a rerun, so a crashed run resumes and a rerun of one arm is cheap):

  1. world      the bundled offline world (seeded)
  2. synth      1-hop page / emblem questions (scene questions are dropped); with --tool-chain
                ocr also the synth teacher's trajectories of them
  3. split      by image 60 / 20 / 20 into SFT / RL / held-out questions (an image's every
                question on one side): RL trains on questions SFT never saw
  4. tools      the SFT questions' tool trajectories: the replay teacher through the real tools,
                transient tool failures injected (so the data retries a failed call), the synth
                judge keeping the right, grounded ones; the chain (--tool-chain) is "ImageSearch
                the image, Visit the page found with the asked field as the goal, answer from
                the line Visit puts first" (image_search, the default) or the synth teacher's
                "fix the image, OCR the name, TextSearch it, Visit" (ocr). They are the control
                SFT's data (the ceiling)
     mixture    the SFT data, a strategy mixture: every tool trajectory, and for --recall-frac of
                their questions (all, by default) also a "recall" demonstration in the same agent
                format (think, then answer at once, no tool call), right only because SFT memorises
                it. The SFT policy learns a stochastic fork right after <think>; on unseen questions
                only the tool branch can be right. Its tool branch trains on the control's data
  5. warmup     copy + recall warm-up of the random-init student (benchmarks/proof_warmup.py)
  per seed:
  6. sft        SFT on the mixture; sft-tools, the control
  7. gate       the fork, on --gate-questions RL questions sampled at T 0.7: the first-turn
                tool-call rate must be in [0.3, 0.7] and the tool branch right >= 15% of the
                time, else the run stops (retune the mixture; --ignore-gate goes on); beside it the
                tool branch's copy skill, teacher-forced on the teacher's scripts (copy_exact: the
                search query, the URL, the asked field and its value) on those unseen and on seen
                questions
  8. grpo-<arm> GRPO from the SFT model on the RL split: accuracy-only reward (alpha 1), groups
                with mixed outcomes only, an lr warm-up; transient failures (p 0.15 a call) and
                sticky outages (0.3 of trajectories, every call failing from a random call on, so
                the K = 3 cascade ends them; --fatal-errors tool: only tool failures make a
                cascade, the model's own format loops run to max turns) injected; checkpoints
                every --curve-every steps evaluated greedily on --curve-questions held-out
                questions (the curve; its first and last points are the held-out evals below)
  9. eval       held-out, greedy, transient failures injected: the SFT model, the control, every
                arm; sampled pass@1 and pass@k (T 0.7) on --passk-questions of them

Prints per seed: held-out accuracy, first-turn tool-call rate, tool-branch success, retry rate
after a failed call, fatal rate; each arm against the SFT model question by question (gained,
lost, the exact sign test's p); pass@1 / pass@k; the curve (a PNG); one final JSON line.

    .venv/bin/python benchmarks/proof_learning.py --out runs/proof --ignore-gate   # 2 seeds (figures: benchmarks/README.md)

With several seeds the shared stages run first, then one process per seed in parallel (the
cores split between them; --no-parallel-seeds: one after another), then the report from the cache.
    .venv/bin/python benchmarks/proof_learning.py --out /tmp/p --n-questions 60 --world-scale 1 --warmup-steps 2 \\
        --sft-steps 4 --grpo-steps 2 --curve-every 1 --arms fatal_mask_clamp --seeds 0 --ignore-gate   # a smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from spyglass.engine.env import EnvConfig, build_env
from spyglass.engine.faults import FaultConfig
from spyglass.engine.loader import load_tokenizer
from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.rollout import RolloutConfig, build_engine
from spyglass.engine.offline.tiny import parse_tiny_spec
from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.trajectory import FATAL_ERRORS, Status, Trajectory, iter_jsonl, write_jsonl
from spyglass.trainer.algorithm import FILTERS, MODES, AlgoConfig
from spyglass.trainer.eval import EvalConfig, run_eval
from spyglass.trainer.grpo import GRPOConfig, run_grpo
from spyglass.trainer.reward import RewardConfig
from spyglass.trainer.sft import SFTConfig, SFTDataConfig, run_sft
from spyglass.trainer.synth.paths import PathConfig
from spyglass.trainer.synth.pipeline import SynthConfig, run_pipeline
from spyglass.trainer.synth.trajectories import (TeacherConfig, question_prompt, replay_scripts, teacher_rollout,
                                                 teacher_rollouts, ungrounded)
from spyglass.trainer.update import UpdateConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proof_warmup import WarmupConfig, run_warmup  # noqa: E402  (the proof's scaffolding, beside it)

TOOLS = ["Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect", "OCR", "ImageSearch", "TextSearch", "Visit"]
KINDS = ("synth-1hop-page", "synth-1hop-emblem")  # question kinds kept (prefixes): no scenes
RECALL = "<think>I remember this one.</think>\n<answer>{answer}</answer>"  # the recall branch's one turn
GATE_STOP = 3  # the exit status of a seed's child process whose seed stopped at the gate
# the arguments the cached stages depend on: the shared ones (--out/args.json) and each seed's
# (seed-N/args.json); a rerun must match them. DATA_FORMAT: the layout of data/ (2: the mixture
# holds every tool trajectory), so a folder of an older proof is refused, not misread
DATA_FORMAT = 2
DATA_ARGS = ("data_seed", "world_scale", "n_questions", "split", "model", "teacher_model", "tool_chain", "recall_frac",
             "warmup_steps", "transient_p", "recite_question", "gate_questions", "curve_questions", "passk_questions")
SEED_ARGS = ("sft_steps", "sft_epochs", "sft_batch", "sft_lr", "grpo_groups", "grpo_samples", "grpo_lr", "grpo_warmup",
             "grpo_filter", "fatal_errors", "temperature", "curve_every", "outage_p", "max_turns", "max_tokens_per_turn",
             "passk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/proof")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of SFT, GRPO and sampling")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="seed of the shared stages (world, questions, split, mixture, warm-up): one process per "
                         "--seeds value can run in parallel once they are cached")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--parallel-seeds", action=argparse.BooleanOptionalAction, default=True,
                    help="with several seeds, each seed's stages in its own process, the threads split between them")
    ap.add_argument("--world-scale", type=int, default=6, help="world size as a multiple of the default world")
    ap.add_argument("--n-questions", type=int, default=2400, help="1-hop questions synthesized (scenes among them are dropped)")
    ap.add_argument("--split", type=float, nargs=3, default=[0.6, 0.2, 0.2], help="SFT / RL / held-out, by image")
    ap.add_argument("--model", default="tiny:qwen2_vl:128x2:64",
                    help="the student, random init (hidden x layers : image tokens)")
    ap.add_argument("--teacher-model", default="",
                    help="the teacher's model (it only replays the solve scripts; default: the student's family "
                         "and image tokens at 32x1, the same tokens)")
    ap.add_argument("--recall-frac", type=float, default=1.0, help="SFT questions (with a tool trajectory) also taught the recall branch "
                    "(1: a 50/50 fork on every prompt, which greedy decoding resolves to recall)")
    ap.add_argument("--tool-chain", default="image_search", choices=["image_search", "ocr"],
                    help="the tool branch the teacher demonstrates: image_search (ImageSearch the image, Visit the "
                         "page found: no typed name) or ocr (fix the image, OCR, TextSearch the name, Visit; the "
                         "student copies unseen OCR'd names too poorly for RL to find right answers); "
                         "a different chain needs its own --out (the data differ)")
    ap.add_argument("--warmup-steps", type=int, default=2000, help="copy warm-up steps before SFT (0: none)")
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT optimizer steps (0: --sft-epochs passes over the data)")
    ap.add_argument("--sft-epochs", type=int, default=4,
                    help="SFT passes over the data when --sft-steps is 0 (more memorise the names and lose the copy skill)")
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--gate-questions", type=int, default=64)
    ap.add_argument("--gate-tool-rate", type=float, nargs=2, default=[0.3, 0.7])
    ap.add_argument("--gate-tool-success", type=float, default=0.15)
    ap.add_argument("--ignore-gate", action="store_true", help="go on to GRPO when the gate fails")
    ap.add_argument("--arms", nargs="+", default=["vanilla", "fatal_mask", "fatal_mask_clamp"], choices=MODES)
    ap.add_argument("--grpo-steps", type=int, default=16, help="GRPO steps per arm (the fork flips within the first 8)")
    ap.add_argument("--grpo-groups", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--grpo-samples", type=int, default=4, help="samples per prompt (group size)")
    ap.add_argument("--grpo-lr", type=float, default=2e-4)
    ap.add_argument("--grpo-warmup", type=int, default=4, help="GRPO lr warm-up, in updates")
    ap.add_argument("--grpo-filter", default="acc", choices=FILTERS,
                    help="drop groups flat in this score (acc: keep groups with mixed outcomes)")
    ap.add_argument("--fatal-errors", default="any", choices=FATAL_ERRORS,
                    help="the GRPO rollouts' cascade (engine fatal_errors): any (tool, format, no call) | tool; "
                         "evals keep any, the same for every model")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (GRPO, gate, pass@k)")
    ap.add_argument("--curve-every", type=int, default=8, help="GRPO steps between curve evals")
    ap.add_argument("--curve-questions", type=int, default=96, help="held-out questions of the curve")
    ap.add_argument("--passk", type=int, default=8, help="samples per question for pass@k")
    ap.add_argument("--passk-questions", type=int, default=48, help="held-out questions of pass@1 / pass@k")
    ap.add_argument("--transient-p", type=float, default=0.15, help="injected transient failures per call")
    ap.add_argument("--outage-p", type=float, default=0.3, help="RL trajectories with a sticky outage")
    ap.add_argument("--max-turns", type=int, default=10)
    ap.add_argument("--recite-question", action=argparse.BooleanOptionalAction, default=True,
                    help="every observation ends with the question (EngineConfig.recite_question): teacher, RL, evals")
    ap.add_argument("--max-tokens-per-turn", type=int, default=96)
    ap.add_argument("--stop-after", choices=["data", "sft", "gate"],
                    help="run the stages up to this one, then stop (data: every shared stage, the warm-up included)")
    ap.add_argument("--seed-process", action="store_true", help=argparse.SUPPRESS)  # a child of run_seeds_in_parallel
    a = ap.parse_args(argv)
    if not 0 <= a.recall_frac <= 1:
        ap.error(f"--recall-frac must be in [0, 1], got {a.recall_frac}")
    if abs(sum(a.split) - 1) > 1e-6 or min(a.split) <= 0:
        ap.error(f"--split must be three positive fractions summing to 1, got {a.split}")
    if a.grpo_steps % a.curve_every:
        ap.error(f"--grpo-steps {a.grpo_steps} must be a multiple of --curve-every {a.curve_every}")
    return a


# ------------------------------------------------------------------------------ statistics
def behaviour(trajs: list[Trajectory]) -> dict[str, float]:
    """What a model did on judged trajectories: accuracy; the fork (first turn calls a tool);
    how often the tool branch was right; retry rate (a turn after a transient tool failure calls
    a failed tool again); fatal rate (a tool-error cascade); answered rate."""
    n = max(1, len(trajs))
    tool = [t for t in trajs if t.turns and t.turns[0].calls]
    failed = retried = 0
    for t in trajs:
        for a, b in zip(t.turns, t.turns[1:]):
            names = {e.get("name") for e in a.tool_errors if e.get("kind") == "transient"}
            if names:
                failed += 1
                retried += any(c["name"] in names for c in b.calls)
    right = lambda ts: sum(float(t.reward.get("acc", 0.0)) > 0.5 for t in ts)  # noqa: E731
    return {"n": len(trajs), "accuracy": right(trajs) / n, "first_tool": len(tool) / n,
            "tool_success": right(tool) / max(1, len(tool)), "retry": retried / max(1, failed),
            "failed_turns": failed, "fatal": sum(t.fatal_step is not None for t in trajs) / n,
            "answered": sum(t.status is Status.ANSWERED for t in trajs) / n}


def pass_at(trajs: list[Trajectory]) -> dict[str, float]:
    """Sampled pass@1 (mean accuracy over every sample) and pass@k (a question with any right
    sample, k = the samples per question) over trajectories with several samples a question."""
    by: dict[str, list[bool]] = collections.defaultdict(list)
    for t in trajs:
        by[t.meta["item_id"]].append(float(t.reward.get("acc", 0.0)) > 0.5)
    k = min((len(v) for v in by.values()), default=0)
    return {"questions": len(by), "k": k, "pass@1": sum(sum(v) / len(v) for v in by.values()) / max(1, len(by)),
            "pass@k": sum(any(v) for v in by.values()) / max(1, len(by))}


def paired(base: Path, other: Path) -> dict[str, float]:
    """Two evals of the same held-out questions (their judged trajectories: an eval's
    agentic.jsonl), paired per question by the share of its samples that are right (one greedy
    sample: right or not): `gained` (a higher share in `other`), `lost` (a higher share in `base`)
    and the exact two-sided sign test's p-value on those discordant pairs (with one sample a
    question, McNemar's exact test): is `other` different?"""
    def right(f: Path) -> dict[str, float]:
        by: dict[str, list[bool]] = collections.defaultdict(list)
        for t in iter_jsonl(f):
            by[t.meta["item_id"]].append(t.reward.get("acc", 0.0) > 0.5)
        return {q: sum(v) / len(v) for q, v in by.items()}
    a, b = right(base), right(other)
    if a.keys() != b.keys():
        raise ValueError(f"{base} and {other} judged different questions "
                         f"(only in the first: {sorted(a.keys() - b.keys())[:5]}, "
                         f"only in the second: {sorted(b.keys() - a.keys())[:5]})")
    gained = sum(b[q] > a[q] for q in a)
    lost = sum(a[q] > b[q] for q in a)
    n = gained + lost
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0
    return {"gained": gained, "lost": lost, "p": float(f"{p:.3g}")}


# the copies of the tool branch: in a turn of the teacher's script, after `anchor`, the text between
# `start` and `stop` (scored through the token that writes `stop`: where the copy ends is part of it)
COPIES = {"query": ("", '"query": "', '"'), "url": ("", '"url": "', '"'),
          "field": ("", "The page says ", ": "), "value": ("The page says ", ": ", ".</think>")}


def copy_exact(tok: Any, trajs: list[Trajectory]) -> dict[str, dict[str, float]]:
    """Teacher-forced copy skill on replayed teacher scripts: for each copy of the tool branch
    (COPIES: the OCR'd name into the search query, the returned URL into Visit, the asked field
    and then its value from the page into the answer turn's thought) the share of its tokens
    the model gives probability > 0.5 (so its greedy choice) and the share of copies with every
    token so ("exact": what a greedy chain needs)."""
    toks: dict[str, list[bool]] = collections.defaultdict(list)
    exact: dict[str, list[bool]] = collections.defaultdict(list)
    for t in trajs:
        for seg in t.segments:
            if seg.kind.name != "GEN":
                continue
            ids = list(seg.token_ids)
            ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]  # text length after each token
            text = tok.decode(ids)
            for name, (anchor, start, stop) in COPIES.items():
                i = text.find(anchor)
                i = text.find(start, i) if i >= 0 else -1
                if i < 0:
                    continue
                lo, hi = i + len(start), text.find(stop, i + len(start))
                if hi < 0:  # the turn was cut before the copy ended (max_tokens_per_turn): not a measurement
                    continue
                # the tokens that write [lo, hi]: from the one ending past lo to the one ending past hi
                span = [k for k, e in enumerate(ends) if e > lo and (k == 0 or ends[k - 1] <= hi)]
                ok = [math.exp(seg.logprobs[k]) > 0.5 for k in span]
                toks[name] += ok
                exact[name].append(all(ok))
    return {k: {"copies": len(exact[k]), "tokens": round(sum(toks[k]) / max(1, len(toks[k])), 3),
                "exact": round(sum(exact[k]) / max(1, len(exact[k])), 3)} for k in COPIES}


def teacher_spec(student: str) -> str:
    """The smallest tiny model with the student's tokens: same family, same image-token cap."""
    if not student.startswith("tiny:"):
        raise ValueError(f"--teacher-model is needed when --model is not a tiny spec, got {student!r}")
    family, _, _, image_tokens = parse_tiny_spec(student)
    return f"tiny:{family}:32x1:{image_tokens}"


def _rows(f: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def _write_rows(f: Path, rows: list[dict[str, Any]]) -> None:
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def _atomic(f: Path) -> Iterator[Path]:
    """A path to write `f`'s new content at; it replaces `f` in one rename when the block ends
    without error, so a killed run never leaves a half-written stage output. The part's name
    carries the pid: the parallel seeds' processes may both write the same file."""
    part = f.with_name(f"{f.name}.{os.getpid()}.part")
    try:
        yield part
        part.replace(f)
    finally:
        part.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ stages
class Proof:
    """The stages, their cache and the timings."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.out = a, Path(a.out).resolve()  # absolute: questions files resolve their images by it
        self.out.mkdir(parents=True, exist_ok=True)
        self.world, self.synth, self.data = self.out / "world", self.out / "synth", self.out / "data"
        self.timings: dict[str, float] = {}
        self.check_args()

    def check_args(self, d: Path | None = None, keys: tuple[str, ...] = DATA_ARGS) -> None:
        """Refuse a run whose `keys` differ from those recorded in `d`/args.json (its cached stages
        were made with the recorded values), and a folder of an older proof (data/ with no
        args.json, or an older DATA_FORMAT); record the keys not yet there (an argument newer than
        the folder's args.json is taken to have had its default there)."""
        d = d or self.out
        f, now = d / "args.json", {k: getattr(self.a, k) for k in keys}
        if d == self.out:
            now["data_format"] = DATA_FORMAT
        was = json.loads(f.read_text()) if f.exists() else {}
        if d == self.out and (self.data.exists() or was) and was.get("data_format") != DATA_FORMAT:
            raise SystemExit(f"{self.out} holds data of an older proof (data format {was.get('data_format')}, "
                             f"this one writes {DATA_FORMAT}): use another --out")
        defaults = vars(parse_args([])) if was else {}  # a key an older run did not record: it had the default
        for k in keys:
            old = was.get(k, defaults.get(k, now[k]))
            if old != now[k]:
                raise SystemExit(f"{d} was made with --{k.replace('_', '-')} {old}; this run asks {now[k]}: "
                                 f"use another --out (its cached stages would not match)")
        if now.keys() - was.keys():
            d.mkdir(parents=True, exist_ok=True)
            with _atomic(f) as part:
                part.write_text(json.dumps({**now, **was}, indent=1) + "\n")

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

    def questions(self, name: str) -> Path:
        """A split's questions file, beside the synthesized images (questions_file resolves them there)."""
        return self.synth / f"proof_{name}_questions.jsonl"

    def env(self, questions: Path, faults: FaultConfig | None = None) -> EnvConfig:
        return EnvConfig(world_dir=str(self.world), tools=list(TOOLS), dense_search=False, prompt_schemas=False,
                         search_top_k=1, questions_file=str(questions), faults=faults or FaultConfig())

    def engine(self, n: int, temperature: float, seed: int) -> EngineConfig:
        return EngineConfig(n_samples=n, max_live=64, max_turns=self.a.max_turns,
                            max_tokens_per_turn=self.a.max_tokens_per_turn, temperature=temperature, seed=seed,
                            recite_question=self.a.recite_question)

    def teacher(self) -> TeacherConfig:
        a, base = self.a, teacher_rollout()
        env = dataclasses.replace(base.env, tools=list(TOOLS), prompt_schemas=False, search_top_k=1,
                                  faults=FaultConfig(transient_p=a.transient_p, seed=a.data_seed))
        return TeacherConfig(rollout=teacher_rollout(model=a.teacher_model or teacher_spec(a.model),
                                                     engine=dataclasses.replace(base.engine, seed=a.data_seed,
                                                                                recite_question=a.recite_question),
                                                     env=env))

    # shared stages ----------------------------------------------------------------------
    def make_data(self) -> None:
        a, k = self.a, self.a.world_scale
        world = WorldConfig(seed=a.data_seed, n_people=90 * k, n_places=60 * k, n_orgs=60 * k, n_products=50 * k,
                            n_events=40 * k, n_sign_images=48 * k, n_scenes=8 * k, n_emblem_queries=10 * k)
        self.stage("world", self.world / "manifest.json", lambda: generate_world(self.world, world))
        cfg = SynthConfig(out=str(self.synth), world=str(self.world), n_questions=a.n_questions, seed=a.data_seed,
                          paths=PathConfig(hop_lengths=(1,), hop_probs=(1.0,), seed=a.data_seed),
                          teacher=self.teacher(), trajectories=a.tool_chain == "ocr")  # image_search: tool_demos
        self.stage("synth", self.synth / "report.json", lambda: asyncio.run(run_pipeline(cfg)))
        self.data.mkdir(exist_ok=True)
        self.stage("split", self.data / "split.json", self.split)
        self.stage("tools", self.data / "sft_tools.jsonl", lambda: asyncio.run(self.tools()))
        self.stage("mixture", self.data / "sft_mix.jsonl", lambda: asyncio.run(self.mixture()))

    def split(self) -> None:
        """SFT / RL / held-out by image; the subsets the gate, curve and pass@k use."""
        a = self.a
        qs = [q for q in _rows(self.synth / "questions.jsonl") if q["kind"].startswith(KINDS)]
        images = sorted({q["image"] for q in qs})
        random.Random(a.data_seed).shuffle(images)
        n_sft, n_rl = round(len(images) * a.split[0]), round(len(images) * a.split[1])
        side = {im: "sft" if i < n_sft else "rl" if i < n_sft + n_rl else "held" for i, im in enumerate(images)}
        sides = {s: [q for q in qs if side[q["image"]] == s] for s in ("sft", "rl", "held")}
        for s, rows in sides.items():
            _write_rows(self.questions(s), rows)
        rng = random.Random(a.data_seed + 1)
        for name, src, n in (("gate", "rl", a.gate_questions), ("curve", "held", a.curve_questions),
                             ("passk", "held", a.passk_questions)):
            _write_rows(self.questions(name), rng.sample(sides[src], min(n, len(sides[src]))))
        info = {"images": len(images), "kinds": dict(collections.Counter(q["kind"] for q in qs)),
                **{f"{s}_questions": len(r) for s, r in sides.items()}}
        (self.data / "split.json").write_text(json.dumps(info, indent=1) + "\n")

    def chain(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`recs` with their hops in --tool-chain's form: image_search replaces every hop before the
        last page's visit by one ImageSearch of the question's image (solve_script turns the hops
        into the teacher's script)."""
        if self.a.tool_chain == "ocr":
            return recs
        return [{**r, "hops": [{"action": "image_search"}, [h for h in r["hops"] if h["action"] == "visit"][-1]]}
                for r in recs]

    def scripts(self, recs: list[dict[str, Any]]) -> dict[str, list[str]]:
        """The teacher's solve scripts of `recs` in --tool-chain's form (search top-1, as env())."""
        return replay_scripts(self.chain(recs), top_k=1)

    async def replay(self, rcfg: RolloutConfig, recs: list[dict[str, Any]],
                     scripts: dict[str, list[str]]) -> list[Trajectory]:
        """`scripts` of `recs` forced through the engine under `rcfg` (its env, model, faults)."""
        env, prompts = build_env(rcfg.env), [question_prompt(r, self.synth) for r in recs]
        engine, backends, _ = build_engine(rcfg, env, scripts=scripts, prompts=prompts)
        try:
            return [t async for g in engine.run(prompts) for t in g]
        finally:
            for b in backends:
                await b.close()

    async def tool_demos(self, sft: dict[str, dict[str, Any]]) -> list[Trajectory]:
        """The tool trajectories of the SFT questions: the synth teacher's (tool chain ocr), or
        the same teacher (teacher_rollouts: transient faults injected, so they retry; its judge
        keeps the right, grounded ones) on the image_search chain."""
        if self.a.tool_chain == "ocr":
            return [t for t in iter_jsonl(self.synth / "trajectories.jsonl") if t.group_id in sft]
        teacher = self.teacher()
        env = self.env(self.questions("sft"), teacher.rollout.env.faults)
        teacher = dataclasses.replace(teacher, rollout=dataclasses.replace(teacher.rollout, env=env))
        kept, _ = await teacher_rollouts(self.chain([sft[i] for i in sorted(sft)]), build_env(env), teacher,
                                         self.synth)
        return kept

    async def tools(self) -> None:
        """sft_tools.jsonl: the teacher's tool trajectory of every SFT question that has one (the
        control's data, all of them in the mixture), in id order (not rollout completion order)."""
        sft = {q["id"]: q for q in _rows(self.questions("sft"))}
        tools = sorted(await self.tool_demos(sft), key=lambda t: t.id)
        with _atomic(self.data / "sft_tools.jsonl") as part:
            write_jsonl(part, tools, append=False)

    async def mixture(self) -> None:
        """sft_mix.jsonl: every tool trajectory of sft_tools.jsonl, and for --recall-frac of their
        questions also a one-turn recall demonstration rolled out through the engine in the same
        agent format (the replay of RECALL), so its prompt tokens are exactly the agent's. The tool
        branch thus trains on exactly the control's data; the recall branch is a second answer to
        the same prompts, right only because SFT memorises it."""
        sft = {q["id"]: q for q in _rows(self.questions("sft"))}
        tools = list(iter_jsonl(self.data / "sft_tools.jsonl"))
        ids = sorted({t.group_id for t in tools})
        random.Random(self.a.data_seed + 2).shuffle(ids)
        recall = set(ids[: round(len(ids) * self.a.recall_frac)])
        rcfg = dataclasses.replace(self.teacher().rollout, env=self.env(self.questions("sft")))
        recs = [sft[i] for i in sorted(recall)]
        demos = await self.replay(rcfg, recs, {r["id"]: [RECALL.format(answer=r["answer"])] for r in recs})
        bad = [t.id for t in demos if t.status is not Status.ANSWERED or t.turns[0].calls]
        if bad:
            raise RuntimeError(f"recall demonstrations that did not answer at once: {bad[:5]}")
        demos = [dataclasses.replace(t, id=f"{t.group_id}#recall") for t in demos]  # beside the tool one's id
        mix = sorted(tools + demos, key=lambda t: t.id)
        with _atomic(self.data / "sft_mix.jsonl") as part:
            write_jsonl(part, mix, append=False)

    def warmup(self) -> str:
        """The SFT runs' starting model: the student spec, or the copy-warmed student."""
        a, d = self.a, self.out / "warmup"
        if not a.warmup_steps:
            return a.model
        cfg = WarmupConfig(model=a.model, out=str(d), steps=a.warmup_steps, seed=a.data_seed)
        self.stage("warmup", d / "warmup.jsonl", lambda: run_warmup(cfg))
        return str(d)

    # per-seed stages --------------------------------------------------------------------
    def sft(self, seed: int, name: str, data: Path) -> Path:
        a, d = self.a, self.out / f"seed-{seed}" / name
        steps = a.sft_steps or a.sft_epochs * math.ceil(len(_rows(data)) / a.sft_batch)
        cfg = SFTConfig(model=self.warmup(), out_dir=str(d), data=SFTDataConfig(path=str(data)), steps=steps,
                        batch_size=a.sft_batch, lr=a.sft_lr, seed=seed, save_every=max(1, steps // 5))
        self.stage(f"seed {seed} {name}", d / "final" / "config.json", lambda: run_sft(cfg))
        return d / "final"

    def evaluate(self, seed: int, name: str, model: Path, questions: str, n: int = 1,
                 temperature: float = 0.0) -> list[Trajectory]:
        """Judged trajectories of `model` on the questions of split `questions` (transient failures
        injected, the same calls fail for every model: the faults are seeded per trajectory id)."""
        d = self.out / f"seed-{seed}" / "eval" / name
        faults = FaultConfig(transient_p=self.a.transient_p, seed=seed)
        rollout = RolloutConfig(model=str(model), policy="sample", engine=self.engine(n, temperature, seed),
                                env=self.env(self.questions(questions), faults), out="", progress=False)
        cfg = EvalConfig(rollout=rollout, agentic=True, direct_baseline=False, out_dir=str(d))
        self.stage(f"seed {seed} eval {name}", d / "report.json", lambda: run_eval(cfg))
        return list(iter_jsonl(d / "agentic.jsonl"))

    def seen(self) -> str:
        """The questions file "seen": up to --gate-questions SFT questions whose tool trajectory
        both SFT runs trained on (every one: the mixture holds them all), for copy_exact on seen questions."""
        tool_ids = {t.group_id for t in iter_jsonl(self.data / "sft_mix.jsonl") if t.turns and t.turns[0].calls}
        rows = [q for q in _rows(self.questions("sft")) if q["id"] in tool_ids]
        rows = random.Random(self.a.data_seed + 3).sample(rows, min(self.a.gate_questions, len(rows)))
        f = self.questions("seen")  # derived from data/ each time: synth/ may be shared with another --out
        if not f.exists() or _rows(f) != rows:
            with _atomic(f) as part:
                _write_rows(part, rows)
        return "seen"

    def copies(self, seed: int, name: str, model: Path, questions: str) -> dict[str, Any]:
        """copy_exact of `model` on the teacher's scripts of split `questions`, replayed (no faults),
        over the replays whose every typed value was in view (ungrounded: an OCR misread or a
        search that missed the page makes the script type what the agent never saw)."""
        f = self.out / f"seed-{seed}" / "eval" / f"copies-{name}-{questions}.json"

        async def replay() -> None:
            recs = _rows(self.questions(questions))
            rcfg = RolloutConfig(model=str(model), policy="replay", engine=self.engine(1, 0.0, seed),
                                 env=self.env(self.questions(questions)), out="", progress=False)
            trajs = await self.replay(rcfg, recs, self.scripts(recs))
            grounded = [t for t in trajs if ungrounded(t) is None]
            f.write_text(json.dumps({**copy_exact(load_tokenizer(model), grounded),
                                     "replays": len(trajs), "grounded": len(grounded)}) + "\n")
        self.stage(f"seed {seed} copies {name} on {questions}", f, lambda: asyncio.run(replay()))
        return json.loads(f.read_text())

    def gate(self, seed: int, sft: Path) -> dict[str, Any]:
        a = self.a
        b = behaviour(self.evaluate(seed, "gate", sft, "gate", temperature=a.temperature))
        lo, hi = a.gate_tool_rate
        ok = lo <= b["first_tool"] <= hi and b["tool_success"] >= a.gate_tool_success
        print(f"[proof] seed {seed} gate ({b['n']} RL questions, T {a.temperature}): first-turn tool-call rate "
              f"{b['first_tool']:.2f} (needs {lo}-{hi}), tool branch right {b['tool_success']:.2f} "
              f"(needs >= {a.gate_tool_success}): {'PASS' if ok else 'FAIL'}", flush=True)
        return {**b, "pass": ok}

    def grpo(self, seed: int, arm: str, init: Path) -> tuple[Path, list[dict[str, Any]]]:
        """GRPO in segments of curve_every steps (each resumes the last's checkpoint), each
        segment's model evaluated on the curve questions; returns the final model and the curve.
        The curve's ends are read off the held-out evals (the curve questions are among them): the
        SFT model's, and the final model's (made here, then found cached by run_seed)."""
        a, d = self.a, self.out / f"seed-{seed}" / f"grpo-{arm}"
        faults = FaultConfig(transient_p=a.transient_p, outage_p=a.outage_p, seed=seed)
        rollout = RolloutConfig(engine=dataclasses.replace(self.engine(a.grpo_samples, a.temperature, seed),
                                                           groups_per_step=a.grpo_groups,
                                                           fatal_errors=a.fatal_errors),
                                env=self.env(self.questions("rl"), faults), model=str(init),
                                policy="sample", out=str(d / "rollouts.jsonl"), progress=False)
        ids = {q["id"] for q in _rows(self.questions("curve"))}
        on_curve = lambda trajs: behaviour([t for t in trajs if t.meta["item_id"] in ids])  # noqa: E731
        curve = [{"step": 0, **on_curve(self.evaluate(seed, "sft", init, "held"))}]
        for upto in range(a.curve_every, a.grpo_steps + 1, a.curve_every):
            cfg = GRPOConfig(rollout=rollout, algo=AlgoConfig(mode=arm, filter_groups=a.grpo_filter),
                             reward=RewardConfig(alpha=1.0),
                             update=UpdateConfig(lr=a.grpo_lr, temperature=a.temperature, warmup_steps=a.grpo_warmup),
                             steps=upto, ckpt_dir=str(d / "ckpt"), ckpt_every=a.curve_every, log_dir=str(d),
                             export_dir=str(d / f"at-{upto}"), seed=seed)
            self.stage(f"seed {seed} grpo-{arm} to step {upto}", d / f"at-{upto}" / "config.json",
                       lambda cfg=cfg: run_grpo(cfg))
            name, questions = (f"grpo-{arm}", "held") if upto == a.grpo_steps else (f"curve-{arm}-{upto}", "curve")
            curve.append({"step": upto, **on_curve(self.evaluate(seed, name, d / f"at-{upto}", questions))})
        return d / f"at-{a.grpo_steps}", curve


def plot_curves(curves: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Greedy held-out accuracy and first-turn tool-call rate against GRPO step, per arm and seed."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = dict(zip(MODES, ["tab:gray", "tab:purple", "tab:blue", "tab:green"]))
    for seed, arms in curves.items():
        for arm, pts in arms.items():
            for ax, key in zip(axes, ("accuracy", "first_tool")):
                ax.plot([p["step"] for p in pts], [p[key] for p in pts], marker="o", color=colours[arm],
                        linestyle="-" if seed == min(curves) else "--", label=f"{arm} (seed {seed})")
    for ax, title in zip(axes, ("held-out greedy accuracy", "first-turn tool-call rate")):
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_seed(p: Proof, seed: int) -> dict[str, Any] | None:
    """Every per-seed stage; the seed's results (None when it stopped early)."""
    a, ev = p.a, p.out / f"seed-{seed}" / "eval"
    p.check_args(p.out / f"seed-{seed}", SEED_ARGS)
    sft = p.sft(seed, "sft", p.data / "sft_mix.jsonl")
    control = p.sft(seed, "sft-tools", p.data / "sft_tools.jsonl")
    if a.stop_after == "sft":
        return None
    gate = p.gate(seed, sft)
    copies = {f"{m} on {q}": p.copies(seed, m, path, q) for m, path in (("sft", sft), ("sft-tools", control))
              for q in ("gate", p.seen())}
    print(f"[proof] seed {seed} teacher-forced copies (exact / tokens), unseen = the gate's RL questions, seen = "
          f"as many SFT questions with a tool trajectory in both SFT runs:\n" + "\n".join(
              f"  {k} ({row['grounded']} of {row['replays']} replays grounded): " + ", ".join(
                  f"{c} {row[c]['exact']:.2f} / {row[c]['tokens']:.2f}" for c in COPIES if row[c]["copies"])
              for k, row in copies.items()),  # a copy the chain never makes (no query on image_search): left out
          flush=True)
    if a.stop_after == "gate" or not (gate["pass"] or a.ignore_gate):
        return {"gate": gate, "copies": copies}
    rows = {"SFT (mixture)": behaviour(p.evaluate(seed, "sft", sft, "held")),
            "control SFT (tools only)": behaviour(p.evaluate(seed, "sft-tools", control, "held"))}
    passk = {"SFT (mixture)": pass_at(p.evaluate(seed, "passk-sft", sft, "passk", a.passk, a.temperature))}
    curves, pairs, sampled = {}, {}, {}
    for arm in a.arms:
        final, curves[arm] = p.grpo(seed, arm, sft)
        rows[f"GRPO {arm}"] = behaviour(p.evaluate(seed, f"grpo-{arm}", final, "held"))
        passk[f"GRPO {arm}"] = pass_at(p.evaluate(seed, f"passk-{arm}", final, "passk", a.passk, a.temperature))
        pairs[arm] = paired(ev / "sft" / "agentic.jsonl", ev / f"grpo-{arm}" / "agentic.jsonl")
        sampled[arm] = paired(ev / "passk-sft" / "agentic.jsonl", ev / f"passk-{arm}" / "agentic.jsonl")
    ablation = {arm: paired(ev / "grpo-vanilla" / "agentic.jsonl", ev / f"grpo-{arm}" / "agentic.jsonl")
                for arm in a.arms if arm != "vanilla" and "vanilla" in a.arms}
    return {"gate": gate, "copies": copies, "held": rows, "passk": passk, "grpo_vs_sft": pairs,
            "grpo_vs_sft_sampled": sampled,
            "arms_vs_vanilla": ablation,
            "control_vs_sft": paired(ev / "sft" / "agentic.jsonl", ev / "sft-tools" / "agentic.jsonl"),
            "curves": curves}


def report(p: Proof, results: dict[int, dict[str, Any]]) -> None:
    split = json.loads((p.data / "split.json").read_text())
    print(f"\nquestions: {split['sft_questions']} SFT / {split['rl_questions']} RL / {split['held_questions']} held-out "
          f"on {split['images']} images (by image); faults: transient p {p.a.transient_p} (teacher, RL, eval), "
          f"sticky outage p {p.a.outage_p} (RL)")
    for seed, r in results.items():
        if "held" not in r:
            print(f"seed {seed}: stopped at the gate ({r['gate']})")
            continue
        print(f"\nseed {seed}, held-out (greedy):\n| model | accuracy | first-turn tool call | tool branch right | "
              f"retry after a failure | fatal | answered |\n|---|---:|---:|---:|---:|---:|---:|")
        for k, b in r["held"].items():
            print(f"| {k} | {100 * b['accuracy']:.1f}% | {100 * b['first_tool']:.0f}% | {100 * b['tool_success']:.0f}% | "
                  f"{100 * b['retry']:.0f}% ({b['failed_turns']}) | {100 * b['fatal']:.1f}% | {100 * b['answered']:.0f}% |")
        for what, c in [("control SFT", r["control_vs_sft"])] + [(f"GRPO {k}", c) for k, c in r["grpo_vs_sft"].items()]:
            print(f"  {what} vs the SFT model: {c['gained']} gained, {c['lost']} lost (exact sign test p = {c['p']:.2g})")
        for arm, c in r.get("arms_vs_vanilla", {}).items():
            print(f"  GRPO {arm} vs GRPO vanilla: {c['gained']} gained, {c['lost']} lost (p = {c['p']:.2g})")
        print("  sampled (T %s): " % p.a.temperature + "; ".join(
            f"{k} pass@1 {100 * v['pass@1']:.1f}% pass@{v['k']} {100 * v['pass@k']:.1f}%" for k, v in r["passk"].items()))
        for arm, c in r.get("grpo_vs_sft_sampled", {}).items():
            print(f"  GRPO {arm} vs the SFT model, sampled (a question's share of right samples): {c['gained']} "
                  f"higher, {c['lost']} lower (p = {c['p']:.2g})")
        for arm, pts in r["curves"].items():
            print(f"  curve {arm}: " + ", ".join(f"step {x['step']}: acc {100 * x['accuracy']:.0f}% "
                                                 f"tool {100 * x['first_tool']:.0f}%" for x in pts))


def seed_command(argv: list[str], seed: int, threads: int) -> list[str]:
    """The command line of seed `seed`'s child process: this script, that seed only, `threads`."""
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--seeds", str(seed), "--threads", str(threads),
            "--seed-process"]


def run_seeds_in_parallel(p: Proof, argv: list[str], poll_s: float = 1.0) -> dict[str, float]:
    """One child process per seed (seed_command, an even share of the threads); each caches its
    stages under --out, so the caller's own pass over the seeds only reads them back. Returns the
    children's stage timings. A child that crashes stops the others (its log is above), and so do
    Ctrl-C and SIGTERM to this process."""
    import signal
    import subprocess
    a = p.a
    threads = max(1, (a.threads or torch.get_num_threads()) // len(a.seeds))
    procs: dict[int, subprocess.Popen] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        for s in a.seeds:
            (p.out / f"seed-{s}" / "stages.json").unlink(missing_ok=True)
            procs[s] = subprocess.Popen(seed_command(argv, s, threads))
        while True:  # poll every child each round: a crash of any one stops the wait
            codes = {s: proc.poll() for s, proc in procs.items()}
            bad = {s: rc for s, rc in codes.items() if rc not in (None, 0, GATE_STOP)}
            if bad or None not in codes.values():
                break
            time.sleep(poll_s)
        if bad:
            running = [s for s, proc in procs.items() if proc.poll() is None]
            raise RuntimeError("the process of " + ", ".join(f"seed {s} exited with {rc}" for s, rc in bad.items())
                               + " (its log is above)" + (f"; stopped seeds {running}" if running else ""))
    finally:
        signal.signal(signal.SIGTERM, old_term)
        live = [proc for proc in procs.values() if proc.poll() is None]
        for proc in live:
            proc.terminate()
        for proc in live:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    timings: dict[str, float] = {}
    for s in a.seeds:
        f = p.out / f"seed-{s}" / "stages.json"
        timings.update(json.loads(f.read_text()) if f.exists() else {})
    return timings


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    p, t0, commit = Proof(a), time.perf_counter(), git_commit()  # the code that ran, not HEAD at the end
    p.make_data()
    p.warmup()  # shared too: the per-seed processes of the parallel recipe must not both train it
    if a.stop_after == "data":
        return 0
    if a.seed_process:  # one seed of run_seeds_in_parallel: its stages and their timings, no report
        (seed,) = a.seeds
        r = run_seed(p, seed)
        (p.out / f"seed-{seed}").mkdir(exist_ok=True)
        (p.out / f"seed-{seed}" / "stages.json").write_text(json.dumps(p.timings) + "\n")
        return GATE_STOP if r is not None and "held" not in r else 0
    if a.parallel_seeds and len(a.seeds) > 1:
        p.timings.update(run_seeds_in_parallel(p, argv if argv is not None else sys.argv[1:]))
    results = {s: r for s in a.seeds if (r := run_seed(p, s)) is not None}
    if not results:
        return 0
    report(p, results)
    curves = {s: r["curves"] for s, r in results.items() if "curves" in r}
    if curves:
        plot_curves(curves, p.out / "curve.png")
        print(f"\ncurve: {p.out / 'curve.png'}")
    print(json.dumps({"bench": "proof_learning", "device": device_name(), "commit": commit,
                      "threads": torch.get_num_threads(), "args": vars(a),
                      "split": json.loads((p.data / "split.json").read_text()),
                      "seeds": results,
                      "stages_s": p.timings, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0 if all("held" in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
