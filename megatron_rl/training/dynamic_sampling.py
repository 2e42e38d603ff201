"""Dynamic sampling: drop groups that give no learning signal, draw more prompts to refill.

A group whose G rewards are all equal has zero advantage under every group-normalised
estimator, so it adds nothing to the gradient while it still counts in the batch (DAPO's
dynamic sampling). With ``--rl-filter-groups`` each data-parallel rank keeps only groups
that pass the filter (default: rewards not all equal; ``--rl-group-filter`` replaces the
rule) and, while some rank is short, all ranks draw extra prompts from the task stream
and generate them -- each rank's extra prompts as one batch, one generation round trip
per round -- up to ``--rl-max-sampling-rounds`` rounds in all.

The batch handed to the trainer always has exactly its configured size (B/DP groups per
rank), so the loss's global denominators stay exact: surplus passing groups are left out,
and when the rounds run out before a rank is full, it is filled with the earliest groups
the filter dropped -- zero-advantage groups, as without filtering -- counted in
``dynamic_sampling/groups_filled`` and logged. The extra prompts advance the data position
saved in checkpoints, so a resumed run draws what the uninterrupted one drew.

Rounds are decided together: after each round every rank learns every rank's shortfall
(one small all-gather), so all ranks draw the same prompts, advance the data position
alike and leave the loop at the same round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.import_path import load_callable
from megatron_rl.config.run_view import RunView
from megatron_rl.data.tasks import TaskItem
from megatron_rl.metrics.stats import Stat
from megatron_rl.rollout.types import RolloutSample

logger = logging.getLogger(__name__)

GroupFilter = Callable[[list[RolloutSample], TaskItem], bool]


@dataclass(kw_only=True, frozen=True)
class DynamicSamplingConfig:
    """Which groups reach the trainer, and how hard to look for replacements."""

    flag_prefix: ClassVar[str] = "--rl-"

    filter_groups: bool = False
    """Drop groups whose rewards are all equal (zero advantage, zero gradient) and draw
    more prompts until every rank's share of the batch is full (DAPO's dynamic sampling).
    The batch keeps its exact size: when --rl-max-sampling-rounds run out first, dropped
    groups fill it (dynamic_sampling/groups_filled)."""
    max_sampling_rounds: int = 4
    """With --rl-filter-groups: generation rounds per step at most, the first included.
    Each further round draws, for each rank still short, its shortfall divided by the
    fraction of groups kept so far (at most its share of the batch) and generates them
    as one batch."""
    group_filter: str | None = None
    """With --rl-filter-groups: a user rule as module:function(samples, item) -> bool,
    True keeping the group; ``samples`` are one prompt's G RolloutSamples with their
    rewards (response text in metadata['response_text']), ``item`` its TaskItem.
    Default: keep groups whose rewards are not all equal."""

    def validate(self, run: RunView) -> None:
        if self.max_sampling_rounds < 1:
            raise ConfigError(
                f"--rl-max-sampling-rounds {self.max_sampling_rounds}: must be at least 1")
        if self.group_filter is not None:
            if not self.filter_groups:
                raise ConfigError(f"--rl-group-filter {self.group_filter} needs "
                                  f"--rl-filter-groups (the filter only runs with it)")
            self.load_filter()

    def load_filter(self) -> GroupFilter:
        """The rule in force: the user's function or :func:`rewards_differ`."""
        if self.group_filter is None:
            return rewards_differ
        try:
            return load_callable(self.group_filter, what="--rl-group-filter")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def max_prompts_per_step(self, prompts_per_step: int) -> int:
        """Most prompts one step can draw: each extra round draws at most one batch."""
        if not self.filter_groups:
            return prompts_per_step
        return prompts_per_step * self.max_sampling_rounds


def rewards_differ(samples: list[RolloutSample], item: TaskItem | None = None) -> bool:
    """The default rule: a group is kept when its rewards are not all equal."""
    rewards = [s.reward for s in samples]
    if any(r is None for r in rewards):
        raise ValueError(f"group of prompt {samples[0].prompt_index} has unscored samples")
    return max(rewards) != min(rewards)


def plan_extra_prompts(shortfalls: list[int], prompts_per_rank: int, kept: int,
                       judged: int) -> list[int]:
    """Prompts each data-parallel rank draws in the next round.

    ``shortfalls[r]``: groups rank r still needs; ``kept`` / ``judged``: groups that passed
    the filter / were filtered so far, over all ranks. A rank draws its shortfall divided
    by the kept fraction (rounded up), at least its shortfall, at most its whole share of
    the batch (``prompts_per_rank``; also when nothing has been kept yet)."""
    rate = kept / judged if judged else 0.0
    plan = []
    for short in shortfalls:
        if short <= 0:
            plan.append(0)
        elif rate <= 0.0:
            plan.append(prompts_per_rank)
        else:
            plan.append(max(short, min(prompts_per_rank, math.ceil(short / rate))))
    return plan


@dataclass
class GroupPool:
    """One rank's groups of a step: those that passed the filter and those dropped, each
    in the order drawn (prompt indices increase with the draw)."""

    need: int
    kept: list[list[RolloutSample]] = field(default_factory=list)
    dropped: list[list[RolloutSample]] = field(default_factory=list)

    @property
    def shortfall(self) -> int:
        return max(self.need - len(self.kept), 0)

    def add(self, groups: list[list[RolloutSample]], keep: list[bool]) -> None:
        for group, ok in zip(groups, keep, strict=True):
            (self.kept if ok else self.dropped).append(group)

    def batch(self, group_size: int) -> tuple[list[RolloutSample], int]:
        """Exactly ``need`` groups, in draw order: the first kept ones, then (rounds run
        out) the earliest dropped ones. Returns (samples, groups filled from dropped)."""
        chosen = self.kept[: self.need]
        filled = self.need - len(chosen)
        if filled > len(self.dropped):
            raise RuntimeError(f"dynamic sampling: {len(self.kept)} kept and "
                               f"{len(self.dropped)} dropped groups cannot make {self.need}")
        chosen = sorted(chosen + self.dropped[:filled], key=lambda g: g[0].prompt_index)
        samples = [s for group in chosen for s in group]
        if len(samples) != self.need * group_size or any(len(g) != group_size for g in chosen):
            raise RuntimeError(f"dynamic sampling: the batch holds {len(samples)} samples in "
                               f"{len(chosen)} groups, not {self.need} groups of {group_size}")
        return samples, filled


def split_groups(samples: list[RolloutSample]) -> list[list[RolloutSample]]:
    """Samples grouped by prompt, groups in prompt-index order, samples in sample order."""
    groups: dict[int, list[RolloutSample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_index, []).append(s)
    return [sorted(groups[i], key=lambda s: s.sample_index) for i in sorted(groups)]


@dataclass
class SampledBatch:
    """What dynamic sampling hands the loop."""

    samples: list[RolloutSample] | None
    """This rank's batch (data-group leaders; None elsewhere)."""
    stats: dict[str, Stat]
    """Per-rank sums, reduced with the step's other statistics (leaders only)."""
    scalars: dict[str, float]
    """Figures every rank knows alike."""


class DynamicSampler:
    """Runs the rounds of one step. The loop supplies how to generate and score a round's
    prompts (leaders), how to draw prompts from the stream (every rank, advancing the data
    position), and how ranks exchange their tallies (an all-gather over the world)."""

    def __init__(self, config: DynamicSamplingConfig, group_size: int) -> None:
        self.config = config
        self.group_size = group_size
        self.rule = config.load_filter()

    def keep(self, group: list[RolloutSample], item: TaskItem) -> bool:
        verdict = self.rule(group, item)
        if not isinstance(verdict, bool):
            raise TypeError(f"--rl-group-filter {self.config.group_filter} returned "
                            f"{verdict!r} ({type(verdict).__name__}) for prompt "
                            f"{group[0].prompt_index} ({item.prompt!r}); it must return a bool")
        return verdict

    def sample(
        self,
        first: dict[int, TaskItem],
        *,
        need: int,
        prompts_per_step: int,
        dp_rank: int,
        dp_size: int,
        is_leader: bool,
        generate: Callable[[dict[int, TaskItem]], list[RolloutSample]],
        draw: Callable[[int], list[TaskItem]],
        exchange: Callable[[Any], list[Any]],
    ) -> SampledBatch:
        """``first``: this rank's prompts of the step's first round (keys: prompt index in
        the step, 0 .. prompts_per_step - 1); extra prompts get the next indices, so
        request ids and sampling seeds stay unique within the step. ``need``: groups this
        rank must hand over. ``exchange(x)`` returns every rank's ``x``."""
        pool = GroupPool(need)
        items = first
        next_index = prompts_per_step
        rounds, extra_prompts = 1, 0
        judged_reward = correct = 0.0
        judged_samples = 0
        while True:
            if is_leader and items:
                samples = generate(items)
                groups = split_groups(samples)
                pool.add(groups, [self.keep(g, items[g[0].prompt_index]) for g in groups])
                judged_samples += len(samples)
                judged_reward += sum(float(s.reward) for s in samples)
                correct += sum(1.0 for s in samples if s.reward >= 1.0)
            tallies = exchange((dp_rank, is_leader, pool.shortfall, len(pool.kept),
                                len(pool.kept) + len(pool.dropped)))
            leaders = sorted(t for t in tallies if t[1])
            shortfalls = [t[2] for t in leaders]
            if not any(shortfalls) or rounds >= self.config.max_sampling_rounds:
                break
            plan = plan_extra_prompts(shortfalls, prompts_per_step // dp_size,
                                      sum(t[3] for t in leaders), sum(t[4] for t in leaders))
            drawn = draw(sum(plan))
            start = sum(plan[:dp_rank])
            items = {next_index + start + k: item
                     for k, item in enumerate(drawn[start:start + plan[dp_rank]])}
            next_index += sum(plan)
            extra_prompts += sum(plan)
            rounds += 1
        scalars = {"dynamic_sampling/rounds": float(rounds),
                   "dynamic_sampling/extra_prompts": float(extra_prompts),
                   "dynamic_sampling/extra_samples": float(extra_prompts * self.group_size)}
        if not is_leader:
            return SampledBatch(None, {}, scalars)
        batch, filled = pool.batch(self.group_size)
        if filled:
            logger.warning("dynamic sampling: %d of %d groups on data-parallel rank %d passed "
                           "the filter after %d rounds; %d dropped groups fill the batch "
                           "(--rl-max-sampling-rounds)", len(pool.kept), need, dp_rank, rounds,
                           filled)
        used = need - filled
        stats = {
            "dynamic_sampling/groups_kept": Stat(float(used), 1.0, "sum"),
            "dynamic_sampling/groups_dropped": Stat(float(len(pool.dropped)), 1.0, "sum"),
            "dynamic_sampling/groups_filled": Stat(float(filled), 1.0, "sum"),
            "dynamic_sampling/groups_unused": Stat(float(len(pool.kept) - used), 1.0, "sum"),
            "dynamic_sampling/generated_reward_mean": Stat(judged_reward, judged_samples),
            "dynamic_sampling/generated_correct_frac": Stat(correct, judged_samples),
        }
        return SampledBatch(batch, stats, scalars)


__all__ = ["DynamicSamplingConfig", "DynamicSampler", "GroupPool", "plan_extra_prompts",
           "rewards_differ", "split_groups"]
