"""Hand-computed values of every objective and correction on a tiny batch.

Two responses, "a" (2 tokens, A = +1) and "b" (3 tokens, A = -0.5), each after a prompt
token, plus one padding token; prompt and padding carry garbage (NaN, -inf) that must
not matter. Per response token (log pi_theta, r = pi_theta/pi_old, rho = pi_old/mu_old):

    a0: -1.0, 1.1, 1.0     b0: -0.5, 0.7, 0.6
    a1: -2.0, 1.5, 1.8     b1: -1.5, 1.0, 8.0
                           b2: -3.0, 1.3, 0.25

N = 2 responses, T_all = 5 tokens. Each test writes the objective's arithmetic out and
checks the loss and d loss / d log pi_theta(y_t) of every token.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_rl.loss import (
    LossInputError,
    LossInputs,
    ObjectiveConfig,
    compute_loss,
    derived_metrics,
)
from megatron_rl.metrics.stats import results

TOKENS = ["a0", "a1", "b0", "b1", "b2"]
LP = {"a0": -1.0, "a1": -2.0, "b0": -0.5, "b1": -1.5, "b2": -3.0}
R = {"a0": 1.1, "a1": 1.5, "b0": 0.7, "b1": 1.0, "b2": 1.3}
RHO = {"a0": 1.0, "a1": 1.8, "b0": 0.6, "b1": 8.0, "b2": 0.25}
ENT = {"a0": 0.5, "a1": 1.5, "b0": 2.0, "b1": 1.0, "b2": 0.0}
A_a, A_b = 1.0, -0.5
NAN, INF = float("nan"), float("inf")
# Layout: [prompt, a0, a1, prompt, b0, b1, b2, padding]
LAYOUT = [None, "a0", "a1", None, "b0", "b1", "b2", None]


def golden_inputs():
    mask = torch.tensor([t is not None for t in LAYOUT])
    lp = torch.tensor([LP[t] if t else g for t, g in zip(LAYOUT, [-0.3, 0, 0, -INF, 0, 0, 0, NAN], strict=True)],
                      dtype=torch.float64)
    leaf = lp.clone().requires_grad_(True)
    log_r = torch.tensor([math.log(R[t]) if t else 0.0 for t in LAYOUT], dtype=torch.float64)
    log_rho = torch.tensor([math.log(RHO[t]) if t else 0.0 for t in LAYOUT], dtype=torch.float64)
    old = lp - log_r
    rollout = old - log_rho
    old[7], rollout[7], rollout[0] = -INF, NAN, INF  # garbage where the mask is False
    adv = torch.tensor([9.0, A_a, A_a, 9.0, A_b, A_b, A_b, NAN], dtype=torch.float64)
    inputs = LossInputs(
        logprobs=leaf,
        old_logprobs=old,
        rollout_logprobs=rollout,
        advantages=adv,
        loss_mask=mask,
        sample_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1, -1]),
        num_samples=2,
        response_lengths=torch.tensor([2, 3]),
        global_num_samples=2,
        global_num_tokens=5,
        entropy=torch.tensor([NAN, ENT["a0"], ENT["a1"], 3.0, ENT["b0"], ENT["b1"], ENT["b2"], INF],
                             dtype=torch.float64),
    )
    return inputs, leaf


def run(config: ObjectiveConfig):
    inputs, leaf = golden_inputs()
    out = compute_loss(inputs, config)
    out.loss.backward()
    grads = {t: float(leaf.grad[i]) for i, t in enumerate(LAYOUT) if t}
    assert float(leaf.grad[0]) == float(leaf.grad[3]) == float(leaf.grad[7]) == 0.0
    return float(out.loss.detach()), grads, results(out.stats)


def check(config, expected_loss, expected_grads):
    loss, grads, stats = run(config)
    assert loss == pytest.approx(expected_loss, rel=1e-12, abs=1e-12)
    for t in TOKENS:
        assert grads[t] == pytest.approx(expected_grads[t], rel=1e-12, abs=1e-12), t
    return stats


def test_minirl():
    # TIS c = min(rho, 5); mask M: a1 (A>0, r=1.5>1.27) and b0 (A<0, r=0.7<0.8) are clipped,
    # b2 (A<0, r=1.3>1.27) is NOT (the paper clips only in the advantage's direction).
    loss = -(1 / 2) * (min(1.0, 5) * 1.1 * A_a * -1.0
                       + min(8.0, 5) * 1.0 * A_b * -1.5
                       + min(0.25, 5) * 1.3 * A_b * -3.0)
    grads = {"a0": -(1 / 2) * 1.0 * 1.1 * A_a, "a1": 0.0, "b0": 0.0,
             "b1": -(1 / 2) * 5.0 * 1.0 * A_b, "b2": -(1 / 2) * 0.25 * 1.3 * A_b}
    stats = check(ObjectiveConfig(), loss, grads)
    assert stats["train/clipfrac"] == pytest.approx(2 / 5)
    assert stats["train/clipfrac_low"] == pytest.approx(1 / 5)
    assert stats["train/clipfrac_high"] == pytest.approx(1 / 5)
    assert stats["mismatch/correction_truncated_frac"] == pytest.approx(1 / 5)  # b1: 8 > 5
    assert stats["mismatch/correction_masked_frac"] == 0.0
    assert stats["mismatch/correction_weight_mean"] == pytest.approx((1.0 + 1.8 + 0.6 + 5 + 0.25) / 5)
    assert stats["train/loss"] == pytest.approx(loss)


def test_shared_stats():
    _, _, stats = run(ObjectiveConfig())
    log_rho = [math.log(RHO[t]) for t in TOKENS]
    rho = [RHO[t] for t in TOKENS]
    assert stats["mismatch/kl"] == pytest.approx(sum(-x for x in log_rho) / 5)
    assert stats["mismatch/kl_k3"] == pytest.approx(sum(p - 1 - math.log(p) for p in rho) / 5)
    assert stats["mismatch/abs_logratio_mean"] == pytest.approx(sum(abs(x) for x in log_rho) / 5)
    assert stats["mismatch/abs_logratio_max"] == pytest.approx(math.log(8.0))
    assert stats["mismatch/is_weight_mean"] == pytest.approx((1.0 + 1.8 + 0.6 + 8.0 + 0.25) / 5)
    assert stats["mismatch/is_weight_min"] == pytest.approx(0.25)
    assert stats["mismatch/is_weight_max"] == pytest.approx(8.0)
    sq_mean = (1.0 + 1.8**2 + 0.6**2 + 8.0**2 + 0.25**2) / 5
    assert stats["mismatch/is_weight_sq_mean"] == pytest.approx(sq_mean)
    ess = derived_metrics(stats)["mismatch/ess"]
    assert ess == pytest.approx(((1.0 + 1.8 + 0.6 + 8.0 + 0.25) / 5) ** 2 / sq_mean)
    assert stats["train/staleness_kl"] == pytest.approx(sum(-math.log(R[t]) for t in TOKENS) / 5)
    assert stats["train/entropy"] == pytest.approx((0.5 + 1.5 + 2.0 + 1.0 + 0.0) / 5)


def test_minirl_no_is():
    # c = 1: only pi_theta/pi_old remains in the weight; same clipping.
    loss = -(1 / 2) * (1.1 * A_a * -1.0 + 1.0 * A_b * -1.5 + 1.3 * A_b * -3.0)
    grads = {"a0": -(1 / 2) * 1.1 * A_a, "a1": 0.0, "b0": 0.0,
             "b1": -(1 / 2) * 1.0 * A_b, "b2": -(1 / 2) * 1.3 * A_b}
    check(ObjectiveConfig(objective="minirl_no_is"), loss, grads)


def test_minirl_length_norm():
    loss = -(1 / 2) * ((1 / 2) * (1.0 * 1.1 * A_a * -1.0)
                       + (1 / 3) * (5.0 * 1.0 * A_b * -1.5 + 0.25 * 1.3 * A_b * -3.0))
    grads = {"a0": -(1 / 2) * (1 / 2) * 1.1 * A_a, "a1": 0.0, "b0": 0.0,
             "b1": -(1 / 2) * (1 / 3) * 5.0 * A_b, "b2": -(1 / 2) * (1 / 3) * 0.25 * 1.3 * A_b}
    check(ObjectiveConfig(objective="minirl_length_norm"), loss, grads)


def test_ppo():
    # c * min(r A, clip(r, 0.8, 1.27) A); c = min(rho, 5).
    loss = -(1 / 2) * (1.0 * min(1.1 * A_a, 1.1 * A_a)
                       + 1.8 * min(1.5 * A_a, 1.27 * A_a)
                       + 0.6 * min(0.7 * A_b, 0.8 * A_b)
                       + 5.0 * min(1.0 * A_b, 1.0 * A_b)
                       + 0.25 * min(1.3 * A_b, 1.27 * A_b))
    # d/dlogp of c r A where the unclipped branch is the minimum: the same as minirl's.
    grads = {"a0": -(1 / 2) * 1.0 * 1.1 * A_a, "a1": 0.0, "b0": 0.0,
             "b1": -(1 / 2) * 5.0 * 1.0 * A_b, "b2": -(1 / 2) * 0.25 * 1.3 * A_b}
    stats = check(ObjectiveConfig(objective="ppo"), loss, grads)
    assert stats["train/clipfrac"] == pytest.approx(2 / 5)


def test_grpo():
    # Symmetric eps 0.2, per-response length normalisation, no correction.
    loss = -(1 / 2) * ((1 / 2) * (min(1.1 * A_a, 1.1 * A_a) + min(1.5 * A_a, 1.2 * A_a))
                       + (1 / 3) * (min(0.7 * A_b, 0.8 * A_b) + min(1.0 * A_b, 1.0 * A_b)
                                    + min(1.3 * A_b, 1.2 * A_b)))
    grads = {"a0": -(1 / 2) * (1 / 2) * 1.1 * A_a, "a1": 0.0, "b0": 0.0,
             "b1": -(1 / 2) * (1 / 3) * 1.0 * A_b, "b2": -(1 / 2) * (1 / 3) * 1.3 * A_b}
    stats = check(ObjectiveConfig(objective="grpo"), loss, grads)
    assert stats["mismatch/correction_weight_mean"] == 1.0


def test_gspo():
    # s = (prod r)^(1/|y|); clip range [0.95, 1.05] here so that one response is clipped.
    s_a = (1.1 * 1.5) ** (1 / 2)  # 1.284 > 1.05 with A > 0: clipped, no gradient
    s_b = (0.7 * 1.0 * 1.3) ** (1 / 3)  # 0.969, inside
    loss = -(1 / 2) * (min(s_a * A_a, 1.05 * A_a) + min(s_b * A_b, s_b * A_b))
    # grad of min(s A) w.r.t. log pi_theta(y_t) = A s / |y| for each token of the response
    grads = {"a0": 0.0, "a1": 0.0,
             "b0": -(1 / 2) * A_b * s_b / 3, "b1": -(1 / 2) * A_b * s_b / 3, "b2": -(1 / 2) * A_b * s_b / 3}
    stats = check(ObjectiveConfig(objective="gspo", gspo_clip_low=0.05, gspo_clip_high=0.05),
                  loss, grads)
    assert stats["train/clipfrac_high"] == pytest.approx(2 / 5)  # both tokens of "a"
    assert stats["train/clipfrac_low"] == 0.0


def test_gspo_paper_clip_range():
    # With the paper's (3e-4, 4e-4) both sequence ratios are far outside: both clipped.
    loss = -(1 / 2) * (1.0004 * A_a + 0.9997 * A_b)
    check(ObjectiveConfig(objective="gspo"), loss, dict.fromkeys(TOKENS, 0.0))


def test_cispo():
    # Token mean over T_all = 5; detached weight clip(r, 0.8, 1.27).
    w = {"a0": 1.1, "a1": 1.27, "b0": 0.8, "b1": 1.0, "b2": 1.27}
    loss = -(1 / 5) * (w["a0"] * A_a * -1.0 + w["a1"] * A_a * -2.0
                       + w["b0"] * A_b * -0.5 + w["b1"] * A_b * -1.5 + w["b2"] * A_b * -3.0)
    grads = {t: -(1 / 5) * w[t] * (A_a if t[0] == "a" else A_b) for t in TOKENS}
    stats = check(ObjectiveConfig(objective="cispo", cispo_clip_low=0.2, cispo_clip_high=0.27),
                  loss, grads)
    assert stats["train/clipfrac_low"] == pytest.approx(1 / 5)  # b0
    assert stats["train/clipfrac_high"] == pytest.approx(2 / 5)  # a1, b2


def test_cispo_defaults_no_lower_bound():
    # Default: no lower bound, upper 1 + 4 = 5: no ratio here is clipped, weight = r.
    loss = -(1 / 5) * (1.1 * A_a * -1.0 + 1.5 * A_a * -2.0
                       + 0.7 * A_b * -0.5 + 1.0 * A_b * -1.5 + 1.3 * A_b * -3.0)
    grads = {t: -(1 / 5) * R[t] * (A_a if t[0] == "a" else A_b) for t in TOKENS}
    check(ObjectiveConfig(objective="cispo"), loss, grads)


def test_reinforce():
    loss = -(1 / 2) * (A_a * (-1.0 - 2.0) + A_b * (-0.5 - 1.5 - 3.0))
    grads = {t: -(1 / 2) * (A_a if t[0] == "a" else A_b) for t in TOKENS}
    stats = check(ObjectiveConfig(objective="reinforce"), loss, grads)
    assert stats["train/clipfrac"] == 0.0


# Corrections, applied to reinforce so that the weight c_t is all that changes:
# loss = -(1/2) sum_t c_t A lp_t, grad_t = -(1/2) c_t A.
CORRECTIONS = {
    "tis token C=5": (dict(correction="tis"),
                      {"a0": 1.0, "a1": 1.8, "b0": 0.6, "b1": 5.0, "b2": 0.25}, 0.0, 1 / 5),
    "tis token uncapped": (dict(correction="tis", is_cap=None), dict(RHO), 0.0, 0.0),
    "mis token [0.5, 2]": (dict(correction="mis"),
                           {"a0": 1.0, "a1": 1.8, "b0": 0.6, "b1": 0.0, "b2": 0.0}, 2 / 5, 0.0),
    "mis token [0.9, 10]": (dict(correction="mis", mis_low=0.9, mis_high=10.0),
                            {"a0": 1.0, "a1": 1.8, "b0": 0.0, "b1": 8.0, "b2": 0.0}, 2 / 5, 0.0),
    "icepop token [0.5, 5]": (dict(correction="icepop"),
                              {"a0": 1.0, "a1": 1.8, "b0": 0.6, "b1": 0.0, "b2": 0.0}, 2 / 5, 0.0),
    # Sequence level: rho_a = 1.0 * 1.8 = 1.8, rho_b = 0.6 * 8.0 * 0.25 = 1.2.
    "tis sequence C=5": (dict(correction="tis", correction_level="sequence"),
                         {"a0": 1.8, "a1": 1.8, "b0": 1.2, "b1": 1.2, "b2": 1.2}, 0.0, 0.0),
    "tis sequence C=1.5": (dict(correction="tis", correction_level="sequence", is_cap=1.5),
                           {"a0": 1.5, "a1": 1.5, "b0": 1.2, "b1": 1.2, "b2": 1.2}, 0.0, 2 / 5),
    "mis sequence [0.5, 1.5]": (dict(correction="mis", correction_level="sequence",
                                     mis_high=1.5),
                                {"a0": 0.0, "a1": 0.0, "b0": 1.2, "b1": 1.2, "b2": 1.2}, 2 / 5, 0.0),
    "icepop sequence [0.5, 5]": (dict(correction="icepop", correction_level="sequence"),
                                 {"a0": 1.8, "a1": 1.8, "b0": 1.2, "b1": 1.2, "b2": 1.2}, 0.0, 0.0),
    "none": (dict(correction="none"), dict.fromkeys(TOKENS, 1.0), 0.0, 0.0),
}


@pytest.mark.parametrize("case", list(CORRECTIONS))
def test_corrections(case):
    flags, c, masked_frac, truncated_frac = CORRECTIONS[case]
    adv = {t: A_a if t[0] == "a" else A_b for t in TOKENS}
    loss = -(1 / 2) * sum(c[t] * adv[t] * LP[t] for t in TOKENS)
    grads = {t: -(1 / 2) * c[t] * adv[t] for t in TOKENS}
    stats = check(ObjectiveConfig(objective="reinforce", **flags), loss, grads)
    assert stats["mismatch/correction_masked_frac"] == pytest.approx(masked_frac)
    assert stats["mismatch/correction_truncated_frac"] == pytest.approx(truncated_frac)
    assert stats["mismatch/correction_weight_mean"] == pytest.approx(sum(c.values()) / 5)


def test_correction_composes_with_minirl_clip():
    # minirl + icepop: c = [1, 1.8, 0.6, 0, 0]; M as in test_minirl; only a0 survives.
    loss = -(1 / 2) * (1.0 * 1.1 * A_a * -1.0)
    grads = {"a0": -(1 / 2) * 1.1 * A_a, "a1": 0.0, "b0": 0.0, "b1": 0.0, "b2": 0.0}
    check(ObjectiveConfig(correction="icepop"), loss, grads)


def test_bfloat16_inputs_are_computed_in_float32():
    inputs, _ = golden_inputs()
    leaf = inputs.logprobs.detach().to(torch.bfloat16).requires_grad_(True)
    out = compute_loss(dataclasses.replace(inputs, logprobs=leaf), ObjectiveConfig())
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert leaf.grad.dtype == torch.bfloat16
    # Same hand value as test_minirl (bf16 holds these log-probabilities exactly).
    want = -(1 / 2) * (1.0 * 1.1 * A_a * -1.0 + 5.0 * 1.0 * A_b * -1.5 + 0.25 * 1.3 * A_b * -3.0)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)


# Reference KL and entropy terms (loss/regularizers.py), added to reinforce so that the
# objective's part stays -(1/2) sum_t A lp_t. d_t = log pi_theta - log pi_ref per token:
D = {"a0": 0.0, "a1": 0.5, "b0": -0.25, "b1": 1.0, "b2": -1.0}
REINFORCE_LOSS = -(1 / 2) * (A_a * (-1.0 - 2.0) + A_b * (-0.5 - 1.5 - 3.0))
REINFORCE_GRADS = {t: -(1 / 2) * (A_a if t[0] == "a" else A_b) for t in TOKENS}
# estimator: (k(d), dk/dd), written out
KL_ESTIMATORS = {
    "k1": (lambda d: d, lambda d: 1.0),
    "k2": (lambda d: d * d / 2, lambda d: d),
    "k3": (lambda d: math.exp(-d) - 1 + d, lambda d: 1 - math.exp(-d)),
}


def reference_inputs():
    inputs, leaf = golden_inputs()
    ref = torch.tensor([-INF if t is None else LP[t] - D[t] for t in LAYOUT], dtype=torch.float64)
    ref[7] = NAN  # garbage where the mask is False
    return dataclasses.replace(inputs, ref_logprobs=ref), leaf


def run_reference(config: ObjectiveConfig):
    inputs, leaf = reference_inputs()
    out = compute_loss(inputs, config)
    out.loss.backward()
    grads = {t: float(leaf.grad[i]) for i, t in enumerate(LAYOUT) if t}
    assert float(leaf.grad[0]) == float(leaf.grad[3]) == float(leaf.grad[7]) == 0.0
    return float(out.loss.detach()), grads, results(out.stats)


@pytest.mark.parametrize("estimator", list(KL_ESTIMATORS))
def test_reference_kl(estimator):
    k, dk = KL_ESTIMATORS[estimator]
    beta = 0.3
    # Reduced as reinforce reduces its terms: summed per response, averaged over N = 2.
    kl_loss = beta * (1 / 2) * sum(k(D[t]) for t in TOKENS)
    loss, grads, stats = run_reference(
        ObjectiveConfig(objective="reinforce", kl_coef=beta, kl_estimator=estimator))
    assert loss == pytest.approx(REINFORCE_LOSS + kl_loss, rel=1e-12, abs=1e-12)
    for t in TOKENS:
        want = REINFORCE_GRADS[t] + beta * (1 / 2) * dk(D[t])
        assert grads[t] == pytest.approx(want, rel=1e-12, abs=1e-12), t
    assert stats["train/kl_ref"] == pytest.approx(sum(k(D[t]) for t in TOKENS) / 5, rel=1e-12)
    assert stats["train/objective_loss"] == pytest.approx(REINFORCE_LOSS, rel=1e-12)
    assert stats["train/loss"] == pytest.approx(REINFORCE_LOSS + kl_loss, rel=1e-12)


def test_k3_values():
    # k3 = ref/pi - 1 - log(ref/pi) >= 0, 0 only where pi = ref; k1 takes both signs.
    k3 = {t: KL_ESTIMATORS["k3"][0](D[t]) for t in TOKENS}
    assert k3["a0"] == 0.0
    assert k3["b1"] == pytest.approx(math.exp(-1) - 1 + 1)  # 0.3679
    assert k3["b2"] == pytest.approx(math.e - 1 - 1)  # 0.7183
    _, _, stats = run_reference(ObjectiveConfig(objective="reinforce", kl_coef=1.0))
    assert stats["train/kl_ref"] == pytest.approx(sum(k3.values()) / 5)


@pytest.mark.parametrize("objective", ["grpo", "cispo", "minirl"])
def test_reference_kl_is_reduced_like_the_objective(objective):
    """grpo: (1/N) sum_i (1/|y_i|) sum_t; cispo: (1/T_all) sum_t; minirl: (1/N) sum_i sum_t."""
    k, dk = KL_ESTIMATORS["k3"]
    beta = 0.5
    base, base_grads, _ = run(ObjectiveConfig(objective=objective))
    length = {"a": 2, "b": 3}
    scale = {"grpo": {t: (1 / 2) / length[t[0]] for t in TOKENS},
             "cispo": dict.fromkeys(TOKENS, 1 / 5),
             "minirl": dict.fromkeys(TOKENS, 1 / 2)}[objective]
    loss, grads, _ = run_reference(ObjectiveConfig(objective=objective, kl_coef=beta))
    assert loss == pytest.approx(base + beta * sum(scale[t] * k(D[t]) for t in TOKENS), rel=1e-12)
    for t in TOKENS:
        want = base_grads[t] + beta * scale[t] * dk(D[t])
        assert grads[t] == pytest.approx(want, rel=1e-12, abs=1e-12), t


def test_entropy_bonus():
    inputs, leaf = golden_inputs()
    entropy = inputs.entropy.clone().requires_grad_(True)
    alpha = 0.2
    out = compute_loss(dataclasses.replace(inputs, entropy=entropy),
                       ObjectiveConfig(objective="reinforce", entropy_coef=alpha))
    out.loss.backward()
    # -alpha x (1/N) sum_i sum_t H_t; prompt/padding entropies (NaN, 3.0, inf) ignored.
    bonus = -alpha * (1 / 2) * (0.5 + 1.5 + 2.0 + 1.0 + 0.0)
    assert float(out.loss.detach()) == pytest.approx(REINFORCE_LOSS + bonus, rel=1e-12)
    for i, t in enumerate(LAYOUT):
        assert float(entropy.grad[i]) == (-alpha * (1 / 2) if t else 0.0), i
        if t:
            assert float(leaf.grad[i]) == pytest.approx(REINFORCE_GRADS[t], rel=1e-12)
    stats = results(out.stats)
    assert stats["train/objective_loss"] == pytest.approx(REINFORCE_LOSS)
    assert "train/kl_ref" not in stats


def test_kl_and_entropy_off_by_default():
    """The paper's setting: no reference term even when reference log-probs are given."""
    loss, grads, stats = run_reference(ObjectiveConfig(objective="reinforce"))
    assert loss == pytest.approx(REINFORCE_LOSS, rel=1e-12)
    assert grads == pytest.approx(REINFORCE_GRADS, rel=1e-12)
    assert "train/kl_ref" not in stats and "train/objective_loss" not in stats


def test_reference_inputs_are_checked():
    inputs, _ = golden_inputs()
    with pytest.raises(LossInputError, match="--rl-kl-coef 0.1 needs LossInputs.ref_logprobs"):
        compute_loss(inputs, ObjectiveConfig(kl_coef=0.1))
    with pytest.raises(LossInputError, match="--rl-entropy-coef 0.1 needs LossInputs.entropy"):
        compute_loss(dataclasses.replace(inputs, entropy=None), ObjectiveConfig(entropy_coef=0.1))
    ref_inputs, _ = reference_inputs()
    bad = ref_inputs.ref_logprobs.clone()
    bad[5] = -INF  # b1: a sampled token the reference gives probability 0
    with pytest.raises(LossInputError, match=r"ref_logprobs\[5\] = -inf \(sample 1\)"):
        compute_loss(dataclasses.replace(ref_inputs, ref_logprobs=bad), ObjectiveConfig(kl_coef=0.1))
    with pytest.raises(LossInputError, match="ref_logprobs has shape"):
        compute_loss(dataclasses.replace(ref_inputs, ref_logprobs=bad[:4]), ObjectiveConfig(kl_coef=0.1))
