"""Training on megatron-core: model wrapping, optimizer, schedule, checkpoints, loops."""
