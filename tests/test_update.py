"""PolicyUpdater on tiny VLMs: .venv/bin/python -m pytest -q tests/test_update.py

Trajectories are built by hand (prompt with an image, GEN / OBS segments, an observation image)
and their "sampled" log-probs come from a plain full forward of the same model, so the first
update is exactly on-policy (importance ratio 1).
"""
from __future__ import annotations

import copy
from array import array
from functools import lru_cache

import pytest
import torch
from PIL import Image

from spyglass.engine.offline import tiny
from spyglass.engine.trajectory import Segment, Trajectory
from spyglass.kernels.policy_loss import PolicyLossConfig
from spyglass.trainer.update import NonFiniteError, PolicyUpdater, UpdateConfig

IMG = Image.new("RGB", (80, 60), (200, 10, 10))
IMG2 = Image.new("RGB", (60, 90), (10, 10, 200))


@lru_cache(maxsize=None)
def _base(family: str) -> tiny.TinyVLM:
    return tiny.build_tiny_vlm(family, seed=0)


def fresh(family: str = "qwen2_vl") -> tiny.TinyVLM:
    """A private copy of the seeded tiny VLM (training mutates it)."""
    v = _base(family)
    return tiny.TinyVLM(family, copy.deepcopy(v.model), v.tokenizer, v.processor)


def token_ids(traj: Trajectory) -> list[int]:
    """The whole context (as Trajectory.token_ids(), built here from the parts)."""
    return list(traj.prompt_ids) + [x for s in traj.segments for x in s.token_ids]


def full_logprobs(v: tiny.TinyVLM, traj: Trajectory, temperature: float = 1.0) -> list[float]:
    """Reference: one plain forward over the whole trajectory -> log p(token_t | < t) ([L])."""
    ids = torch.tensor([token_ids(traj)])
    with torch.no_grad():
        logits = v.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         mm_token_type_ids=(ids == v.model.config.image_token_id).int(),
                         **tiny.pixel_inputs(v.image_processor, traj.images())).logits[0]
    lp = torch.log_softmax(logits[:-1].float() / temperature, -1).gather(1, ids[0, 1:, None])[:, 0]
    return [0.0] + lp.tolist()


def make_traj(v: tiny.TinyVLM, i: int, images: bool = True, versions: tuple[int, int] = (0, 0),
              temperature: float = 1.0) -> Trajectory:
    """prompt (+image) / GEN think+call / OBS tool result (+image) / GEN answer, on-policy logprobs."""
    tok = v.tokenizer
    content = ([{"type": "image", "image": IMG}] if images else []) + [{"type": "text", "text": f"what is {i}?"}]
    enc = tiny.encode_chat(tok, v.image_processor, [{"role": "user", "content": content}])
    g1 = tok(f"<think>look at {i} here</think><tool_call>crop</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    obs_content = ([{"type": "image", "image": IMG2}] if images else []) + [{"type": "text", "text": f"ok {i}"}]
    obs = tiny.encode_observation(tok, v.image_processor, [{"role": "tool", "content": obs_content}])
    g2 = tok(f"<answer>red {i}</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    segs = [Segment("gen", g1, 0, logprobs=[0.0] * len(g1), version=versions[0]),
            Segment("obs", obs.input_ids, 0, images=obs.images),
            Segment("gen", g2, 1, logprobs=[0.0] * len(g2), version=versions[1])]
    t = Trajectory(f"t{i}", "g0", i, enc.input_ids, prompt_images=enc.images, segments=segs)
    lp = full_logprobs(v, t, temperature)
    pos = len(t.prompt_ids)
    for s in t.segments:
        if s.kind.value == "gen":
            s.logprobs = array("d", lp[pos:pos + len(s.token_ids)])
        pos += len(s.token_ids)
    return t


def make_batch(v: tiny.TinyVLM, n: int = 4, text_only: tuple[int, ...] = (1,)):
    trajs = [make_traj(v, i, images=i not in text_only) for i in range(n)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25][:n])
    masks = [torch.tensor(t.loss_mask()) for t in trajs]
    return trajs, adv, masks


def seq_logprob(v: tiny.TinyVLM, traj: Trajectory) -> float:
    lp = full_logprobs(v, traj)
    return sum(x for x, m in zip(lp, traj.loss_mask()) if m)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.state_dict().items()}


@pytest.mark.parametrize("attention", ["padded", "packed"])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_recomputed_logprobs_match_sampling_policy(family, attention):
    """Padded and packed (one row, positions restarting per sequence: a block-diagonal causal
    mask under SDPA, varlen under flash-attn) both give the log-probs of a plain forward."""
    v = fresh(family)
    trajs, adv, masks = make_batch(v)
    # small micro-batches: several forwards, one with a text-only trajectory; packed: several
    # sequences share a row (micro_batch_tokens fits two or three)
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-4, micro_batch_tokens=120 if attention == "padded" else 300,
                                             attention=attention), image_processor=v.image_processor)
    assert up.packed == (attention == "packed")
    m = up.step(trajs, adv, masks)
    assert m["micro_batches"] >= (2 if attention == "padded" else 1)
    assert m["loss_tokens"] == sum(int(x.sum()) for x in masks)
    assert abs(m["ratio_min"] - 1) < 1e-4 and abs(m["ratio_max"] - 1) < 1e-4, m
    assert m["approx_kl"] < 1e-7 and m["clip_fraction"] == 0.0
    assert m["version"] == 1 and up.version == 1


def test_training_moves_logprobs_with_the_advantage():
    v = fresh()
    trajs, adv, masks = make_batch(v)
    before = weights(v.model)
    lp0 = [seq_logprob(v, t) for t in trajs]
    # lr 1e-3: at 3e-3 Adam's first steps from a random init overshoot and the sums oscillate
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3, micro_batch_tokens=200), image_processor=v.image_processor)
    for _ in range(4):
        m = up.step(trajs, adv, masks)
        assert all(torch.isfinite(torch.tensor(x)) for x in m.values()), m
    assert any(not torch.equal(before[k], p) for k, p in weights(v.model).items())
    lp1 = [seq_logprob(v, t) for t in trajs]
    d = [b - a for a, b in zip(lp0, lp1)]
    assert d[0] > 0.5 and d[2] > 0  # positive advantages
    assert d[1] < -0.5  # the strongly negative one
    # the four share most tokens (the sum of the advantages, +0.5, pulls the shared ones up):
    # what tells them apart moves with each trajectory's own advantage
    assert d[0] > d[2] > d[3] and d[0] > d[1], d


def test_lr_warmup_scales_the_first_updates():
    """warmup_steps=4: lr/4, 2lr/4, 3lr/4, then lr; Adam's first step moves each weight by about
    the lr itself, so the first update's largest weight change is the warmed-up lr; a restored
    updater continues the schedule from its step counter."""
    lrs, moved = [], []
    for warm in (0, 4):
        v = fresh()
        trajs, adv, masks = make_batch(v)
        up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3, warmup_steps=warm), image_processor=v.image_processor)
        before = weights(v.model)
        lrs.append([up.step(trajs, adv, masks)["lr"]])
        moved.append(max((p - before[k]).abs().max().item() for k, p in weights(v.model).items()))
        lrs[-1] += [up.step(trajs, adv, masks)["lr"] for _ in range(4)]
        if warm:
            again = PolicyUpdater(fresh().model, UpdateConfig(lr=1e-3, warmup_steps=warm), image_processor=v.image_processor)
            again.load_state_dict({"steps": 2, "version": 2})
            assert again.lr() == pytest.approx(7.5e-4)
    assert lrs[0] == [1e-3] * 5
    assert lrs[1] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert moved[0] == pytest.approx(1e-3, rel=0.05) and moved[1] == pytest.approx(2.5e-4, rel=0.05), moved
    with pytest.raises(ValueError, match="warmup_steps must be"):
        UpdateConfig(warmup_steps=-1)


def test_freeze_vision_keeps_the_tower():
    v = fresh()
    trajs, adv, masks = make_batch(v)
    before = weights(v.model)
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3, freeze_vision=True), image_processor=v.image_processor)
    up.step(trajs, adv, masks)
    changed = {k for k, p in weights(v.model).items() if not torch.equal(before[k], p)}
    assert changed and not any(".visual." in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("model.language_model.") for k in changed)
    lm = tiny.build_tiny_text_lm().model
    with pytest.raises(ValueError, match="freeze_vision=True but .* has no vision tower"):
        PolicyUpdater(lm, UpdateConfig(freeze_vision=True))


def _one_step(v, trajs, adv, masks, **cfg) -> dict[str, torch.Tensor]:
    """Weights after one update. Adam with eps=1 makes the first step ~lr*grad (no sign(grad)
    amplification of float noise in near-zero gradients), so weights compare gradients."""
    cfg = {"lr": 1.0, "eps": 1.0, "grad_clip": 0.0, **cfg}
    up = PolicyUpdater(v.model, UpdateConfig(**cfg), image_processor=v.image_processor)
    up.step(trajs, adv, masks)
    return weights(v.model)


def test_masked_tokens_contribute_no_gradient():
    v = fresh()
    trajs, adv, _ = make_batch(v)
    # mask the final answer segment of every trajectory (it is last: nothing attends to it)
    masks = [torch.tensor(t.loss_mask()) for t in trajs]
    for t, m in zip(trajs, masks):
        m[-len(t.segments[-1].token_ids):] = 0
    ref = _one_step(fresh(), trajs, adv, masks)
    garbled = [copy.deepcopy(t) for t in trajs]
    for t in garbled:  # other tokens and absurd sampled log-probs under the mask
        s = t.segments[-1]
        s.token_ids = array(s.token_ids.typecode, [(x * 7 + 3) % 700 + 10 for x in s.token_ids])
        s.logprobs = array("d", [-40.0] * len(s.token_ids))
    got = _one_step(fresh(), garbled, adv, masks)
    assert all(torch.allclose(ref[k], got[k], atol=1e-7, rtol=0) for k in ref)
    unmasked = _one_step(fresh(), garbled, adv, [torch.tensor(t.loss_mask()) for t in garbled])
    assert any(not torch.allclose(ref[k], unmasked[k], atol=1e-6) for k in ref)  # the check can fail


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_update(agg):
    loss = PolicyLossConfig(agg=agg, norm_length=64 if agg.endswith("norm") else None)
    v = fresh()
    trajs, adv, masks = make_batch(v, n=5)
    one = _one_step(fresh(), trajs, adv, masks, micro_batch_tokens=4096, loss=loss)
    many = _one_step(fresh(), trajs, adv, masks, micro_batch_tokens=100, loss=loss)
    assert all(torch.allclose(one[k], many[k], atol=1e-6, rtol=1e-4) for k in one)
    base = weights(fresh().model)
    assert max((one[k] - base[k]).abs().max() for k in one) > 1e-3  # the update is not negligible


def test_staleness_bound_masks_old_segments():
    v = fresh()
    trajs = [make_traj(v, 0, versions=(1, 3)), make_traj(v, 2, versions=(3, 3))]
    masks = [torch.tensor(t.loss_mask()) for t in trajs]
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-4), image_processor=v.image_processor, version=3, max_lag=1)
    m = up.step(trajs, torch.tensor([1.0, -1.0]), masks)
    stale = len(trajs[0].segments[0].token_ids)
    assert m["stale_tokens"] == stale
    assert m["loss_tokens"] == sum(int(x.sum()) for x in masks) - stale
    assert m["version"] == 4


def test_fatal_mask_counts_masked_tokens():
    v = fresh()
    trajs, adv, _ = make_batch(v, n=2)
    trajs[0].fatal_step = 1
    masks = [torch.tensor(t.loss_mask(fatal=True)) for t in trajs]
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-4), image_processor=v.image_processor)
    m = up.step(trajs, adv, masks)
    assert m["masked_tokens"] == len(trajs[0].segments[2].token_ids)


def test_nan_in_weights_names_step_micro_batch_and_term():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3), image_processor=v.image_processor)
    up.step(trajs, adv, masks)
    with torch.no_grad():
        v.model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 1 .*non-finite log-prob.*micro-batch \[('t0', 't1'|'t1', 't0')\].*term: log-prob"):
        up.step(trajs, adv, masks)


def test_nan_in_sampled_logprobs_names_the_policy_loss():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    trajs[1].segments[0].logprobs[2] = float("nan")
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3, micro_batch_tokens=100), image_processor=v.image_processor)
    before = weights(v.model)
    with pytest.raises(NonFiniteError, match=r"step 0 .*policy loss.*\['t1'\].*term: policy loss"):
        up.step(trajs, adv, masks)
    assert all(torch.equal(before[k], p) for k, p in weights(v.model).items())


@pytest.mark.parametrize("per_micro", [True, False])
def test_nan_gradient_stops_before_the_optimizer_step(per_micro):
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-3, check_grads_per_micro_batch=per_micro),
                       image_processor=v.image_processor)
    v.model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    before = weights(v.model)
    pattern = r"non-finite gradient after the backward of micro-batch \[('t0', 't1'|'t1', 't0')\].*term: grad\]" if per_micro \
        else r"non-finite grad norm nan.*mini-batch.*skipped.*term: grad norm"
    with pytest.raises(NonFiniteError, match=pattern):
        up.step(trajs, adv, masks)
    assert all(torch.equal(before[k], p) for k, p in weights(v.model).items())


def test_kl_to_reference_model():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    loss = PolicyLossConfig(kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs a ref_model"):
        PolicyUpdater(v.model, UpdateConfig(loss=loss), image_processor=v.image_processor)
    ref = copy.deepcopy(v.model)
    up = PolicyUpdater(v.model, UpdateConfig(lr=5e-3, loss=loss), image_processor=v.image_processor, ref_model=ref)
    m0 = up.step(trajs, adv, masks)
    m1 = up.step(trajs, adv, masks)
    assert m0["ref_kl"] < 1e-7 < m1["ref_kl"] < 1.0


def test_bad_inputs_are_named():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    up = PolicyUpdater(v.model, UpdateConfig(), image_processor=v.image_processor)
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]=\(2,\)"):
        up.step(trajs, adv[:1], masks)
    with pytest.raises(ValueError, match=r"advantage of trajectory 't1'"):
        up.step(trajs, torch.tensor([0.0, float("inf")]), masks)
    bad = [m.clone() for m in masks]
    bad[0][1] = 1
    with pytest.raises(ValueError, match=r"mask of trajectory 't0' covers token 1, which the policy did not sample"):
        up.step(trajs, adv, bad)
    with pytest.raises(ValueError, match="mini_batches=3 exceeds the 2 trajectories"):
        PolicyUpdater(v.model, UpdateConfig(mini_batches=3)).step(trajs, adv, masks)
    with pytest.raises(ValueError, match="needs an image_processor"):
        PolicyUpdater(v.model, UpdateConfig()).step(trajs, adv, masks)
    with pytest.raises(ValueError, match="max_lag must be None or an int >= 0, got -1"):
        PolicyUpdater(v.model, UpdateConfig(), max_lag=-1)
    for kw, msg in [({"lr": -1.0}, "lr must be"), ({"betas": (0.9, 1.0)}, "betas must be"),
                    ({"micro_batch_tokens": 0}, "micro_batch_tokens must be"),
                    ({"temperature": 0.0}, "temperature must be"), ({"impl": "cuda"}, "impl must be")]:
        with pytest.raises(ValueError, match=msg):
            UpdateConfig(**kw)


def test_temperature_matches_sampling_temperature():
    v = fresh()
    trajs = [make_traj(v, i, temperature=0.7) for i in range(2)]
    masks = [torch.tensor(t.loss_mask()) for t in trajs]
    up = PolicyUpdater(v.model, UpdateConfig(lr=1e-4, temperature=0.7, use_fused_logprob=False),
                       image_processor=v.image_processor)
    m = up.step(trajs, torch.tensor([1.0, -1.0]), masks)
    assert abs(m["ratio_min"] - 1) < 1e-4 and abs(m["ratio_max"] - 1) < 1e-4


def test_gradient_checkpointing_gives_the_same_update():
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    plain = _one_step(fresh(), trajs, adv, masks)
    ckpt = _one_step(fresh(), trajs, adv, masks, gradient_checkpointing=True)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_text_only_language_model():
    lm0 = tiny.build_tiny_text_lm(seed=0)
    model, tok = lm0.model, lm0.tokenizer
    prompt = tok("<|im_start|>user\nwhat is 2?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    gen = tok("<answer>two</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    seg = Segment("gen", gen, 0, logprobs=lp[len(prompt) - 1:].tolist(), version=0)
    traj = Trajectory("x0", "g", 0, prompt, segments=[seg])
    up = PolicyUpdater(model, UpdateConfig(lr=1e-3))
    m = up.step([traj], torch.tensor([1.0]), [torch.tensor(traj.loss_mask())])
    assert abs(m["ratio_max"] - 1) < 1e-4 and m["loss_tokens"] == len(gen)
    with pytest.raises(ValueError, match="has images but the model has no vision tower"):
        up.step([make_traj(fresh(), 0)], torch.tensor([1.0]), [torch.tensor(make_traj(fresh(), 0).loss_mask())])


def _grads_of_step(up: PolicyUpdater, call) -> dict[str, torch.Tensor]:
    """The gradient each optimizer step of `call()` applied, read just before the step."""
    got: dict[str, torch.Tensor] = {}
    step = up.runtime.step

    def spy() -> float:
        got.update({n: p.grad.detach().clone() for n, p in up.policy.model.named_parameters() if p.grad is not None})
        return step()

    up.runtime.step = spy
    call()
    return got


def test_sft_term_adds_coef_times_the_demonstrations_nll_gradient():
    """PPO-ptx: the step's gradient is the policy gradient plus sft_coef x the gradient of the
    demonstrations' token-mean NLL at temperature 1 (SFTUpdater's loss), whatever the sampler's."""
    from spyglass.trainer.sft import SFTUpdater

    v = fresh()
    trajs = [make_traj(v, i, temperature=0.7) for i in range(3)]
    adv, masks = torch.tensor([1.0, -1.0, 0.5]), [torch.tensor(t.loss_mask()) for t in trajs]
    demos = [make_traj(v, i) for i in (7, 8)]
    cfg = {"lr": 1e-3, "grad_clip": 0.0, "temperature": 0.7, "micro_batch_tokens": 150}
    pg_up = PolicyUpdater(fresh().model, UpdateConfig(**cfg), image_processor=v.image_processor)
    pg = _grads_of_step(pg_up, lambda: pg_up.step(trajs, adv, masks))
    nll_up = SFTUpdater(fresh().model, UpdateConfig(**{**cfg, "temperature": 1.0}), image_processor=v.image_processor)
    nll = _grads_of_step(nll_up, lambda: nll_up.step(demos))
    both_up = PolicyUpdater(fresh().model, UpdateConfig(**cfg, sft_coef=0.5), image_processor=v.image_processor)
    out: dict = {}
    both = _grads_of_step(both_up, lambda: out.update(both_up.step(trajs, adv, masks, sft=demos)))
    assert set(both) == set(pg) == set(nll)
    for k in both:
        assert torch.allclose(both[k], pg[k] + 0.5 * nll[k], atol=1e-6, rtol=1e-4), k
    assert max((0.5 * nll[k]).abs().max() for k in nll) > 1e-3  # the term is not negligible
    tokens = sum(sum(t.loss_mask()) for t in demos)
    assert out["sft_nll"] == pytest.approx(-sum(seq_logprob(fresh(), t) for t in demos) / tokens, rel=1e-4)
    with pytest.raises(ValueError, match=r"sft_coef=0.5 with 0 demonstration trajectories"):
        both_up.step(trajs, adv, masks)
    with pytest.raises(ValueError, match=r"sft_coef=0.0 with 2 demonstration trajectories"):
        pg_up.step(trajs, adv, masks, sft=demos)
    with pytest.raises(ValueError, match="sft_coef must be a finite number >= 0"):
        UpdateConfig(sft_coef=-1.0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_packed_text_only_micro_batch_runs_the_vision_tower_when_distributed(family):
    """Under ZeRO every rank must run the vision tower: a packed text-only micro-batch gets the
    dummy image as a last sequence with no loss tokens, and its log-probs do not change."""
    from spyglass.engine.packer import pack
    v = fresh(family)
    trajs = [make_traj(v, i, images=False) for i in range(2)]
    up = PolicyUpdater(v.model, UpdateConfig(attention="packed"), image_processor=v.image_processor)
    seqs, _, _ = up._build(trajs, [torch.tensor(t.loss_mask()) for t in trajs])
    (mb,) = pack([s.ids for s in seqs], [s.mask for s in seqs], 4096)
    rows = [seqs[i] for i in mb.indices.tolist()]
    alone = up._packed_inputs(mb, rows)
    up.runtime.world_size = 2  # what a second rank looks like to the batch builder
    both = up._packed_inputs(mb, rows)
    assert "pixel_values" not in alone and "pixel_values" in both
    assert both["input_ids"].shape[1] > alone["input_ids"].shape[1] == mb.num_tokens
    with torch.no_grad():
        a = up.policy(**{k: t for k, t in alone.items() if k != "sel"})
        b = up.policy(**{k: t for k, t in both.items() if k != "sel"})
    assert torch.allclose(a, b, atol=1e-5)
