"""Advantage estimators and rollout statistics."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.advantages import (
    ESTIMATORS,
    AdvantageError,
    compute_advantages,
    group_mean,
    rollout_stats,
)
from megatron_rl.loss import derived_metrics
from megatron_rl.loss.config import ADVANTAGE_ESTIMATORS
from megatron_rl.metrics.stats import merge_stats, results

# Two prompts with 3 responses each, a third whose responses all scored the same.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
GROUPS = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9, 9])


def test_names_match_config():
    assert tuple(ESTIMATORS) == ADVANTAGE_ESTIMATORS


def test_group_mean():
    mean_7, mean_3 = (1 + 0 + 0) / 3, (0.5 + 1 + 0) / 3
    want = [1 - mean_7, 0 - mean_7, 0 - mean_7, 0.5 - mean_3, 1 - mean_3, 0 - mean_3, 0, 0, 0]
    got = group_mean(REWARDS, GROUPS)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got[6:].eq(0).all()  # exactly 0, not rounding noise


def test_group_mean_std():
    mean_7 = 1 / 3
    std_7 = math.sqrt(((1 - mean_7) ** 2 + 2 * mean_7**2) / 2)  # Bessel: divide by G - 1
    # group 3: rewards 0.5, 1, 0 -> mean 0.5, deviations 0, 0.5, -0.5
    std_3 = math.sqrt((0**2 + 0.5**2 + 0.5**2) / 2)
    eps = 1e-6
    want = [(1 - mean_7) / (std_7 + eps), -mean_7 / (std_7 + eps), -mean_7 / (std_7 + eps),
            0.0, 0.5 / (std_3 + eps), -0.5 / (std_3 + eps), 0.0, 0.0, 0.0]
    got = compute_advantages(REWARDS, GROUPS, "group_mean_std", std_eps=eps)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_ragged_groups():
    got = group_mean(torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1, 1]))
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0]))


@pytest.mark.parametrize("estimator", ["group_mean", "group_mean_std"])
def test_group_of_one_is_an_error(estimator):
    with pytest.raises(AdvantageError, match=f"{estimator}: group 4 has a single response"):
        compute_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2, 2, 4]), estimator)


def test_user_estimator():
    got = compute_advantages(REWARDS, GROUPS, "loss_batches:custom_estimator")
    torch.testing.assert_close(got, REWARDS - REWARDS.mean())


def test_bad_rewards():
    with pytest.raises(AdvantageError, match=r"reward of response 1 \(group 7\) is nan"):
        compute_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([7, 7]))
    with pytest.raises(AdvantageError, match="rewards must be \\[N\\] and group_ids the same shape"):
        compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([7, 7, 7]))
    with pytest.raises(ValueError, match="unknown advantage estimator 'median'"):
        compute_advantages(REWARDS, GROUPS, "median")


def test_rollout_stats_and_exact_merge():
    lengths = torch.tensor([3, 5, 2, 7, 4, 6, 1, 5, 9])
    adv = group_mean(REWARDS, GROUPS)
    whole = results(rollout_stats(REWARDS, GROUPS, adv, lengths))
    assert whole["rollout/reward_mean"] == pytest.approx(float(REWARDS.mean()))
    assert whole["rollout/zero_adv_group_frac"] == pytest.approx(1 / 3)
    assert whole["rollout/response_length_mean"] == pytest.approx(42 / 9)
    assert whole["rollout/response_length_max"] == 9.0
    std = derived_metrics(whole)["rollout/reward_std"]
    assert std == pytest.approx(float(REWARDS.std(unbiased=False)))
    # Whole groups split over two ranks reduce to the same figures.
    parts = [slice(0, 3), slice(3, 9)]
    merged = results(merge_stats([rollout_stats(REWARDS[s], GROUPS[s], adv[s], lengths[s]) for s in parts]))
    assert merged.keys() == whole.keys()
    for name in whole:
        assert merged[name] == pytest.approx(whole[name], rel=1e-12), name
