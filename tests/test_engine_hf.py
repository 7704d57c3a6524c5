"""The engine end to end on the embedded default backend: a tiny Qwen2-VL on CPU, real forward
passes under forced replay, images returned by tools joining the context, and the
token-in/token-out invariant checked strictly against a fresh tokenization."""
import asyncio
import json

import pytest
from PIL import Image

from spyglass.engine.backends.hf import HFBackend
from spyglass.engine.chat import HFCodec
from spyglass.engine.policy import ReplayPolicy, script_turns
from spyglass.engine.scheduler import Engine, EngineConfig, Prompt, ToolOutcome
from spyglass.engine.offline.tiny import build_tiny_vlm
from spyglass.engine.trajectory import SegmentKind, Status

from test_scheduler import parse  # the minimal test parser

TOOLS = [{"type": "function", "function": {"name": "crop", "description": "crop a box",
                                           "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm("qwen2_vl", seed=0)


async def crop_tool(calls, traj):
    out = []
    for c in calls:
        box = json.loads(c["arguments"])["box"]
        img = traj.images()[0].crop(tuple(box))
        out.append(ToolOutcome(f"cropped {box}", images=[img]))
    return out


def test_images_in_context_and_token_invariant(vlm) -> None:
    codec = HFCodec.from_model(vlm)
    backend = HFBackend.from_model(vlm, max_batch=8)
    scripts = {f"q{i}": script_turns([("crop", {"box": [0, 0, 56 + 28 * i, 56]}),
                                      ("crop", {"box": [28, 0, 84, 56]})], f"a{i}") for i in range(2)}
    cfg = EngineConfig(n_samples=2, max_images_per_obs=1, check_tokens=True, strict_tokens=True)
    engine = Engine(cfg, [backend], codec, crop_tool, parse, tool_schemas=TOOLS,
                    policy=ReplayPolicy(codec, scripts), image_tokens=codec.image_tokens)
    prompts = [Prompt(f"q{i}", "What does the sign say?", images=[Image.new("RGB", (112, 84), "blue")])
               for i in range(2)]

    async def main():
        try:
            return [g async for g in engine.run(prompts)]
        finally:
            await backend.close()

    groups = asyncio.run(main())
    assert engine.stats.token_check["ok"] == 4 and not engine.stats.token_check["mismatch"]
    for g in groups:
        for t in g:
            assert t.status is Status.ANSWERED and t.answer == f"a{t.group_id[1:]}"
            assert len(t.images()) == 3  # img_1 + one crop per tool turn
            obs = [s for s in t.segments if s.kind is SegmentKind.OBS]
            assert "img_2" in obs[0].text and "img_3" in obs[1].text
            pad = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            assert t.token_ids().count(pad) == sum(codec.image_tokens(im) for im in t.images())
            gen = [s for s in t.segments if s.kind is SegmentKind.GEN]
            assert all(s.version == 0 and all(lp <= 0 for lp in s.logprobs) for s in gen)


def test_image_budget_omits_images(vlm) -> None:
    codec = HFCodec.from_model(vlm)
    backend = HFBackend.from_model(vlm)
    scripts = {"q": script_turns([("crop", {"box": [0, 0, 112, 84]})], "a")}
    big = Image.new("RGB", (112, 84), "red")
    cfg = EngineConfig(n_samples=1, max_image_tokens=codec.image_tokens(big) + 1)
    engine = Engine(cfg, [backend], codec, crop_tool, parse, tool_schemas=TOOLS,
                    policy=ReplayPolicy(codec, scripts), image_tokens=codec.image_tokens)

    async def main():
        try:
            return [g async for g in engine.run([Prompt("q", "?", images=[big])])]
        finally:
            await backend.close()

    (g,) = asyncio.run(main())
    t = g[0]
    assert len(t.images()) == 1 and "image budget" in t.segments[1].text


def test_an_image_the_model_cannot_take_is_omitted_not_fatal(vlm) -> None:
    """A 448x1 crop (aspect ratio 448 > Qwen2-VL's 200): the processor cannot size it; the
    observation says so and the rollout goes on (it once stopped a whole GRPO run)."""
    codec = HFCodec.from_model(vlm)
    backend = HFBackend.from_model(vlm)
    scripts = {"q": script_turns([("crop", {"box": [0, 0, 448, 1]}), ("crop", {"box": [0, 0, 56, 56]})], "a")}
    engine = Engine(EngineConfig(n_samples=1, check_tokens=True, strict_tokens=True), [backend], codec, crop_tool,
                    parse, tool_schemas=TOOLS, policy=ReplayPolicy(codec, scripts), image_tokens=codec.image_tokens)

    async def main():
        try:
            return [g async for g in engine.run([Prompt("q", "?", images=[Image.new("RGB", (448, 84), "red")])])]
        finally:
            await backend.close()

    (g,) = asyncio.run(main())
    t = g[0]
    obs = [s.text for s in t.segments if s.kind is SegmentKind.OBS]
    assert t.status is Status.ANSWERED and t.answer == "a"
    assert "448x1" in obs[0] and "the model cannot take it" in obs[0] and "aspect ratio" in obs[0]
    assert len(t.images()) == 2 and "img_2" in obs[1]  # the next crop is img_2: names stay in order
