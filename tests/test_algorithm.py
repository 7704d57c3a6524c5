"""trainer.algorithm: every ablation switch against advantages and masks worked out by hand from
the papers' definitions. Run: .venv/bin/python -m pytest -q tests/test_algorithm.py"""
from __future__ import annotations

import pytest
import torch

from spyglass.engine.packer import pack
from spyglass.engine.trajectory import Segment, SegmentKind, Status, Trajectory, Turn
from spyglass.trainer.algorithm import AlgoConfig, compute_advantages, token_mask


def mk(tid: str, gid: str, steps: list[str], status: Status, reward: float) -> Trajectory:
    """Prompt of 2 tokens; each step 2 generated tokens, then 1 observation token (not after the
    last step). Steps: "ok" (a call that ran), "err" (a tool error), "fmt" (an unterminated call:
    a format error, no tool ran), "ans" (final answer)."""
    t = Trajectory(id=tid, group_id=gid, sample_index=0, prompt_ids=[1, 2], status=status)
    for i, kind in enumerate(steps):
        t.segments.append(Segment(SegmentKind.GEN, [10 + i, 20 + i], turn=i, logprobs=[-0.1, -0.2],
                                  version=0))
        if i < len(steps) - 1:
            t.segments.append(Segment(SegmentKind.OBS, [99], turn=i))
        call = [{"name": "Crop", "arguments": "{}"}]
        t.turns.append(Turn(i, calls=[] if kind in ("ans", "fmt") else call, answered=kind == "ans",
                            parse_errors=[{"kind": "unterminated_tag", "message": "x"}] if kind == "fmt" else [],
                            tool_errors=[{"name": "Crop", "kind": "fatal", "message": "x"}]
                            if kind == "err" else []))
    t.answer = "x" if status is Status.ANSWERED else None
    t.reward = {"total": reward}
    return t


def group4() -> list[Trajectory]:
    """The worked example: rewards [1, 0.2, 0, 0.8]; B has a cascade from step 2 (f=2);
    C is truncated at max turns without an answer: no cascade, so not fatal (an anomaly, penalised
    by default, masked with anomalies="mask")."""
    return [
        mk("A", "q", ["ok", "ans"], Status.ANSWERED, 1.0),
        mk("B", "q", ["ok", "ok", "err", "err", "err"], Status.FATAL, 0.2),
        mk("C", "q", ["ok", "err", "ok"], Status.TRUNCATED, 0.0),
        mk("D", "q", ["ok", "ok", "ans"], Status.ANSWERED, 0.8),
    ]


# Token masks, written out: P P | G G O | ... | G G   (P prompt, G generated, O observation)
GEN = {
    "A": [0, 0, 1, 1, 0, 1, 1],
    "B": [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1],
    "C": [0, 0, 1, 1, 0, 1, 1, 0, 1, 1],
    "D": [0, 0, 1, 1, 0, 1, 1, 0, 1, 1],
}
B_FATAL = [0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # steps 0, 1 only (f = 2)
ZERO = {k: [0] * len(v) for k, v in GEN.items()}

# mean = 0.5; deviations [0.5, -0.3, -0.5, 0.3]; population var = 0.68 / 4 = 0.17,
# std = sqrt(0.17) = 0.4123106; eps = 1e-6: 0.5 / 0.4123116 = 1.2126752, 0.3 / ... = 0.7276051
GRPO = [1.2126752, -0.7276051, -1.2126752, 0.7276051]
# unbiased: var = 0.68 / 3, std = 0.4760952: 0.5 / 0.4760962 = 1.0502079, 0.3 / ... = 0.6301247
GRPO_UNBIASED = [1.0502079, -0.6301247, -1.0502079, 0.6301247]
RLOO = [4 / 3 * 0.5, 4 / 3 * -0.3, 4 / 3 * -0.5, 4 / 3 * 0.3]  # r - mean(others) = n/(n-1)(r - mean)
DRGRPO = [0.5, -0.3, -0.5, 0.3]


def masks_of(out) -> list[list[int]]:
    return [m.int().tolist() for m in out.masks]


def close(t: torch.Tensor, expected: list[float]) -> None:
    assert t.dtype == torch.float32 and t.shape == (len(expected),)
    torch.testing.assert_close(t, torch.tensor(expected), atol=2e-6, rtol=0)


def test_fixture_is_what_the_paper_says() -> None:
    trajs = group4()
    assert [t.compute_fatal_step(3) for t in trajs] == [None, 2, None, None]
    assert [t.loss_mask() for t in trajs] == [GEN[k] for k in "ABCD"]


def test_vanilla_grpo() -> None:
    out = compute_advantages(group4(), AlgoConfig(mode="vanilla"))
    close(out.advantages, GRPO)
    assert masks_of(out) == [GEN[k] for k in "ABCD"]
    assert out.metrics["clamped_frac"] == 0.0 and out.metrics["masked_token_frac"] == 0.0
    assert out.fatal.tolist() == [False, True, False, False] and out.fatal_steps == [None, 2, None, None]
    close(out.group_mean, [0.5])
    close(out.group_std, [0.4123106])


def test_hard_mask_zeroes_anomalous_but_keeps_them_in_the_group() -> None:
    out = compute_advantages(group4(), AlgoConfig(mode="hard_mask"))
    close(out.advantages, GRPO)  # B and C still shape the mean and std
    assert masks_of(out) == [GEN["A"], ZERO["B"], ZERO["C"], GEN["D"]]
    assert out.metrics["masked_token_frac"] == pytest.approx(16 / 26)  # 26 generated, 10 kept
    assert out.metrics["masked_traj_frac"] == 0.5  # B (the cascade) and C (unanswered, no cascade)
    assert out.metrics["fatal_frac"] == 0.25 and out.metrics["anomalous_frac"] == 0.25  # each counted once


def test_fatal_mask_without_clamp() -> None:
    out = compute_advantages(group4(), AlgoConfig(mode="fatal_mask"))
    close(out.advantages, GRPO)
    assert masks_of(out) == [GEN["A"], B_FATAL, GEN["C"], GEN["D"]]
    assert out.metrics["masked_token_frac"] == pytest.approx(6 / 26)
    assert out.metrics["clamped_frac"] == 0.0


def test_fatal_mask_clamp_default() -> None:
    out = compute_advantages(group4())  # default mode
    close(out.advantages, GRPO[:1] + [0.0] + GRPO[2:])  # max(r~, 0) for fatal B; truncated C penalised
    assert masks_of(out) == [GEN["A"], B_FATAL, GEN["C"], GEN["D"]]
    assert out.metrics["clamped_frac"] == 0.25
    assert out.metrics["fatal_frac"] == 0.25


def test_anomalies_are_penalised_or_masked_but_never_clamped() -> None:
    """Running out of turns (C), a repetition stop and an engine error are the model's or the
    run's, not a tool cascade: never clamped; `anomalies="mask"` takes them out of the loss
    (they still count in the group statistics)."""
    g = group4()
    rep = mk("R", "q2", ["ok", "ok"], Status.INTERRUPTED, 0.0)
    err = mk("X", "q2", ["err", "ok"], Status.ERROR, 0.0)
    ok = mk("O", "q2", ["ok", "ans"], Status.ANSWERED, 1.0)
    trajs = g + [rep, err, ok]
    # group q2: rewards [0, 0, 1], mean 1/3, population std sqrt(2)/3 = 0.4714045
    q2 = [-0.3333333 / 0.4714055, -0.3333333 / 0.4714055, 0.6666667 / 0.4714055]
    out = compute_advantages(trajs)
    close(out.advantages, GRPO[:1] + [0.0] + GRPO[2:] + q2)
    assert all(bool(m.any()) for m in out.masks)
    masked = compute_advantages(trajs, AlgoConfig(anomalies="mask"))
    close(masked.advantages, out.advantages.tolist())  # the same statistics
    assert [bool(m.any()) for m in masked.masks] == [True, True, False, True, False, False, True]
    assert masks_of(masked)[1] == B_FATAL
    with pytest.raises(ValueError, match="anomalies"):
        AlgoConfig(anomalies="clamp")


def test_fatal_errors_tool_counts_only_tool_failures() -> None:
    """F's cascade is its own format errors (runaway turns), T's is tool failures with one
    format error between them. "any" (the paper's count): both fatal, both clamped. "tool" (the
    engine's fatal_errors, which also lets T run past its third step): T is still fatal from
    step 0 (its format step neither counts nor resets), F is an anomaly: penalised by default,
    masked with anomalies="mask"."""
    trajs = [mk("F", "q3", ["ok", "fmt", "fmt", "fmt"], Status.FATAL, 0.0),
             mk("T", "q3", ["err", "fmt", "err", "err"], Status.FATAL, 0.0),
             mk("G", "q3", ["ok", "ans"], Status.ANSWERED, 1.0)]
    r = [-0.3333333 / 0.4714055, -0.3333333 / 0.4714055, 0.6666667 / 0.4714055]  # rewards [0, 0, 1]
    gen_f = [0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    gen_g = [0, 0, 1, 1, 0, 1, 1]
    out = compute_advantages(trajs)
    assert out.fatal_steps == [1, 0, None]
    close(out.advantages, [0.0, 0.0, r[2]])
    assert masks_of(out) == [[0, 0, 1, 1] + [0] * 9, [0] * 13, gen_g]
    tool = compute_advantages(trajs, fatal_errors="tool")
    assert tool.fatal_steps == [None, 0, None]
    close(tool.advantages, [r[0], 0.0, r[2]])  # F's runaway turns cost it reward
    assert masks_of(tool) == [gen_f, [0] * 13, gen_g]
    assert tool.metrics["fatal_frac"] == pytest.approx(1 / 3) and tool.metrics["anomalous_frac"] == pytest.approx(1 / 3)
    masked = compute_advantages(trajs, AlgoConfig(anomalies="mask"), fatal_errors="tool")
    assert masks_of(masked) == [[0] * 13, [0] * 13, gen_g]
    with pytest.raises(ValueError, match="fatal_errors must be one of"):
        compute_advantages(trajs, fatal_errors="format")


def test_clamp_keeps_a_fatal_member_above_the_mean() -> None:
    trajs = group4()
    trajs[1].reward["total"] = 0.9  # B fatal with reward above the mean 0.675
    out = compute_advantages(trajs, AlgoConfig(mode="fatal_mask_clamp", estimator="drgrpo"))
    close(out.advantages, [0.325, 0.225, -0.675, 0.125])  # B (fatal) positive stays; C is not fatal
    assert out.metrics["clamped_frac"] == 0.0


def test_unbiased_std() -> None:
    out = compute_advantages(group4(), AlgoConfig(mode="vanilla", std="unbiased"))
    close(out.advantages, GRPO_UNBIASED)
    close(out.group_std, [0.4760952])


@pytest.mark.parametrize("estimator,expected", [("rloo", RLOO), ("drgrpo", DRGRPO)])
def test_rloo_and_drgrpo(estimator: str, expected: list[float]) -> None:
    out = compute_advantages(group4(), AlgoConfig(mode="fatal_mask", estimator=estimator))
    close(out.advantages, expected)
    clamped = compute_advantages(group4(), AlgoConfig(estimator=estimator))
    close(clamped.advantages, [expected[0], 0.0, expected[2], expected[3]])


def test_ragged_interleaved_groups_singleton_and_all_equal() -> None:
    g = group4()
    single = mk("S", "single", ["ok", "ans"], Status.ANSWERED, 0.7)
    eq = [mk("E0", "eq", ["ok", "ans"], Status.ANSWERED, 0.5),
          mk("E1", "eq", ["err", "err", "err"], Status.FATAL, 0.5),
          mk("E2", "eq", ["ans"], Status.ANSWERED, 0.5)]
    trajs = [g[0], single, eq[0], g[1], eq[1], g[2], eq[2], g[3]]
    for mode in ("vanilla", "hard_mask", "fatal_mask", "fatal_mask_clamp"):
        for est in ("grpo", "rloo", "drgrpo"):
            out = compute_advantages(trajs, AlgoConfig(mode=mode, estimator=est))
            full = {"grpo": GRPO, "rloo": RLOO, "drgrpo": DRGRPO}[est]
            if mode == "fatal_mask_clamp":
                full = [full[0], 0.0, full[2], full[3]]
            # order: A, S, E0, B, E1, C, E2, D; singleton and all-equal groups get 0
            close(out.advantages, [full[0], 0.0, 0.0, full[1], 0.0, full[2], 0.0, full[3]])
            assert out.group_ids == ["q", "single", "eq"]
            assert out.group_index.tolist() == [0, 1, 2, 0, 2, 0, 2, 0]
            assert out.group_count.tolist() == [4, 1, 3]
            assert out.metrics["flat_group_frac"] == pytest.approx(2 / 3)
    out = compute_advantages(trajs, AlgoConfig(mode="fatal_mask"))
    assert out.fatal_steps[4] == 0 and not bool(out.masks[4].any())  # cascade from step 0
    assert out.metrics["clamped_frac"] == 0.0


def test_filter_groups_drops_groups_flat_in_accuracy_or_reward() -> None:
    g = group4()  # accuracy: A and D right, B and C wrong -> mixed, kept
    for t, acc in zip(g, [1.0, 0.0, 0.0, 1.0]):
        t.reward["acc"] = acc
    wrong = [mk("W0", "w", ["ok", "ans"], Status.ANSWERED, 0.1),  # all wrong, totals differ
             mk("W1", "w", ["ok", "ok", "ans"], Status.ANSWERED, 0.15)]
    same = [mk("E0", "eq", ["ok", "ans"], Status.ANSWERED, 0.5), mk("E1", "eq", ["ans"], Status.ANSWERED, 0.5)]
    single = mk("S", "single", ["ok", "ans"], Status.ANSWERED, 0.7)
    for t in wrong + same + [single]:
        t.reward["acc"] = 0.0
    same[1].reward["acc"] = 1.0  # equal totals, different accuracy
    trajs = [g[0], wrong[0], same[0], g[1], wrong[1], g[2], same[1], single, g[3]]
    plain = compute_advantages(trajs, AlgoConfig(mode="fatal_mask"))
    assert plain.keep.all() and abs(float(plain.advantages[1])) == pytest.approx(1.0, abs=1e-4)  # crumbs blown up

    out = compute_advantages(trajs, AlgoConfig(mode="fatal_mask", filter_groups="acc"))
    assert out.keep.tolist() == [True, False, True, True, False, True, True, False, True]
    close(out.advantages, [GRPO[0], 0.0, 0.0, GRPO[1], 0.0, GRPO[2], 0.0, 0.0, GRPO[3]])
    assert not out.masks[1].any() and not out.masks[4].any() and not out.masks[7].any()
    assert out.masks[0].int().tolist() == GEN["A"] and out.masks[3].int().tolist() == B_FATAL
    assert out.metrics["kept_traj_frac"] == pytest.approx(6 / 9)
    assert out.group_mean.tolist() == plain.group_mean.tolist()  # statistics over every member

    out = compute_advantages(trajs, AlgoConfig(mode="fatal_mask", filter_groups="reward"))
    assert out.keep.tolist() == [True, True, False, True, True, True, False, False, True]
    assert float(out.advantages[1]) == pytest.approx(float(plain.advantages[1]))

    g[2].reward.pop("acc")
    with pytest.raises(ValueError, match="'C'"):
        compute_advantages(trajs, AlgoConfig(filter_groups="acc"))
    with pytest.raises(ValueError, match="filter_groups"):
        AlgoConfig(filter_groups="std")


def test_neg_scale_weights_only_the_negative_advantages() -> None:
    g = group4()
    out = compute_advantages(g, AlgoConfig(mode="fatal_mask", neg_scale=0.25))
    close(out.advantages, [GRPO[0], 0.25 * GRPO[1], 0.25 * GRPO[2], GRPO[3]])
    out = compute_advantages(g, AlgoConfig(mode="vanilla", neg_scale=0.0))
    close(out.advantages, [GRPO[0], 0.0, 0.0, GRPO[3]])
    assert out.masks[1].int().tolist() == GEN["B"]  # the mask is the mode's; only the weight changes
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="neg_scale"):
            AlgoConfig(neg_scale=bad)


def test_fatal_k_is_recomputed_from_turns() -> None:
    t = mk("B", "q", ["ok", "ok", "err", "err", "err"], Status.FATAL, 0.2)
    t.fatal_step = 2  # what the scheduler wrote with k = 3
    out = compute_advantages([t], AlgoConfig(mode="fatal_mask"), fatal_k=2)
    assert out.fatal_steps == [2]
    out = compute_advantages([t], AlgoConfig(mode="fatal_mask"), fatal_k=4)
    assert out.fatal_steps == [None]  # no run of 4: unanswered without a cascade is not fatal


def test_masks_feed_the_packer() -> None:
    trajs = group4()
    out = compute_advantages(trajs)
    mbs = pack([t.token_ids() for t in trajs], out.masks, max_tokens=64, backend="python")
    total = sum(int(mb.loss_mask.sum()) for mb in mbs)
    assert total == sum(int(m.sum()) for m in out.masks) == 20
    adv_per_token = out.advantages[torch.from_numpy(mbs[0].seq_index)]
    assert adv_per_token.shape == (mbs[0].num_tokens,)


def test_token_mask_helper() -> None:
    t = group4()[1]
    assert token_mask(t).int().tolist() == GEN["B"]
    assert token_mask(t, cut=2).int().tolist() == B_FATAL
    assert token_mask(t, keep=False).int().tolist() == ZERO["B"]


def test_bad_input_and_config_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        AlgoConfig(mode="fatal")
    with pytest.raises(ValueError, match="estimator"):
        AlgoConfig(estimator="ppo")
    with pytest.raises(ValueError, match="std"):
        AlgoConfig(std="sample")
    with pytest.raises(ValueError, match="eps"):
        AlgoConfig(eps=-1.0)
    with pytest.raises(ValueError, match="fatal_k"):
        compute_advantages(group4(), fatal_k=0)
    with pytest.raises(ValueError, match="impl"):
        AlgoConfig(impl="cuda")
    with pytest.raises(ValueError, match="empty"):
        compute_advantages([])
    t = group4()
    t[2].reward = {}
    with pytest.raises(ValueError, match="'C'"):
        compute_advantages(t)
    t[2].reward = {"total": float("nan")}
    with pytest.raises(ValueError, match="'C'"):
        compute_advantages(t)
    t = group4()
    t[0].status = Status.RUNNING
    with pytest.raises(ValueError, match="'A' is still running"):
        compute_advantages(t)
