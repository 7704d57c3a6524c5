"""A copy curriculum: text-only SFT records that teach a small model to copy unseen strings.

The agent's decisive tokens are copies: the text OCR read goes into a TextSearch query, the URL
a search returned goes into Visit, the field a page lists goes into the answer. A tiny model
fine-tuned on a few thousand teacher trajectories learns the protocol but memorizes the names
it saw instead of copying (benchmarks/README.md, "Training works"). These records drill the
copies with names never seen before (drawn from the world's name generator under another seed),
in the tools' own observation layouts: an optional OCR observation, a TextSearch result, a Visit
page of `- field: value` lines, then the answer. Mixed into SFT data (ShareGPT, `spyglass sft`
reads it), with no images.

    write_copy_curriculum("runs/copy.sharegpt.jsonl", n=2000, seed=1)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from spyglass.engine.chat import DEFAULT_SYSTEM
from spyglass.engine.offline.world import ENTITY_KINDS, FACT_FIELDS, _Namer

FIELDS = tuple(dict.fromkeys(f for fields in FACT_FIELDS.values() for f in fields))  # the world's infobox fields
KINDS = ENTITY_KINDS


def _call(step: int, tool: str, args: dict[str, Any]) -> str:
    return f"<think>Step {step}: I will use {tool}.</think>" + json.dumps({"name": tool, "arguments": args})


def copy_record(rng: random.Random, namer: _Namer, i: int, system: str = DEFAULT_SYSTEM) -> dict[str, Any]:
    """One ShareGPT record: (OCR ->) TextSearch(name) -> Visit(url, goal) -> answer(value)."""
    def name() -> str:
        return namer.unique(lambda: namer.word() + (" " + namer.word() if rng.random() < 0.7 else ""))

    def value(f: str) -> str:
        if f in ("born", "founded", "released"):
            return str(rng.randint(1800, 2020))
        return str(rng.randint(1000, 900000)) if f == "population" else name()

    ent, kind = name(), rng.choice(KINDS)
    url = f"corpus://{kind}-{rng.randint(0, 999):03d}"
    facts = {f: value(f) for f in rng.sample(FIELDS, 4)}
    goal = rng.choice(sorted(facts))
    conv: list[dict[str, str]] = []
    step = 1
    if rng.random() < 0.5:  # the name is read off an image first
        other = name()
        lines = [ent, other] if rng.random() < 0.5 else [other, ent]
        blocks = "".join(f"[{j + 1}] ({rng.randint(50, 300)},{80 + 50 * j},{rng.randint(400, 600)},{110 + 50 * j}) "
                         f"{rng.choice(['0.99', '1.00'])}  {line}\n" for j, line in enumerate(lines))
        conv += [{"from": "human", "value": f"What is the {goal} of the entity named on the "
                                            f"{['first', 'second'][lines.index(ent)]} line?"},
                 {"from": "function_call", "value": _call(1, "OCR", {"image": "img_1"})},
                 {"from": "observation", "value": "OCR of img_1 (640x420) (rapidocr (PP-OCR ONNX)): 2 text block(s) "
                                                  "in 2 line(s), reading order; boxes are (x1,y1,x2,y2) pixels of "
                                                  f"img_1:\n{blocks}Text:\n" + "\n".join(lines)}]
        step = 2
    else:
        conv.append({"from": "human", "value": f"What is the {goal} of {ent}?"})
    page = "\n".join(f"- {f}: {v}" for f, v in sorted(facts.items()))
    conv += [{"from": "function_call", "value": _call(step, "TextSearch", {"query": ent, "top_k": 1})},
             {"from": "observation", "value": f"Results for '{ent}':\n1. {ent}\n   URL: {url}\n   {ent} is a {kind} "
                                              "in the archives."},
             {"from": "function_call", "value": _call(step + 1, "Visit", {"url": url, "goal": goal})},
             {"from": "observation", "value": f"Title: {ent}\nURL: {url}\nPassages relevant to the goal '{goal}':"
                                              f"\n\n{page}"},
             {"from": "gpt", "value": f"<think>I have what I need.</think>\n<answer>{facts[goal]}</answer>"}]
    return {"id": f"copy-{i}", "system": system, "tools": "[]", "images": [], "conversations": conv,
            "meta": {"answer": facts[goal], "curriculum": "copy"}}


def write_copy_curriculum(path: str | Path, n: int, seed: int = 1, system: str = DEFAULT_SYSTEM) -> Path:
    """Write `n` copy records (ShareGPT JSONL) to `path`; seeded."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    rng = random.Random(seed)
    namer = _Namer(random.Random(seed + 7919))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(copy_record(rng, namer, i, system)) + "\n")
    return path
