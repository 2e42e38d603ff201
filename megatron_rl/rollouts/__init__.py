"""Worked examples of --rl-rollout-function (multi-turn and tool rollouts)."""
