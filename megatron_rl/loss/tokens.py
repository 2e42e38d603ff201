"""A piece's token vectors made safe to compute with, and per-response sums.

Masked-out positions are replaced by zeros BEFORE any arithmetic: a NaN or -inf there
would otherwise leak into the loss (0 * NaN = NaN) or into the gradient (the backward
of exp/log at a NaN is NaN even when a later ``where`` discards the value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rl.loss.types import LossInputs, SeqSum


@dataclass
class Tokens:
    """Sanitised ``[T]`` vectors of one piece, in the compute dtype (>= float32)."""

    logprobs: torch.Tensor
    """log pi_theta, with gradient; 0 where masked out."""
    old: torch.Tensor
    """log pi_old, detached; 0 where masked out."""
    rollout: torch.Tensor
    """log mu_old, detached; 0 where masked out."""
    advantages: torch.Tensor
    """Detached; 0 where masked out."""
    mask: torch.Tensor
    """bool."""
    sample_ids: torch.Tensor
    """In ``0 .. num_samples - 1`` everywhere (0 where masked out)."""
    lengths: torch.Tensor
    """Full response length of each token's response (1 where masked out), float."""
    num_samples: int
    ref: torch.Tensor | None = None
    """log pi_ref, detached; 0 where masked out (None when not given)."""
    entropy: torch.Tensor | None = None
    """Entropy of pi_theta, keeping its gradient; 0 where masked out (None when not given)."""

    def per_sample_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``[num_samples]`` sum over this piece's masked tokens of each response."""
        values = torch.where(self.mask, values, torch.zeros_like(values))
        out = values.new_zeros(self.num_samples)
        if self.num_samples == 0:
            return out
        return out.index_add(0, self.sample_ids, values)

    def sequence_sum(self, values: torch.Tensor, seq_sum: SeqSum | None) -> torch.Tensor:
        """``[num_samples]`` sum over ALL masked tokens of each response (across the
        context-parallel pieces that ``seq_sum`` joins)."""
        partial = self.per_sample_sum(values)
        return partial if seq_sum is None else seq_sum(partial)

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``[num_samples]`` value to the tokens (0 where masked out)."""
        if self.num_samples == 0:
            return per_sample.new_zeros(self.mask.shape)
        gathered = per_sample[self.sample_ids]
        return torch.where(self.mask, gathered, torch.zeros_like(gathered))


def compute_dtype(inputs: LossInputs) -> torch.dtype:
    """float32 at least: ratios exp(a - b) of bf16 log-probabilities are too coarse."""
    return torch.promote_types(inputs.logprobs.dtype, torch.float32)


def prepare(inputs: LossInputs) -> Tokens:
    dtype = compute_dtype(inputs)
    mask = inputs.loss_mask.bool()

    def clean(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        return torch.where(mask, x, torch.zeros_like(x))

    sample_ids = torch.where(
        mask, inputs.sample_ids.long(), torch.zeros_like(inputs.sample_ids, dtype=torch.long)
    )
    if inputs.num_samples > 0:
        lengths = inputs.response_lengths.to(device=mask.device, dtype=dtype)[sample_ids]
        lengths = torch.where(mask, lengths, torch.ones_like(lengths))
    else:
        lengths = torch.ones(mask.shape, dtype=dtype, device=mask.device)
    return Tokens(
        logprobs=clean(inputs.logprobs),
        old=clean(inputs.old_logprobs.detach()),
        rollout=clean(inputs.rollout_logprobs.detach()),
        advantages=clean(inputs.advantages.detach()),
        mask=mask,
        sample_ids=sample_ids,
        lengths=lengths,
        num_samples=inputs.num_samples,
        ref=None if inputs.ref_logprobs is None else clean(inputs.ref_logprobs.detach()),
        entropy=None if inputs.entropy is None else clean(inputs.entropy),
    )
