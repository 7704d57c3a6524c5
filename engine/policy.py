"""Turn policies: who decides what a turn generates.

The RL policy is the backend's sampler (policy=None in the Engine). A ReplayPolicy drives the
backend with forced decoding of scripted agent turns: the backend still runs its real forward
passes (generation cost is real, logprobs are the model's), but the emitted tokens are the
script's, so a random-weight tiny model produces well-formed tool calls and the tools really
run. Used by `spyglass bench rollout` until a trained tiny checkpoint exists.

    policy = ReplayPolicy(codec, {"q1": ["<think>..</think><tool_call>{..}</tool_call>", ...]})
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

from .chat import Codec
from .trajectory import Trajectory, Turn


@dataclass
class ReplayPolicy:
    """Forced decoding of a script per prompt (group id); past the script it answers.

    A turn whose tool calls all failed transiently (the world failed, e.g. engine/faults.py) is
    retried: the next turn re-emits the same script turn instead of advancing, so the script
    index of turn t is t minus the earlier turns that failed that way. Any other error (bad
    arguments, fatal, a format error) advances as a success does."""

    codec: Codec
    scripts: dict[str, list[str]]
    fallback_answer: str = "<answer>unknown</answer>"
    _cache: dict[tuple[str, int], array] = field(default_factory=dict, repr=False)  # (group id, script index)

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int]:
        step = turn - sum(1 for t in traj.turns[:turn] if all_transient(t))
        key = (traj.group_id, step)
        ids = self._cache.get(key)
        if ids is None:
            script = self.scripts.get(traj.group_id)
            if script is None:
                raise KeyError(f"ReplayPolicy has no script for prompt {traj.group_id!r}")
            text = script[step] if step < len(script) else self.fallback_answer
            out = self.codec.encode_text(text) + [self.codec.stop_token_ids[0]]
            self._cache[key] = array("I", out)  # compact, its ints not walked by the cyclic GC
            return out
        return ids.tolist()

    @property
    def name(self) -> str:
        return "replay (forced decoding of scripted turns)"


def all_transient(turn: Turn) -> bool:
    """Whether every tool call of `turn` failed transiently (and nothing else went wrong): a
    turn to retry as it was."""
    errs = turn.tool_errors
    return (bool(turn.calls) and len(errs) == len(turn.calls) and not turn.parse_errors
            and all(e.get("kind") == "transient" for e in errs))


@dataclass
class MixedPolicy:
    """The first `replay_per_group` samples of each group replay their script (demonstrations
    with the model's real logprobs); the others are sampled by the model. On a tiny random
    model this gives GRPO groups with reward variance, hence a learning signal, on CPU."""

    replay: ReplayPolicy
    replay_per_group: int = 1

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int] | None:
        return self.replay.forced_ids(traj, turn) if traj.sample_index < self.replay_per_group else None

    @property
    def name(self) -> str:
        return f"mixed ({self.replay_per_group} replayed per group, the rest sampled)"


def script_turns(calls: list[tuple[str, dict[str, Any]]], answer: str, think: str = "",
                 evidence: str = "") -> list[str]:
    """Agent turns for a scripted episode: one tool call per turn, then the answer. `evidence`
    (the page's line the answer rests on, e.g. "founded: 1626") is quoted in the answer turn's
    thought, so the answer is a copy of what the thought just quoted."""
    import json
    turns = []
    for i, (name, args) in enumerate(calls):
        payload = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        t = think or f"Step {i + 1}: I will use {name}."
        turns.append(f"<think>{t}</think>\n<tool_call>{payload}</tool_call>")
    t = f"The page says {evidence}." if evidence else "I have what I need."
    turns.append(f"<think>{t}</think>\n<answer>{answer}</answer>")
    return turns
