"""Loss functions of the RL passes, in the shape make_forward_step expects.

``old_logprob_pass`` scores the rollout batch with the current weights (pi_old) and
hands per-sample log-probs back; ``policy_loss`` computes the chosen objective on a
micro-batch with megatron_rl.loss.compute_loss.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state as ps

from megatron_rl.data.packing import MicroBatch
from megatron_rl.loss import LossInputs, ObjectiveConfig, compute_loss
from megatron_rl.metrics.stats import Stat
from megatron_rl.training.forward_step import LossFn, cp_gather
from megatron_rl.training.token_logprobs import token_entropy, token_logprobs


def _cp_seq_sum():
    """Sums per-response partials over the context-parallel group (None without CP)."""
    if ps.get_context_parallel_world_size() == 1:
        return None
    from torch.distributed.nn.functional import all_reduce

    group = ps.get_context_parallel_group()
    return lambda partial: all_reduce(partial, group=group)


def old_logprob_pass(temperature: float, entropy_stat: str = "logprob/entropy") -> LossFn:
    """pi_old (or, run on the reference model, pi_ref) of every response token, per
    sample (index in the mini-batch); the mean entropy is reported as ``entropy_stat``."""

    def loss_fn(batch: MicroBatch, logits: torch.Tensor):
        with torch.no_grad():
            entropy = token_entropy(logits, temperature)
            logprobs = token_logprobs(logits, batch.labels, temperature)
        stats = {entropy_stat: Stat.mean(entropy, batch.loss_mask)}
        # Under context parallelism each rank scored its chunks: reassemble the rows.
        logprobs, whole = cp_gather(logprobs, batch)
        per_sample = {}
        for local, index in enumerate(whole.sample_index):
            selected = (whole.sample_ids == local) & whole.loss_mask
            per_sample[index] = logprobs[selected].float().clone()
        return logits.sum() * 0.0, {"logprobs": per_sample, "stats": stats}

    return loss_fn


def policy_loss(config: ObjectiveConfig, temperature: float,
                old_from_current: bool = False) -> LossFn:
    """The RL objective of one micro-batch (globally normalised, see forward_step).

    ``old_from_current``: the weights are still those of pi_old (the first update of a
    step), so pi_old is this forward's own log-probs, detached; the pi_old pass's
    statistic (``logprob/entropy``) is reported from here.

    With ``config.entropy_coef`` > 0 the entropy keeps its gradient (the bonus); with
    ``config.kl_coef`` > 0 the micro-batch must carry the reference pass's log-probs."""

    def loss_fn(batch: MicroBatch, logits: torch.Tensor):
        # Entropy first: megatron's vocab-parallel cross-entropy works in place.
        entropy = token_entropy(logits, temperature, with_grad=config.entropy_coef > 0)
        logprobs = token_logprobs(logits, batch.labels, temperature)
        inputs = policy_inputs(batch, logprobs, entropy)
        if config.uses_reference:
            if batch.ref_logprobs is None and batch.num_samples > 0:
                raise ValueError(
                    f"--rl-kl-coef {config.kl_coef}: micro-batch {batch.key} carries no "
                    "reference log-probs (the reference pass must run before the updates)")
            ref = batch.ref_logprobs if batch.ref_logprobs is not None else \
                torch.zeros_like(batch.old_logprobs)
            inputs = dataclasses.replace(inputs, ref_logprobs=ref.flatten())
        extra = {}
        if old_from_current:
            inputs = dataclasses.replace(inputs, old_logprobs=logprobs.detach().flatten())
            extra["logprob/entropy"] = Stat.mean(entropy.detach(), batch.loss_mask)
        output = compute_loss(inputs, config, seq_sum=_cp_seq_sum())
        return output.loss, {"stats": {**output.stats, **extra}}

    return loss_fn


def policy_inputs(batch: MicroBatch, logprobs: torch.Tensor,
                  entropy: torch.Tensor | None) -> LossInputs:
    """The objective's flat token view of a (possibly context-parallel-local) micro-batch."""
    return LossInputs(
        logprobs=logprobs.flatten(),
        old_logprobs=batch.old_logprobs.flatten(),
        rollout_logprobs=batch.rollout_logprobs.flatten(),
        advantages=batch.advantages.flatten(),
        loss_mask=batch.loss_mask.flatten(),
        sample_ids=batch.sample_ids.flatten().clamp(min=0),
        num_samples=batch.num_samples,
        response_lengths=batch.response_lengths,
        global_num_samples=batch.global_num_samples,
        global_num_tokens=batch.global_num_tokens,
        entropy=None if entropy is None else entropy.flatten(),
    )
