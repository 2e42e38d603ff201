"""The routes one model chunk's routers use for one micro-batch on this rank.

Built when the micro-batch enters the chunk: the micro-batch's routes are cut to the
chunk's MoE layers and to this tensor-parallel rank's sequence slice, moved to the
device in their compact dtype, checked there and laid out in the routers' token order.
They are widened to int64 once for the chunk's forward, and dropped again after it; a
forward recomputed in backward widens one layer at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_rl.data.packing import MicroBatch
from megatron_rl.data.routes import RouteError, moe_layer_names, validate_microbatch
from megatron_rl.parallel_layout import router_order, sp_bounds


@dataclass
class ChunkRoutes:
    """Routes and bookkeeping of one (model chunk, micro-batch) pair."""

    key: int
    """MicroBatch.key of the micro-batch."""
    mode: str
    """Pass mode (record / replay / observe)."""
    batch_size: int
    seq_len: int
    """Tokens per row this rank's routers see (the SP slice of the CP-local sequence)."""
    rows: torch.Tensor | None
    """``[S_local * B, chunk_moe_layers, topk]`` compact, in router order, on the device;
    None without routes."""
    index_of: dict[int, int]
    """MoE-layer position -> index along ``rows``' layer axis."""
    mask: torch.Tensor | None
    """``[S_local * B]`` weight of each token in the statistics, in router order: True on
    real tokens (bool), or with prompt sharing the samples a token stands for
    (``MicroBatch.copies``); padding counts 0."""
    tokens: torch.Tensor | None
    """Sum of ``mask`` (a device scalar, the denominator of the statistics)."""
    measuring: bool = True
    """False in a forward recomputed during backward: that one was counted already."""
    records: dict[int, torch.Tensor] = field(default_factory=dict)
    """MoE-layer position -> top-k the router chose, ``[S_local * B, topk]`` compact."""
    visited: set[int] = field(default_factory=set)
    """MoE-layer positions whose router ran in this micro-batch's forward."""
    wide: torch.Tensor | None = None
    """``rows`` widened to int64, kept only during the micro-batch's forward (one
    conversion for all layers); a recomputed forward widens one layer at a time."""

    def target(self, position: int) -> torch.Tensor | None:
        """The ``[S_local * B, topk]`` int64 expert ids of one layer, in router order."""
        if self.rows is None:
            return None
        if self.measuring:
            if self.wide is None:
                self.wide = self.rows.to(torch.int64)
            return self.wide[:, self.index_of[position]]
        return self.rows[:, self.index_of[position]].to(torch.int64)


@dataclass(frozen=True)
class RankLayout:
    """What this rank's routers see: model shape and tensor/sequence parallelism."""

    all_moe_layers: tuple[int, ...]
    """Global layer indices of every MoE layer of the model (the routes' layer axis)."""
    stage_positions: tuple[int, ...]
    """MoE-layer positions held by this rank (all its model chunks), in order."""
    topk: int
    num_experts: int
    tp_size: int
    tp_rank: int
    sequence_parallel: bool

    def sequence_slice(self, seq_len: int) -> tuple[int, int]:
        if self.sequence_parallel and self.tp_size > 1:
            return sp_bounds(seq_len, self.tp_size, self.tp_rank)
        return 0, seq_len


def prepare(
    batch: MicroBatch,
    *,
    mode: str,
    chunk_positions: Sequence[int],
    layout: RankLayout,
    device: torch.device,
    require_routes: bool,
) -> ChunkRoutes:
    """Cut ``batch.routes`` for one chunk's routers and check them.

    ``batch.routes`` may carry all MoE layers of the model or only this rank's stage
    layers (``RankLayout.stage_positions``); anything else is refused."""
    where = f"micro-batch {batch.key}"
    routes = batch.routes
    B, S = batch.tokens.shape
    start, stop = layout.sequence_slice(S)
    if routes is None:
        if require_routes:
            raise RouteError(f"{where}: no routes to replay (MicroBatch.routes is None)")
        return ChunkRoutes(batch.key, mode, B, stop - start, None, {}, None, None)
    if not isinstance(routes, torch.Tensor) or routes.dim() != 4:
        shape = tuple(routes.shape) if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise RouteError(f"{where}: routes must be [B, S, moe_layers, topk], got {shape}")
    if tuple(routes.shape[:2]) != (B, S):
        raise RouteError(
            f"{where}: routes cover {tuple(routes.shape[:2])} tokens, the micro-batch's tokens "
            f"are {(B, S)} (after packing, padding and the CP split, routes and tokens must "
            "be cut alike)"
        )
    layers = routes.shape[2]
    total, stage = len(layout.all_moe_layers), layout.stage_positions
    if layers == total:
        axis = {p: p for p in chunk_positions}
    elif layers == len(stage):
        axis = {p: stage.index(p) for p in chunk_positions}
    else:
        held = [layout.all_moe_layers[p] for p in stage]
        raise RouteError(
            f"{where}: routes have {layers} MoE layers; the model has {total} (global layers "
            f"{list(layout.all_moe_layers)}) and this pipeline rank holds {len(stage)} "
            f"(global layers {held})"
        )
    picked = [axis[p] for p in chunk_positions]
    local = routes[:, start:stop]
    if picked != list(range(layers)):  # the chunk uses a subset of the layers carried
        local = local.index_select(2, torch.as_tensor(picked, dtype=torch.long))
    local = local.to(device, non_blocking=True)
    sample_ids = batch.sample_ids[:, start:stop].to(device, non_blocking=True)
    validate_microbatch(
        local,
        sample_ids=sample_ids,
        position_ids=batch.position_ids[:, start:stop],
        sample_index=batch.sample_index,
        topk=layout.topk,
        num_experts=layout.num_experts,
        layer_names=[moe_layer_names(layout.all_moe_layers)[p] for p in chunk_positions],
        where=where,
    )
    weights = sample_ids >= 0 if batch.copies is None else \
        batch.copies[:, start:stop].to(device, non_blocking=True)
    mask = router_order(weights)
    return ChunkRoutes(
        batch.key, mode, B, stop - start, router_order(local),
        {p: i for i, p in enumerate(chunk_positions)}, mask, mask.sum(),
    )
