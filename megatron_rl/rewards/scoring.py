"""Score rollout samples with the task's reward (reasoning-gym's scorer or a user's).

A scorer that raises on a response (a parse failure) gives reward 0 for that response;
the failure is counted and logged with the sample, never dropped silently. A scorer that
returns something other than a usable reward (NaN, inf, not a number, beyond
``REWARD_LIMIT``) has a bug: :class:`RewardError` stops the run, naming the sample.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

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


class GroupScorer:
    """Scores each prompt's group as soon as its last sample is back, while the rest of the
    batch is still generating: locally in a worker thread, or as requests to the reward
    service (``remote``). Feed :meth:`on_sample` from the rollout client's per-sample
    callback; :meth:`finish` scores whatever never completed a group and waits."""

    def __init__(self, items: dict[int, TaskItem], group_size: int, task: Task, tokenizer,
                 remote=None) -> None:
        self.items, self.group_size, self.task, self.tokenizer = items, group_size, task, tokenizer
        self.remote = remote
        self._local = None if remote is not None else ThreadPoolExecutor(
            1, thread_name_prefix="reward")
        self._pending: dict[int, list[RolloutSample]] = {}
        self._futures: list[Future] = []
        self._scored: set[int] = set()
        self._first: float | None = None

    def on_sample(self, sample: RolloutSample) -> None:
        group = self._pending.setdefault(sample.prompt_index, [])
        group.append(sample)
        if len(group) == self.group_size:
            self._submit(self._pending.pop(sample.prompt_index))

    def _submit(self, group: list[RolloutSample]) -> None:
        if self._first is None:
            self._first = time.perf_counter()
        self._scored.update(id(s) for s in group)
        if self.remote is None:
            self._futures.append(self._local.submit(score_samples, group, self.items,
                                                    self.task, self.tokenizer))
            return
        for sample in group:
            sample.metadata["response_text"] = self.tokenizer.decode(
                sample.response_ids, skip_special_tokens=True)
        self._futures.append(self.remote.submit(group, self.items))

    def finish(self, samples: list[RolloutSample]) -> dict[str, float]:
        """Wait until every one of ``samples`` is scored. Returns ``time/reward`` (from the
        first group's scoring to the last reward) and ``time/reward_wait`` (of it, the time
        after generation returned: the part that did not overlap it)."""
        returned = time.perf_counter()
        rest: dict[int, list[RolloutSample]] = {}
        for s in samples:
            if id(s) not in self._scored:
                rest.setdefault(s.prompt_index, []).append(s)
        for group in rest.values():
            self._submit(group)
        try:
            for future in self._futures:
                future.result()
        except BaseException:
            for future in self._futures:
                future.cancel()
            raise
        finally:
            if self._local is not None:
                self._local.shutdown(wait=False, cancel_futures=True)
        done = time.perf_counter()
        first = returned if self._first is None else self._first
        return {"time/reward": done - first, "time/reward_wait": done - returned}
