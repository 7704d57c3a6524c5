"""HF continuous-batching backend on tiny VLMs: .venv/bin/python -m pytest -q tests/test_backend_hf.py"""
from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from waiting import until

from spyglass.engine.offline import tiny
from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
from spyglass.engine.backends.hf import HFBackend, HFConfig, sample_next

IMG = Image.new("RGB", (200, 120), (10, 200, 30))
IMG2 = Image.new("RGB", (90, 150), (200, 20, 90))
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def vlm():
    return tiny.build_tiny_vlm("qwen2_vl", seed=0)


def _prompt(vlm, text: str, images=()) -> list[int]:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return tiny.encode_chat(vlm.tokenizer, vlm.image_processor, [{"role": "user", "content": content}]).input_ids


def _full_logprobs(vlm, prompt: list[int], images, tokens: list[int], temperature: float) -> list[float]:
    """Reference: one uncached forward over prompt + tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=(ids == vlm.model.config.image_token_id).int(),
                           **tiny.pixel_inputs(vlm.image_processor, list(images))).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:-1] / (temperature or 1.0), -1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist()


async def _until_steps(be: HFBackend, n: int) -> None:
    await until(lambda: be.steps >= n, lambda: f"the backend ran {be.steps} decode steps, waited for {n}")


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_matches_transformers_generate(family):
    v = tiny.build_tiny_vlm(family, seed=0)
    prompt = _prompt(v, "What is this?", [IMG])
    ids = torch.tensor([prompt])
    ref = v.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                           do_sample=False, mm_token_type_ids=(ids == v.model.config.image_token_id).int(),
                           **tiny.pixel_inputs(v.image_processor, [IMG]))[0, len(prompt):].tolist()

    async def go():
        async with HFBackend.from_model(v) as be:
            return await be.generate(GenerateRequest("r", prompt, GREEDY, images=[IMG]))
    out = _run(go())
    assert out.token_ids == ref and out.finish_reason == "length" and out.server == "hf-0"


def test_continuous_batching_matches_solo_runs_and_logprobs(vlm):
    cases = [("a", "What is this?", [IMG]), ("b", "hello there", []), ("c", "two images", [IMG, IMG2]),
             ("d", "a longer question about the sign in the top left corner", [IMG2]), ("e", "x", [])]
    prompts = {rid: (_prompt(vlm, text, ims), ims) for rid, text, ims in cases}

    async def solo():
        async with HFBackend.from_model(vlm) as be:
            return {rid: (await be.generate(GenerateRequest(rid, p, GREEDY, images=ims))).token_ids
                    for rid, (p, ims) in prompts.items()}

    async def staggered():
        async with HFBackend.from_model(vlm) as be:
            async def one(i, rid):
                await asyncio.sleep(0.004 * i)  # arrive while earlier ones are decoding
                p, ims = prompts[rid]
                return await be.generate(GenerateRequest(rid, p, GREEDY, images=ims))
            outs = await asyncio.gather(*(one(i, rid) for i, rid in enumerate(prompts)))
            return {o.request_id: o for o in outs}, be.decode_rows / max(be.steps, 1)
    ref = _run(solo())
    outs, rows_per_step = _run(staggered())
    assert rows_per_step > 1.5  # requests really shared decode steps
    for rid, (p, ims) in prompts.items():
        assert outs[rid].token_ids == ref[rid], rid
        want = _full_logprobs(vlm, p, ims, outs[rid].token_ids, 1.0)
        assert torch.allclose(torch.tensor(outs[rid].logprobs), torch.tensor(want), atol=1e-4), rid


def test_seeded_sampling_is_reproducible_across_batches(vlm):
    p = _prompt(vlm, "sample me", [IMG])
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=123)

    async def go():
        async with HFBackend.from_model(vlm) as be:
            alone = await be.generate(GenerateRequest("a", p, sp, images=[IMG]))
            crowd = await asyncio.gather(
                be.generate(GenerateRequest("b", p, sp, images=[IMG])),
                be.generate(GenerateRequest("c", _prompt(vlm, "other"), SamplingParams(max_tokens=30, seed=5))),
                be.generate(GenerateRequest("d", p, SamplingParams(max_tokens=16, temperature=0.9, seed=124),
                                            images=[IMG])))
            return alone, crowd
    alone, (same, _, other_seed) = _run(go())
    assert alone.token_ids == same.token_ids
    assert alone.token_ids != other_seed.token_ids
    want = _full_logprobs(vlm, p, [IMG], alone.token_ids, 0.9)  # logprobs under logits / T
    assert torch.allclose(torch.tensor(alone.logprobs), torch.tensor(want), atol=1e-4)


def test_forced_ids_stop_tokens_and_lengths(vlm):
    p = _prompt(vlm, "replay", [IMG])

    async def go():
        async with HFBackend.from_model(vlm) as be:
            free = await be.generate(GenerateRequest("f", p, GREEDY, images=[IMG]))
            forced = [50, 77, 300, 12, 9]
            rep = await be.generate(GenerateRequest("r", p, SamplingParams(temperature=0.7), [IMG], forced))
            cut = await be.generate(GenerateRequest("c", p, SamplingParams(max_tokens=3), [IMG], forced))
            stop = free.token_ids[4]
            stopped = await be.generate(GenerateRequest(
                "s", p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]), [IMG]))
            return free, forced, rep, cut, stopped, stop
    free, forced, rep, cut, stopped, stop = _run(go())
    assert rep.token_ids == forced and rep.finish_reason == "stop"
    want = _full_logprobs(vlm, p, [IMG], forced, 0.7)
    assert torch.allclose(torch.tensor(rep.logprobs), torch.tensor(want), atol=1e-4)
    assert cut.token_ids == forced[:3] and cut.finish_reason == "length"
    k = free.token_ids.index(stop)
    assert stopped.token_ids == free.token_ids[:k + 1] and stopped.finish_reason == "stop"


def test_replays_batch_beside_free_rows(vlm):
    """Replays of different lengths (one image row, one text row, one cut by max_tokens) go
    through one teacher-forced forward while a free row decodes; each gets the logprobs of a
    solo forward, and the free row the tokens it gets alone."""
    p1, p2 = _prompt(vlm, "replay one", [IMG]), _prompt(vlm, "a longer text-only replay prompt")
    f1, f2 = [50, 77, 300, 12, 9, 41, 8], [99, 3]

    async def go():
        async with HFBackend.from_model(vlm) as be:
            alone = await be.generate(GenerateRequest("a", p1, GREEDY, images=[IMG]))
        async with HFBackend.from_model(vlm) as be:
            return alone, await asyncio.gather(
                be.generate(GenerateRequest("free", p1, GREEDY, images=[IMG])),
                be.generate(GenerateRequest("r1", p1, SamplingParams(temperature=0.7), [IMG], f1)),
                be.generate(GenerateRequest("r2", p2, SamplingParams(temperature=1.0), [], f2)),
                be.generate(GenerateRequest("r3", p2, SamplingParams(max_tokens=1), [], f1)))
    alone, (free, r1, r2, r3) = _run(go())
    assert free.token_ids == alone.token_ids
    assert (r1.token_ids, r1.finish_reason, r2.token_ids, r2.finish_reason) == (f1, "stop", f2, "stop")
    assert (r3.token_ids, r3.finish_reason) == (f1[:1], "length")
    for out, prompt, ims, t in ((r1, p1, [IMG], 0.7), (r2, p2, [], 1.0), (r3, p2, [], 0.7)):
        want = _full_logprobs(vlm, prompt, ims, out.token_ids, t)
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(want), atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prefix_cache_matches_cold_prefill(family):
    """Turn 2 extends turn 1's prompt + output with an observation holding a new image: with the
    prefix cache only the new tokens and the new image are prefilled, and the tokens and logprobs
    are those of a cold prefill; a weight update empties the cache."""
    v = tiny.build_tiny_vlm(family, seed=0)
    p1 = _prompt(v, "look", [IMG])
    obs = _prompt(v, "then this", [IMG2])
    sp = SamplingParams(max_tokens=10, temperature=0.8, seed=3)

    async def go(cache: int):
        async with HFBackend.from_model(v, prefix_cache_tokens=cache) as be:
            first = await be.generate(GenerateRequest("t1", p1, sp, images=[IMG]))
            p2 = p1 + first.token_ids + obs
            second = await be.generate(GenerateRequest("t2", p2, sp, images=[IMG, IMG2]))
            stats = (be.prefix_hits, be.prefix_tokens_reused)
            await be.update_weights(v.model.state_dict(), 1)
            third = await be.generate(GenerateRequest("t3", p2, sp, images=[IMG, IMG2]))
            hits_after = be.prefix_hits
            f, g = [50, 77, 300, 12], [9, 41, 8]  # replayed turns keep their KV too
            r1 = await be.generate(GenerateRequest("r1", p1, sp, [IMG], f))
            r2 = await be.generate(GenerateRequest("r2", p1 + f + obs, sp, [IMG, IMG2], g))
            return first, second, third, r1, r2, stats, hits_after, be.prefix_hits
    *warm, stats, hits_after, hits_end = _run(go(1 << 16))
    *cold, cold_stats, _, cold_hits = _run(go(0))
    # r1's prompt p1 is a prefix of what t3 kept (all but its last token is reused), r2 extends r1
    assert stats == (1, len(p1) + len(warm[0].token_ids) - 1) and hits_after == 1 and hits_end == 3
    assert cold_stats == (0, 0) and cold_hits == 0
    for a, b in zip(warm, cold):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_prefix_cache_is_bounded_and_text_models_use_it():
    """A text model hits the cache too; a kept prefix that a new one extends is dropped, the least
    recently used is evicted past the budget, and a row longer than the budget is not kept (12
    greedy tokens a request: a row keeps prompt + 11)."""
    async def go(cache: int):
        async with HFBackend.from_config(HFConfig(model="tiny:qwen2", prefix_cache_tokens=cache)) as be:
            a = await be.generate(GenerateRequest("a", [5] * 40, GREEDY))                # keeps 51
            b = await be.generate(GenerateRequest("b", [5] * 40 + a.token_ids + [7, 8], GREEDY))  # hit; 65 replaces a
            sizes = [be._prefix_size]
            c = await be.generate(GenerateRequest("c", [6] * 40, GREEDY))                # keeps 51: evicts b
            e = await be.generate(GenerateRequest("e", [9] * 45, GREEDY))                # keeps 56: evicts c
            sizes.append(be._prefix_size)
            f = await be.generate(GenerateRequest("f", [9] * 45 + e.token_ids + [3], GREEDY))  # hit; 69 replaces e
            d = await be.generate(GenerateRequest("d", [6] * 40 + c.token_ids, GREEDY))  # miss; 63 evicts f
            g = await be.generate(GenerateRequest("g", [4] * 95, GREEDY))                # 106: not kept
            sizes.append(be._prefix_size)
            return [x.token_ids for x in (b, d, f, g)], be.prefix_hits, sizes
    warm, cold = _run(go(100)), _run(go(0))
    assert warm[1:] == (2, [65, 56, 63]) and cold[1] == 0
    assert warm[0] == cold[0]
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        HFConfig(prefix_cache_tokens=-1)
    # the default budget is 1 GiB of the model's KV (K and V, every layer, fp32)
    v = tiny.build_tiny_vlm("qwen2_vl", seed=0)
    c = v.model.config.get_text_config()
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert (HFBackend.from_model(v).prefix_cache_tokens, HFConfig().prefix_cache_tokens) == ((1 << 30) // per_token, None)


def test_prefix_cache_shares_a_common_prefix_but_never_another_image(vlm):
    """Requests that share only a long system prompt reuse it; a prompt whose tokens equal a kept
    one's but whose image differs (same size: same placeholder tokens) reuses only up to that
    image; a sibling with the same prompt reuses all but its last token. Outputs equal a cold
    backend's."""
    system = "you are a careful visual search agent; think, then call tools, then answer. " * 3
    other = Image.new("RGB", IMG.size, (240, 240, 240))   # IMG's size: the same image tokens
    def prompt(text, images):
        content = [{"type": "text", "text": system}] + [{"type": "image", "image": im} for im in images] + \
                  [{"type": "text", "text": text}]
        return tiny.encode_chat(vlm.tokenizer, vlm.image_processor, [{"role": "user", "content": content}]).input_ids
    p1, p2, p3 = prompt("what is written here?", [IMG]), prompt("what colour is it?", [IMG2]), \
        prompt("what is written here?", [other])
    first_image = p1.index(vlm.model.config.image_token_id)
    assert p1 == p3 and first_image == p2.index(vlm.model.config.image_token_id) >= 32
    sp = SamplingParams(max_tokens=6, temperature=0.9, seed=5)

    async def go(cache):
        async with HFBackend.from_model(vlm, prefix_cache_tokens=cache) as be:
            outs, reused = [], []
            for rid, p, ims in (("a", p1, [IMG]), ("b", p2, [IMG2]), ("c", p3, [other]), ("d", p1, [IMG])):
                before = be.prefix_tokens_reused
                outs.append(await be.generate(GenerateRequest(rid, p, sp, images=ims)))
                reused.append(be.prefix_tokens_reused - before)
            return outs, reused
    (warm, reused), (cold, none) = _run(go(1 << 16)), _run(go(0))
    assert reused == [0, first_image, first_image, len(p1) - 1] and none == [0] * 4
    for a, b in zip(warm, cold):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_forced_id_outside_vocab_is_named(vlm):
    async def go():
        async with HFBackend.from_model(vlm) as be:
            await be.generate(GenerateRequest("bad", [1, 2], SamplingParams(), forced_ids=[5, 10**6]))
    with pytest.raises(ValueError, match="forced token id 1000000"):
        _run(go())


def test_abort_pending_inflight_and_cancelled(vlm):
    p = _prompt(vlm, "long", [IMG])
    long = SamplingParams(max_tokens=2000, temperature=1.0, seed=1)

    async def go():
        be = HFBackend.from_model(vlm, max_batch=1)  # the second request waits in the queue
        t1 = asyncio.ensure_future(be.generate(GenerateRequest("run", p, long, images=[IMG])))
        t2 = asyncio.ensure_future(be.generate(GenerateRequest("wait", p, long, images=[IMG])))
        await _until_steps(be, 5)
        await be.abort("wait")
        await be.abort("run")
        await be.abort("nobody")  # unknown ids are a no-op
        a, b = await t1, await t2
        # this seed's sample ends (EOS) at token 33, ~35 ms with the prompt's KV cached: cancel after
        # two decode steps, not after a fixed sleep, or a fast machine finishes it first
        before = be.steps
        t3 = asyncio.ensure_future(be.generate(GenerateRequest("cancel", p, long, images=[IMG])))
        await _until_steps(be, before + 2)
        assert not t3.done()
        t3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t3
        await asyncio.sleep(0.05)
        rows = len(be._rows)
        ok = await be.generate(GenerateRequest("after", p, GREEDY, images=[IMG]))
        await be.close()
        return a, b, rows, ok
    a, b, rows, ok = _run(go())
    assert a.finish_reason == "abort" and 3 <= len(a.token_ids) < 2000 and len(a.logprobs) == len(a.token_ids)
    assert b.finish_reason == "abort" and b.token_ids == []
    assert rows == 0 and ok.finish_reason == "length"


def test_update_weights_state_dict_and_checkpoint(vlm, tmp_path):
    p = _prompt(vlm, "weights", [IMG])
    other = tiny.build_tiny_vlm("qwen2_vl", seed=7)
    ckpt = other.save(tmp_path / "ckpt")

    async def go():
        be = HFBackend.from_model(tiny.build_tiny_vlm("qwen2_vl", seed=0))
        before = await be.generate(GenerateRequest("a", p, GREEDY, images=[IMG]))
        await be.update_weights({k: v.clone() for k, v in other.model.state_dict().items()}, version=1)
        after = await be.generate(GenerateRequest("b", p, GREEDY, images=[IMG]))
        await be.update_weights({k: v.clone() for k, v in vlm.model.state_dict().items()}, version=2)
        back = await be.generate(GenerateRequest("c", p, GREEDY, images=[IMG]))
        await be.update_weights(str(ckpt), version=3)
        disk = await be.generate(GenerateRequest("d", p, GREEDY, images=[IMG]))
        with pytest.raises(KeyError, match="unknown parameter"):
            await be.update_weights({"no.such.weight": torch.zeros(1)}, version=4)
        with pytest.raises(ValueError, match="version"):
            await be.update_weights({}, version=1)
        await be.close()
        return before, after, back, disk
    before, after, back, disk = _run(go())
    assert before.version == 0 and after.version == 1 and disk.version == 3
    assert before.token_ids != after.token_ids
    assert back.token_ids == before.token_ids and disk.token_ids == after.token_ids


def test_bad_requests_and_closed_backend(vlm):
    p = _prompt(vlm, "bad", [IMG])

    async def go():
        be = HFBackend.from_model(vlm)
        with pytest.raises(ValueError, match="image tokens"):
            await be.generate(GenerateRequest("x", p, GREEDY, images=[IMG2]))
        with pytest.raises(ValueError, match="vocab size"):
            await be.generate(GenerateRequest("y", [10**6], GREEDY))
        assert await be.health()
        await be.close()
        assert not await be.health()
        with pytest.raises(BackendError, match="closed"):
            await be.generate(GenerateRequest("z", p, GREEDY, images=[IMG]))
    _run(go())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        GenerateRequest("q", [1, -2])
    with pytest.raises(ValueError, match="family"):
        HFConfig(model="llama")


def test_text_only_backend_from_config():
    async def go():
        async with HFBackend.from_config(HFConfig(model="tiny:qwen2", name="txt")) as be:
            with pytest.raises(ValueError, match="does not take images"):
                await be.generate(GenerateRequest("i", [1, 2], GREEDY, images=[IMG]))
            outs = await asyncio.gather(*(be.generate(GenerateRequest(f"t{i}", [3 + i] * (i + 1), GREEDY))
                                          for i in range(4)))
            solo = await be.generate(GenerateRequest("solo", [3 + 3] * 4, GREEDY))
            return outs, solo
    outs, solo = _run(go())
    assert outs[3].token_ids == solo.token_ids and all(o.server == "txt" for o in outs)


def test_sample_next_filters_and_inverse_cdf():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    n = 1000
    u = (torch.arange(n) + 0.5) / n
    temp, off = torch.ones(n), torch.full((n,), -1)
    counts = torch.bincount(sample_next(logits[:1].expand(n, 4), temp, off, torch.ones(n), u, off)[0], minlength=4)
    assert counts.tolist() == [500, 300, 150, 50]
    top2 = sample_next(logits[:1].expand(n, 4), temp, torch.full((n,), 2), torch.ones(n), u, off)[0]
    assert torch.bincount(top2, minlength=4).tolist() == [625, 375, 0, 0]
    topp = sample_next(logits[:1].expand(n, 4), temp, off, torch.full((n,), 0.7), u, off)[0]
    assert set(topp.tolist()) == {0, 1}
    tok, lp = sample_next(logits, torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.full((4,), -1), torch.ones(4),
                          torch.full((4,), 0.99), torch.tensor([-1, -1, 2, 3]))
    assert tok.tolist() == [0, 3, 2, 3]
    assert torch.allclose(lp[:3], torch.log(torch.tensor([0.5, 0.05, 0.15])), atol=1e-5)
    assert torch.allclose(lp[3], torch.log_softmax(logits[0] / 2, -1)[3])
