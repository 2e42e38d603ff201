"""The loss function the training step calls: validate, run the objective, add the
statistics every objective shares."""

from __future__ import annotations

import torch

from megatron_rl.loss.config import ObjectiveConfig
from megatron_rl.loss.metrics import mismatch_stats, policy_stats
from megatron_rl.loss.objectives import get_objective
from megatron_rl.loss.regularizers import regularization
from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.loss.tokens import prepare
from megatron_rl.loss.types import LossInputs, LossOutput, SeqSum
from megatron_rl.loss.validation import LossInputError, validate_inputs


def compute_loss(
    inputs: LossInputs,
    config: ObjectiveConfig,
    *,
    seq_sum: SeqSum | None = None,
    validate: bool = True,
) -> LossOutput:
    """The piece's loss (globally normalised, sum over pieces = mini-batch loss) and
    statistics: the objective's own plus ``train/loss``, ``train/staleness_kl``,
    ``train/entropy`` (when given) and ``mismatch/*``. With ``config.kl_coef`` or
    ``config.entropy_coef`` > 0 the reference KL and entropy terms are added to the loss
    (``loss.regularizers``), ``train/kl_ref`` and ``train/objective_loss`` reported.

    Under context parallelism every rank of the group must call this with the same
    config and a ``seq_sum`` over the group: validation and the sequence-level
    quantities issue the same collectives on each."""
    if validate:
        validate_inputs(inputs, seq_sum=seq_sum)
        _check_regularizer_inputs(inputs, config)
    objective = get_objective(config.objective)
    output = objective(inputs, config, seq_sum=seq_sum)
    if not isinstance(output, LossOutput) or output.loss.dim() != 0:
        raise LossInputError(
            f"objective {config.objective!r} must return a LossOutput with a scalar loss, "
            f"got {type(output).__name__}"
        )
    tokens = prepare(inputs)
    stats = StatCollector()
    mismatch_stats(tokens, stats)
    policy_stats(tokens, inputs.entropy, stats)
    loss = output.loss
    extra = regularization(inputs, tokens, config, stats)
    # The loss is already a share of the mini-batch total; weighting it by the piece's
    # share of the tokens makes the merged mean equal the mini-batch loss (and, merged
    # over several mini-batches, their average).
    share = tokens.mask.sum().to(torch.float64) / inputs.global_num_tokens
    if extra is not None:
        stats.add("train/objective_loss", loss.detach(), share, "mean")
        loss = loss + extra.to(loss.dtype)
    stats.add("train/loss", loss.detach(), share, "mean")
    return LossOutput(loss, {**stats.stats(), **output.stats})


def _check_regularizer_inputs(inputs: LossInputs, config: ObjectiveConfig) -> None:
    if config.kl_coef > 0 and inputs.ref_logprobs is None:
        raise LossInputError(
            f"--rl-kl-coef {config.kl_coef} needs LossInputs.ref_logprobs (log pi_ref of the "
            "reference policy), which this piece does not carry"
        )
    if config.entropy_coef > 0 and inputs.entropy is None:
        raise LossInputError(
            f"--rl-entropy-coef {config.entropy_coef} needs LossInputs.entropy (with its "
            "gradient), which this piece does not carry"
        )
