"""RMSNorm that works with sequence parallelism.

megatron-core's local layer spec wraps ``torch.nn.RMSNorm``, which refuses sequence
parallelism; Transformer Engine's norm is GPU-only. Tensor parallelism of a MoE model
requires sequence parallelism, so the CPU path needs a norm whose weight is marked
``sequence_parallel``: megatron's ``finalize_model_grads`` then all-reduces its gradient
over the tensor-parallel group (each rank saw only its slice of the sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """Qwen3's RMSNorm: normalise in fp32, cast back, then scale by the weight."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        **unused,  # megatron passes norm options (persist_layer_norm, ...) by keyword
    ) -> None:
        super().__init__()
        self.config = config
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Read by finalize_model_grads to all-reduce this gradient over tensor-parallel
        # ranks when each rank normalised only its sequence slice.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden.float(), (self.hidden_size,), eps=self.eps)
        return self.weight * normed.to(hidden.dtype)
