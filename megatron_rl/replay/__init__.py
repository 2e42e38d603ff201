"""Routing replay (R2, R3): fixing the experts megatron-core's routers use per token."""
