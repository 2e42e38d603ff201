"""The embedded inference server: a Hugging Face MoE generation engine behind SGLang's
HTTP API (``python -m megatron_rl.inference.server``), and the launcher that starts it.

This is the inference side; the trainer's side (client, server pool, checks) is
``megatron_rl.rollout``. The two share only the wire protocol (``rollout.protocol``).
"""
