"""megatron_rl: stable reinforcement learning of Mixture-of-Experts models on megatron-core.

The package mirrors the data flow of one RL step: rollout -> rewards -> advantages ->
old logprobs -> routing replay -> loss -> update -> weight sync.
"""

__version__ = "0.1.0"
