"""Where each token and layer lives under megatron's parallel layouts: pipeline stage
layers, context-parallel chunks, sequence-parallel slices, the order a router sees tokens.

Plain tensor helpers with no replay or model state, shared by the forward step (which
cuts micro-batches into CP chunks) and the routing replay (which cuts routes exactly like
the tokens):

* pipeline parallelism: the layers of a rank's stage (all its virtual stages),
  :func:`pipeline_layers`;
* context parallelism: a sequence is cut into ``2 * CP`` chunks and rank ``r`` keeps
  chunks ``r`` and ``2 * CP - 1 - r`` (megatron's load-balanced split of
  ``get_batch_on_this_cp_rank``), :func:`split_for_cp`;
* sequence parallelism: each tensor-parallel rank handles its contiguous ``S / TP``
  slice of the (CP-local) sequence, :func:`sp_share`, and megatron flattens activations
  ``[S, B]`` sequence-major before routing, :func:`router_order`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def moe_layer_pattern(config: Any) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, per layer, from a ModelConfig or a
    megatron-core TransformerConfig (``moe_layer_freq`` an int N or a 0/1 list)."""
    if hasattr(config, "moe_layer_pattern"):
        return list(config.moe_layer_pattern())
    if not getattr(config, "num_moe_experts", None):
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return [int(v) for v in freq]


def moe_layers(config: Any) -> list[int]:
    """Global 0-based indices of the MoE layers; position ``j`` of a route tensor's
    MoE-layer axis belongs to layer ``moe_layers(config)[j]``."""
    return [i for i, v in enumerate(moe_layer_pattern(config)) if v]


def pipeline_layers(
    num_layers: int, pp_size: int, pp_rank: int, layers_per_virtual_stage: int | None = None
) -> list[int]:
    """Global layer indices a pipeline rank holds (evenly split, as ParallelConfig
    requires). With virtual stages of ``v`` layers, virtual stage ``s`` of rank ``r``
    holds layers ``[(s * PP + r) * v, ... + v)``: the interleaved assignment."""
    if num_layers % pp_size:
        raise ValueError(f"{num_layers} layers do not split over {pp_size} pipeline stages")
    if layers_per_virtual_stage is None:
        per_stage = num_layers // pp_size
        return list(range(pp_rank * per_stage, (pp_rank + 1) * per_stage))
    v = layers_per_virtual_stage
    chunks = num_layers // (pp_size * v)
    return [
        layer
        for stage in range(chunks)
        for layer in range((stage * pp_size + pp_rank) * v, (stage * pp_size + pp_rank + 1) * v)
    ]


def stage_moe_positions(all_moe_layers: Sequence[int], stage_layers: Sequence[int]) -> list[int]:
    """Positions on the MoE-layer axis of the MoE layers among ``stage_layers``."""
    held = set(stage_layers)
    return [j for j, layer in enumerate(all_moe_layers) if layer in held]


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Sequence positions context-parallel rank ``cp_rank`` holds, in the order it holds
    them: chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``."""
    if cp_size == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 x context-parallel size "
            f"{cp_size}; pad micro-batches to a multiple of {2 * cp_size}"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    last = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, last])


def split_for_cp(tensor: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along ``seq_dim`` (tokens, labels, masks,
    routes alike: ``seq_dim`` 1 for ``[B, S, ...]``, 2 for the ``[B, 1, S, S]`` mask)."""
    if cp_size == 1:
        return tensor
    index = cp_positions(tensor.shape[seq_dim], cp_size, cp_rank).to(tensor.device)
    return tensor.index_select(seq_dim, index)


def sp_bounds(seq_len: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the sequence slice a tensor-parallel rank routes under sequence
    parallelism (megatron splits the first dimension of ``[S, B, H]`` into TP pieces)."""
    if seq_len % tp_size:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by tensor-parallel size {tp_size} "
            "(sequence parallelism splits it evenly)"
        )
    piece = seq_len // tp_size
    return tp_rank * piece, (tp_rank + 1) * piece


def sp_share(batch_tensor: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The sequence slice ``[B, S / TP, ...]`` of a ``[B, S, ...]`` tensor (a view)."""
    start, stop = sp_bounds(batch_tensor.shape[1], tp_size, tp_rank)
    return batch_tensor[:, start:stop]


def router_order(batch_tensor: torch.Tensor) -> torch.Tensor:
    """``[B, S, ...]`` -> ``[S * B, ...]`` in the order a router sees tokens: megatron's
    activations are ``[S, B, H]`` and the router flattens them, so token ``(b, s)`` is
    row ``s * B + b``."""
    return batch_tensor.transpose(0, 1).reshape(-1, *batch_tensor.shape[2:])


def from_router_order(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Inverse of :func:`router_order`: ``[S * B, ...]`` -> ``[B, S, ...]``."""
    return rows.reshape(-1, batch_size, *rows.shape[1:]).transpose(0, 1)
