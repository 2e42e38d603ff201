"""What an objective receives and returns.

An objective sees one piece of a mini-batch (a micro-batch, a data-parallel shard, a
context-parallel chunk, ...) as flat token vectors, and returns its contribution to the
mini-batch loss ALREADY divided by the mini-batch's global denominator, so that the
mini-batch loss is the plain sum of its pieces' losses however the batch was split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_rl.loss.config import ObjectiveConfig
from megatron_rl.metrics.stats import Stat

SeqSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a per-sample partial ``[num_samples]`` over the pieces that share the samples
(context-parallel ranks); autograd must flow through it. ``None`` means identity."""


@dataclass(kw_only=True)
class LossInputs:
    """One piece of a mini-batch, flattened to ``T`` token positions.

    Positions where ``loss_mask`` is False (prompt, padding, other pieces' tokens) are
    ignored exactly: their values may be anything, including NaN or +-inf.
    """

    logprobs: torch.Tensor
    """[T] float: log pi_theta of each label token; carries the gradient."""
    old_logprobs: torch.Tensor
    """[T] float: log pi_old, the training engine's log-probability before the update."""
    rollout_logprobs: torch.Tensor
    """[T] float: log mu_old, the inference engine's log-probability when sampling."""
    advantages: torch.Tensor
    """[T] float: advantage of each token (the response's advantage broadcast)."""
    loss_mask: torch.Tensor
    """[T] bool: response tokens that count."""
    sample_ids: torch.Tensor
    """[T] int: which response of this piece (0 .. num_samples - 1) the token belongs to;
    any value where ``loss_mask`` is False."""
    num_samples: int
    """Responses (parts of responses) in this piece."""
    response_lengths: torch.Tensor
    """[num_samples] int: masked-token count of the WHOLE response, also when this piece
    holds only a part of it (a context-parallel chunk)."""
    global_num_samples: int
    """Responses in the whole mini-batch (all pieces, all ranks)."""
    global_num_tokens: int
    """Masked (response) tokens in the whole mini-batch (all pieces, all ranks)."""
    entropy: torch.Tensor | None = None
    """[T] float, optional: entropy of pi_theta over the vocabulary at each position.
    Statistics only, unless ``ObjectiveConfig.entropy_coef`` > 0: then it is required and
    the entropy bonus differentiates through it."""
    ref_logprobs: torch.Tensor | None = None
    """[T] float, optional: log pi_ref, the frozen reference policy's log-probability
    (detached). Required when ``ObjectiveConfig.kl_coef`` > 0; ignored otherwise."""


@dataclass
class LossOutput:
    """The piece's loss to minimise and its reducible statistics."""

    loss: torch.Tensor
    """Scalar: this piece's share of the mini-batch loss (already globally normalised)."""
    stats: dict[str, Stat]
    """Statistics; merge pieces with ``metrics.stats.merge_stats`` / ``all_reduce_stats``."""


class Objective(Protocol):
    def __call__(
        self, inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
    ) -> LossOutput: ...
