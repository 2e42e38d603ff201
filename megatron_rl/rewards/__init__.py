"""Rewards: the task's own scorer or a user function, applied to decoded responses."""

from megatron_rl.rewards.scoring import reward_stats, score_samples

__all__ = ["reward_stats", "score_samples"]
