"""Cutting routes exactly like the tokens: each rank keeps only its share of a sample's
``[tokens, moe_layers, topk]`` routes, or of a micro-batch's ``[B, S, moe_layers, topk]``
(see ``data/packing.py``): the MoE layers of its pipeline stage (a rank never stores the
other stages' layers) and its context-parallel chunk, cut by ``parallel_layout`` as the
tokens, labels and masks are, since the chunks depend on where a sample sits in its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from megatron_rl.parallel_layout import split_for_cp

if TYPE_CHECKING:
    from megatron_rl.data.packing import MicroBatch


def rank_share_of_sample(routes: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """A sample's ``[tokens, moe_layers, topk]`` cut to this stage's MoE layers.

    A fresh contiguous tensor, so the full one can be freed."""
    return routes.index_select(1, torch.as_tensor(list(positions), dtype=torch.long)).contiguous()


def rank_share_of_microbatch(
    routes: torch.Tensor, positions: Sequence[int] | None, cp_size: int = 1, cp_rank: int = 0
) -> torch.Tensor:
    """A micro-batch's ``[B, S, moe_layers, topk]`` cut to this rank's stage layers
    (``positions``, None keeps all) and CP chunk: ``[B, S / CP, stage_layers, topk]``."""
    if positions is not None:
        routes = routes.index_select(2, torch.as_tensor(list(positions), dtype=torch.long))
    return split_for_cp(routes, 1, cp_size, cp_rank).contiguous()


def routes_by_sample(batch: MicroBatch, routes: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-sample routes ``{mini-batch index: [tokens, layers, topk]}`` out of ``routes``,
    one entry per input position of ``batch`` (``[B, S, layers, topk]``, e.g. R2's recorded
    routes), in each sample's token order -- gathered as the passes gather them
    (``MicroBatch.sample_inputs``), so a shared prompt's routes reach every sample of its
    group. Needs the whole sequence (CP = 1): a CP rank holds only part of each sample."""
    if routes.shape[:2] != batch.sample_ids.shape:
        raise ValueError(
            f"routes cover {tuple(routes.shape[:2])} tokens, the micro-batch "
            f"{tuple(batch.sample_ids.shape)}"
        )
    return {index: batch.sample_inputs(routes, local).contiguous()
            for local, index in enumerate(batch.sample_index)}
