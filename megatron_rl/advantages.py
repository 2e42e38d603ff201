"""Advantage estimators: from one reward per response to one advantage per response.

Responses come in groups (the G responses to one prompt), identified by ``group_ids``.
An estimator is a function ``(rewards [N], group_ids [N]) -> advantages [N]``; the
built-ins are chosen by name, a user's by ``package.module:function``. Groups may have
different sizes (e.g. after dropping aborted responses) but must be whole: every
response of a group on the same rank when advantages are computed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from megatron_rl.config.import_path import load_callable
from megatron_rl.loss.config import is_import_path
from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.metrics.stats import Stat

logger = logging.getLogger(__name__)

Estimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# A group counts as giving no learning signal when all its |A| are at most this.
ZERO_ADVANTAGE_ATOL = 1e-9


class AdvantageError(ValueError):
    """Rewards or groups an estimator cannot use; the message names the group/response."""


def _groups(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique group ids, index of each response's group, size of each group)."""
    unique, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return unique, inverse, sizes


def _require_pairs(name: str, unique: torch.Tensor, sizes: torch.Tensor) -> None:
    single = sizes < 2
    if bool(single.any()):
        gid = int(unique[single.nonzero()[0, 0]])
        raise AdvantageError(
            f"{name}: group {gid} has a single response ({int(single.sum())} such groups); "
            f"a group-normalised estimator needs at least 2 responses per prompt (with one, "
            f"the advantage is always 0 or undefined): sample more responses per prompt"
        )


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, name: str):
    unique, inverse, sizes = _groups(group_ids)
    _require_pairs(name, unique, sizes)
    values = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    sums = values.new_zeros(len(unique)).index_add(0, inverse, values)
    mean = sums / sizes
    high = values.new_full((len(unique),), -torch.inf).scatter_reduce(0, inverse, values, "amax")
    low = values.new_full((len(unique),), torch.inf).scatter_reduce(0, inverse, values, "amin")
    return values, inverse, sizes, mean, high == low


def group_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A = R - mean of R over the group (the paper's MiniRL advantage, no std)."""
    values, inverse, _, mean, constant = _group_stats(rewards, group_ids, "group_mean")
    advantages = values - mean[inverse]
    # Equal rewards give exactly 0, not the rounding error of the mean.
    return torch.where(constant[inverse], torch.zeros_like(advantages), advantages)


def group_mean_std(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """A = (R - mean) / (std + eps) over the group, std with Bessel's correction (GRPO)."""
    values, inverse, sizes, mean, constant = _group_stats(rewards, group_ids, "group_mean_std")
    centred = values - mean[inverse]
    squares = values.new_zeros(len(sizes)).index_add(0, inverse, centred * centred)
    std = (squares / (sizes - 1)).sqrt()
    advantages = centred / (std[inverse] + eps)
    return torch.where(constant[inverse], torch.zeros_like(advantages), advantages)


ESTIMATORS: dict[str, Estimator] = {"group_mean": group_mean, "group_mean_std": group_mean_std}


def get_estimator(name: str, *, std_eps: float = 1e-6) -> Estimator:
    """A built-in estimator by name, or a user's ``package.module:function``."""
    if name == "group_mean_std":
        return functools.partial(group_mean_std, eps=std_eps)
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    if is_import_path(name):
        logger.info("using user advantage estimator %s", name)
        return load_callable(name, what="advantage estimator")
    raise ValueError(
        f"unknown advantage estimator {name!r}; choose one of {', '.join(ESTIMATORS)} "
        f"or give 'package.module:function'"
    )


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    estimator: str = "group_mean",
    *,
    std_eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages ``[N]`` of responses with ``rewards [N]`` in groups ``group_ids [N]``.

    ``estimator`` is usually ``ObjectiveConfig.estimator_in_force()``. Inputs and the
    estimator's output are checked (shape, finiteness)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise AdvantageError(
            f"rewards must be [N] and group_ids the same shape, got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point():
        raise AdvantageError(f"group_ids must be integers, got {group_ids.dtype}")
    if rewards.numel() == 0:
        raise AdvantageError("no rewards: the rollout batch is empty")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AdvantageError(
            f"reward of response {i} (group {int(group_ids[i])}) is {float(rewards[i])}; "
            f"rewards must be finite ({int(bad.sum())} are not)"
        )
    advantages = get_estimator(estimator, std_eps=std_eps)(rewards, group_ids)
    if not isinstance(advantages, torch.Tensor) or advantages.shape != rewards.shape:
        shape = (
            tuple(advantages.shape)
            if isinstance(advantages, torch.Tensor)
            else type(advantages).__name__
        )
        raise AdvantageError(
            f"advantage estimator {estimator!r} returned {shape}, expected {tuple(rewards.shape)}"
        )
    bad = ~torch.isfinite(advantages)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AdvantageError(
            f"advantage estimator {estimator!r} gave {float(advantages[i])} for response {i} "
            f"(group {int(group_ids[i])})"
        )
    return advantages


def rollout_stats(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    response_lengths: torch.Tensor,
) -> dict[str, Stat]:
    """``rollout/*`` statistics of whole groups; merge ranks' dicts to reduce exactly.

    ``rollout/reward_std`` is derived after reduction by ``loss.derived_metrics``."""
    stats = StatCollector()
    everything = torch.ones_like(rewards, dtype=torch.bool)
    rewards = rewards.double()
    stats.mean("rollout/reward_mean", rewards, everything)
    stats.mean("rollout/reward_sq_mean", rewards * rewards, everything)
    unique, inverse, _ = _groups(group_ids)
    largest = advantages.new_zeros(len(unique), dtype=torch.float64).scatter_reduce(
        0, inverse, advantages.detach().double().abs(), "amax"
    )
    zero = largest <= ZERO_ADVANTAGE_ATOL
    stats.mean("rollout/zero_adv_group_frac", zero, torch.ones_like(zero))
    lengths = response_lengths.double()
    stats.mean("rollout/response_length_mean", lengths, everything)
    stats.extreme("rollout/response_length_max", lengths, everything, "max")
    return stats.stats()
