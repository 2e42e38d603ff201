"""The policy model: megatron-core's GPTModel shaped like Qwen3-MoE."""
