"""A user objective (loaded by import path) whose loss is NaN: every update must be skipped."""

from megatron_rl.loss import LossOutput, get_objective


def objective(inputs, config, *, seq_sum=None):
    output = get_objective("minirl")(inputs, config, seq_sum=seq_sum)
    return LossOutput(output.loss * float("nan"), output.stats)
