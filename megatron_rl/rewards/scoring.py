"""Score rollout samples with the task's reward (reasoning-gym's scorer or a user's).

A scorer that raises on a response (a parse failure) gives reward 0 for that response;
the failure is counted and logged with the sample, never dropped silently. A scorer that
returns something other than a usable reward (NaN, inf, not a number, beyond
``REWARD_LIMIT``) has a bug: :class:`RewardError` stops the run, naming the sample.
"""

from __future__ import annotations

import logging

from megatron_rl.data.tasks import RewardError, Task, TaskItem
from megatron_rl.metrics.stats import Stat
from megatron_rl.rollout.types import RolloutSample

logger = logging.getLogger(__name__)


def score_samples(
    samples: list[RolloutSample],
    items: dict[int, TaskItem],
    task: Task,
    tokenizer,
) -> dict[str, Stat]:
    """Set ``sample.reward`` for every sample (``items`` maps prompt_index -> item).

    Returns :func:`reward_stats` of the samples."""
    for sample in samples:
        item = items[sample.prompt_index]
        text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        sample.metadata["response_text"] = text
        try:
            sample.reward = float(task.score(text, item))
        except RewardError as exc:
            raise RewardError(f"{exc}; sample {sample.request_id}, response "
                              f"{text[:80]!r}") from exc
        except Exception as exc:  # a user scorer may raise anything on odd text
            sample.reward = 0.0
            sample.metadata["reward_error"] = repr(exc)
            logger.warning("reward of %s failed on %r: %r", sample.request_id, text[:80], exc)
    return reward_stats(samples)


def reward_stats(samples: list[RolloutSample]) -> dict[str, Stat]:
    """Reward failures, truncated (length-capped) responses and fully correct responses
    (reward 1; scorers may give partial credit below it) among scored ``samples``."""
    failures = sum(1 for s in samples if "reward_error" in s.metadata)
    truncated = sum(1 for s in samples if s.finish_reason == "length")
    correct = sum(1 for s in samples if s.reward is not None and s.reward >= 1.0)
    n = float(len(samples))
    return {
        "rollout/reward_failure_frac": Stat(float(failures), n, "mean"),
        "rollout/truncated_frac": Stat(float(truncated), n, "mean"),
        "rollout/correct_frac": Stat(float(correct), n, "mean"),
    }
