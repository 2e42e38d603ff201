"""The same mini-batch cut 1, 2 and 4 ways (micro-batches with padding, context-parallel
chunks joined by a differentiable seq_sum, both at once) gives the same loss, the same
gradient and the same merged statistics, for every objective and correction.

Tolerances: float64 rtol 1e-10 / atol 1e-12 (only summation order differs); float32
rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from loss_batches import SPLITS, make_batch, run_split, split

from megatron_rl.arguments import RunConfig
from megatron_rl.loss import OBJECTIVES, ObjectiveConfig
from megatron_rl.metrics.stats import merge_stats, results

LENGTHS = [3, 5, 2, 7, 4, 6, 1, 5]

CONFIGS = {name: ObjectiveConfig(objective=name) for name in OBJECTIVES}
CONFIGS.update(
    {
        f"minirl+{kind}@{level}": ObjectiveConfig(correction=kind, correction_level=level)
        for kind in ("none", "tis", "mis", "icepop")
        for level in ("token", "sequence")
    }
)
CONFIGS.update(
    {
        "minirl+tis_uncapped": ObjectiveConfig(is_cap=None),
        "gspo_wide": ObjectiveConfig(objective="gspo", gspo_clip_low=0.1, gspo_clip_high=0.1),
        "gspo_wide+tis@sequence": ObjectiveConfig(
            objective="gspo", gspo_clip_low=0.1, gspo_clip_high=0.1,
            correction="tis", correction_level="sequence", is_cap=2.0,
        ),
        "cispo_two_sided+mis": ObjectiveConfig(
            objective="cispo", cispo_clip_low=0.2, cispo_clip_high=0.27, correction="mis"
        ),
        "grpo+icepop": ObjectiveConfig(objective="grpo", correction="icepop"),
        "ppo+mis@sequence": ObjectiveConfig(
            objective="ppo", correction="mis", correction_level="sequence",
            mis_low=0.05, mis_high=20.0,
        ),
    }
)
# The reference KL and the entropy bonus, under each of the three reductions they follow
# (the objective's: sum per response / N, length-normalised / N, token mean / T_all).
CONFIGS.update(
    {
        f"{name}+kl_{estimator}+entropy": ObjectiveConfig(
            objective=name, kl_coef=0.2, kl_estimator=estimator, entropy_coef=0.05)
        for name in ("minirl", "grpo", "cispo")
        for estimator in ("k1", "k2", "k3")
    }
)


def _evaluate(config: ObjectiveConfig, split_name: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    current = -torch.rand(sum(LENGTHS), generator=gen, dtype=dtype) * 3 - 0.05
    batch = make_batch(current, LENGTHS, seed=2)
    leaf = current.clone().requires_grad_(True)
    loss, stats = run_split(batch, split(batch, split_name), leaf, config)
    loss.backward()
    return loss.detach(), leaf.grad, results(merge_stats(stats))


def _assert_stats_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        if math.isnan(b):
            assert math.isnan(a), name
        else:
            assert a == pytest.approx(b, rel=rtol, abs=atol), name


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_splits_agree_float64(config_name):
    config = CONFIGS[config_name]
    run = RunConfig()
    config.validate(run.replace(checkpoint=dataclasses.replace(run.checkpoint, load="ckpt")))
    ref_loss, ref_grad, ref_stats = _evaluate(config, "whole", torch.float64)
    assert torch.isfinite(ref_loss)
    assert ref_grad.abs().sum() > 0, "the batch must produce a gradient to compare"
    for name in SPLITS[1:]:
        loss, grad, stats = _evaluate(config, name, torch.float64)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, msg=name)
        _assert_stats_close(stats, ref_stats, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", [*OBJECTIVES, "minirl+kl_k3+entropy"])
def test_splits_agree_float32(objective):
    config = CONFIGS[objective]
    ref_loss, ref_grad, _ = _evaluate(config, "whole", torch.float32)
    for name in ("micro-4", "cp-4", "micro2xcp2"):
        loss, grad, _ = _evaluate(config, name, torch.float32)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_exercised_regimes():
    """The shared batch really clips, truncates and masks, or the tests above prove little."""
    _, _, stats = _evaluate(ObjectiveConfig(), "whole", torch.float64)
    assert 0 < stats["train/clipfrac_low"] < 1 and 0 < stats["train/clipfrac_high"] < 1
    assert 0 < stats["mismatch/correction_truncated_frac"] < 1
    _, _, stats = _evaluate(CONFIGS["minirl+mis@sequence"], "whole", torch.float64)
    assert 0 < stats["mismatch/correction_masked_frac"] < 1
    _, _, stats = _evaluate(CONFIGS["gspo_wide"], "whole", torch.float64)
    assert 0 < stats["train/clipfrac"] < 1
