"""Core attention of the local (CPU) layer spec through torch's fused attention kernel.

megatron-core's local ``DotProductAttention`` materialises the attention scores
``[b, heads, sq, sk]`` in fp32 and keeps them, and the softmax's output, for the backward.
The rows the trainer packs a group into (one shared prompt and the group's responses, up
to ``--seq-length`` positions) make that the largest activation of a step: at 64-token
completions a micro-batch of 8 rows of 552 positions holds about 40 MB per tensor per
layer, and the unfused scores, mask, softmax and their backward take more time than the
rest of the layer. ``torch.nn.functional.scaled_dot_product_attention`` computes the same
softmax attention on the CPU in blocks (flash attention: online softmax, one log-sum-exp
per query kept for the backward), so neither the scores nor the probabilities are stored.

The math is the parent's: scale ``softmax_scale``, grouped-query heads repeated as the
parent repeats them, a masked score excluded (megatron writes -10000 in its place, whose
exponential is 0 in fp32 next to any real score). Without a mask, a causal mask over
``sq == sk`` positions, and none for a single query (a decode step), as the parent's
softmax does. One difference: a query whose every key is masked gets zeros here and a
uniform average in the parent; every row the trainer builds lets each position attend at
least to itself, so it never meets one. Results agree with the parent's to fp32 rounding
(tested). :func:`computes` says for which configurations: no attention dropout, vanilla
softmax (no softmax offset), no sliding window, no query-key layer scaling, no context
parallelism; for any other the layer spec keeps ``DotProductAttention``.
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.nn import functional as F


def computes(config: TransformerConfig) -> bool:
    """Whether :class:`FusedCoreAttention` computes this configuration's attention."""
    return (config.attention_dropout == 0.0 and config.window_size is None
            and getattr(config, "softmax_type", "vanilla") == "vanilla"
            and not config.apply_query_key_layer_scaling
            and config.context_parallel_size == 1)


class FusedCoreAttention(DotProductAttention):
    """``DotProductAttention`` computed by torch's fused attention (see the module docstring)."""

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        if not computes(config):
            raise ValueError(
                "FusedCoreAttention computes attention without dropout, softmax offset, "
                "sliding window, query-key layer scaling or context parallelism; this config "
                f"asks for one of them (attention_dropout={config.attention_dropout}, "
                f"window_size={config.window_size}, "
                f"softmax_type={getattr(config, 'softmax_type', 'vanilla')}, "
                f"apply_query_key_layer_scaling={config.apply_query_key_layer_scaling}, "
                f"context_parallel_size={config.context_parallel_size})")
        super().__init__(config, *args, **kwargs)
        if self.attention_dropout.p != 0.0:  # the constructor's own argument wins over config
            raise ValueError(f"FusedCoreAttention computes no attention dropout, asked for "
                             f"p={self.attention_dropout.p}")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]``, ``attention_mask``
        bool ``[1 or b, 1, sq, sk]``, True where attention is not allowed (megatron's
        convention) -> context ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FusedCoreAttention takes neither packed sequences nor an "
                             "attention bias (as DotProductAttention)")
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        if attention_mask is None:
            # The parent's softmax: a causal mask over sq == sk, none for one query.
            sq, sk = query.shape[0], key.shape[0]
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1
            if causal and sq != sk:
                raise ValueError(f"causal attention without a mask needs as many queries as "
                                 f"keys, got {sq} queries and {sk} keys")
            context = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                     scale=self.softmax_scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                     scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


__all__ = ["FusedCoreAttention", "computes"]
