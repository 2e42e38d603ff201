"""Rewards: the task's own scorer, a user function, or a remote reward service, applied to
decoded responses as they arrive."""

from megatron_rl.rewards.remote import RemoteRewards, RewardServiceError
from megatron_rl.rewards.scoring import GroupScorer, reward_stats, score_samples

__all__ = ["GroupScorer", "RemoteRewards", "RewardServiceError", "reward_stats",
           "score_samples"]
