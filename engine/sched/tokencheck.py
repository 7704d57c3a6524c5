"""The token-in/token-out check of a finished trajectory (EngineConfig.check_tokens).

The accumulated ids must equal a fresh tokenization of the conversation, where the codec can
say (`codec.retokenize`); a model may sample a non-canonical tokenization of its own text: that
counts as a mismatch, not an error, unless strict.

    check_tokens(codec, traj, schemas, engine.stats.token_check)   # counts ok | mismatch | unsupported
"""
from __future__ import annotations

import collections
from typing import Any

from ..trajectory import SegmentKind, Trajectory


def check_tokens(codec: Any, t: Trajectory, schemas: list[dict], counts: collections.Counter,
                 strict: bool = False) -> str:
    """Compare `t`'s ids with the codec's fresh tokenization and count the verdict in `counts`;
    with strict, a mismatch raises (after it is counted). Returns the verdict."""
    if getattr(codec, "retokenize", None) is None:
        counts["unsupported"] += 1
        return "unsupported"
    got, fresh = t.token_ids(), _fresh(codec, t, schemas)
    verdict = "ok" if fresh == got else "mismatch"
    counts[verdict] += 1
    if verdict == "mismatch" and strict:
        i = next((i for i, (a, b) in enumerate(zip(got, fresh)) if a != b), min(len(got), len(fresh)))
        raise AssertionError(f"trajectory {t.id}: accumulated ids differ from a fresh tokenization "
                             f"at position {i} (lengths {len(got)} vs {len(fresh)})")
    return verdict


def _fresh(codec: Any, t: Trajectory, schemas: list[dict]) -> list[int]:
    """The codec's tokenization of `t`'s conversation from its text and images."""
    turns: list[tuple[str, str | None, list]] = []
    for s in t.segments:
        if s.kind is SegmentKind.GEN:
            ids = s.token_ids[:-1] if len(s.token_ids) and s.token_ids[-1] in codec.stop_token_ids \
                else s.token_ids
            turns.append((codec.decode(ids), None, []))
        else:
            said = turns.pop()[0]
            turns.append((said, s.text, s.images))
    question = t.prompt_messages[0]["content"] if t.prompt_messages else ""
    return codec.retokenize(question, t.prompt_images, schemas, turns, system=t.meta.get("system"))
