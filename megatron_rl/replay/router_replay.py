"""RoutingReplay: record or replay the experts of megatron-core's MoE routers, per pass.

Usage (see docs/replay.md)::

    replay = RoutingReplay(engine.chunks, model_config)
    forward_step = make_forward_step(loss_fn, replay)   # calls microbatch / mark_output
    with replay.pass_mode("record"):                    # R2 pi_old pass
        engine.forward_only(forward_step, batches, ...)
    routes = replay.take_recorded(batch.key)            # [B, S, stage_moe_layers, topk]
    with replay.pass_mode("replay"):                    # R2/R3 updates, R3 pi_old pass
        engine.train_step(forward_step, batches, ...)
    stats = replay.stats()                              # agreement / fidelity Stats

Routes are bound to routers by global layer number (never by megatron's global list),
and to micro-batches by ``MicroBatch.key``: the forward step announces each micro-batch
as it enters a model chunk (:meth:`microbatch`), and :meth:`mark_output` hooks the
chunk's output so that, when the schedule runs that micro-batch's backward -- in
whatever order the pipeline schedule chooses -- a forward recomputed inside it
(activation recompute) replays the same micro-batch's routes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.data.packing import MicroBatch
from megatron_rl.metrics.stats import Stat
from megatron_rl.parallel_layout import from_router_order, moe_layers
from megatron_rl.replay import chunk_routes
from megatron_rl.replay.binding import (
    ReplayBindingError,
    check_routers_replayable,
    drop_from_global_list,
    find_routers,
    unwrap,
)
from megatron_rl.replay.bound_router import BoundRouterReplay, ReplayError
from megatron_rl.replay.chunk_routes import ChunkRoutes, RankLayout
from megatron_rl.replay.config import PASS_MODES, PassMode, replay_blockers
from megatron_rl.replay.metrics import RouterMetrics

logger = logging.getLogger(__name__)


class RoutingReplay:
    """Drives the routers of one model (all its chunks on this rank)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module] | torch.nn.Module,
                 model_config: Any = None) -> None:
        """``model_chunks``: this rank's GPTModel chunks (wrapped or not); ``model_config``:
        the ModelConfig (or megatron TransformerConfig) the model was built from, by
        default the chunks' own TransformerConfig."""
        if isinstance(model_chunks, torch.nn.Module):
            model_chunks = [model_chunks]
        self._chunks = [unwrap(c) for c in model_chunks]
        if not self._chunks:
            raise ReplayBindingError("RoutingReplay needs at least one model chunk")
        self.config = self._chunks[0].config
        shape = model_config if model_config is not None else self.config
        self.all_moe_layers: tuple[int, ...] = tuple(moe_layers(shape))
        if list(self.all_moe_layers) != moe_layers(self.config):
            raise ReplayBindingError(
                f"model_config puts MoE layers at {list(self.all_moe_layers)}, the model was "
                f"built with {moe_layers(self.config)}"
            )
        self.sites = find_routers(self._chunks, self.all_moe_layers, self.config.num_layers)
        for site in self.sites:
            if isinstance(site.router.router_replay, BoundRouterReplay):
                raise ReplayBindingError(
                    f"router {site.name} (decoder layer {site.layer}) is already driven by "
                    "another RoutingReplay; close() that one first"
                )
        self.metrics = RouterMetrics()
        self._mode: str | None = None
        self._current: dict[int, ChunkRoutes | None] = {}
        self._last_forward: tuple[int, ChunkRoutes | None] | None = None
        self._pending: dict[int, dict[int, torch.Tensor]] = {}
        self._shapes: dict[int, tuple[int, int]] = {}
        self._recorded: dict[int, torch.Tensor] = {}
        self._chunk_of: dict[int, tuple[torch.nn.Module, int]] = {}
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._bind()
        tp_size = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
        sp = bool(self.config.sequence_parallel)
        self.layout = RankLayout(
            all_moe_layers=self.all_moe_layers,
            stage_positions=tuple(sorted(s.position for s in self.sites if not s.is_mtp)),
            topk=self.config.moe_router_topk,
            num_experts=self.config.num_moe_experts or 0,
            tp_size=tp_size,
            tp_rank=tp_rank,
            sequence_parallel=sp,
        )
        # Without sequence parallelism every tensor-parallel rank routes the same tokens:
        # count them once so that summing the statistics over all ranks stays exact.
        self.counts_tokens = sp or tp_rank == 0
        logger.info(
            "routing replay bound: %s; MTP routers (free routing): %d",
            ", ".join(f"chunk {s.chunk} layer {s.layer}" for s in self.sites if not s.is_mtp)
            or "no MoE layers on this rank",
            sum(s.is_mtp for s in self.sites),
        )

    # -- binding -------------------------------------------------------------------

    def _bind(self) -> None:
        num_experts = self.config.num_moe_experts or 0
        for site in self.sites:
            router = site.router
            self._originals.append((router, router.router_replay))
            if site.is_mtp:
                # The inference engine returns no routes for MTP layers: they route
                # freely in every pass, through megatron's plain top-k.
                router.router_replay = None
                continue
            bound = BoundRouterReplay(site, self, num_experts)
            router.router_replay = bound
            self._handles.append(router.register_forward_hook(bound.check_router_output))
        # megatron's own instances of these routers must not stay reachable by position.
        drop_from_global_list({id(r) for _, r in self._originals if r is not None})

    def close(self) -> None:
        """Give the routers back their original RouterReplay and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        for router, original in self._originals:
            router.router_replay = original
        self._handles.clear()
        self._originals.clear()

    def stage_moe_positions(self) -> list[int]:
        """Positions on the model's MoE-layer axis of this rank's MoE layers (all its
        model chunks), in order: the share of a sample's routes this rank needs."""
        return list(self.layout.stage_positions)

    def stage_moe_layers(self) -> list[int]:
        """Global layer indices of this rank's MoE layers, in position order."""
        return [self.all_moe_layers[p] for p in self.layout.stage_positions]

    # -- passes ----------------------------------------------------------------------

    @contextlib.contextmanager
    def pass_mode(self, mode: PassMode) -> Iterator[None]:
        """Every micro-batch forward inside runs in ``mode`` (see replay.config.PASS_MODES).

        On leaving a ``record`` pass the recorded routes become available to
        :meth:`take_recorded` (gathered over the tensor-parallel group under sequence
        parallelism; a collective, so every rank leaves the pass)."""
        if mode not in PASS_MODES:
            raise ValueError(f"pass mode {mode!r} is not one of {PASS_MODES}")
        if self._mode is not None:
            raise ReplayError(f"pass_mode({mode!r}) inside pass_mode({self._mode!r})")
        if mode == "replay":
            check_routers_replayable(self.config)
        elif mode != "off":
            self._check_observable()
        if mode in ("replay", "record") and not self.all_moe_layers:
            raise ReplayError(f"pass_mode({mode!r}): the model has no MoE layers to {mode}")
        if mode == "record":
            if self._recorded:
                logger.debug("discarding %d recorded micro-batches never taken",
                             len(self._recorded))
            self._recorded.clear()
            self._pending.clear()
            self._shapes.clear()
        self._mode = mode
        self._current = {}
        finished = False
        try:
            yield
            finished = True
        finally:
            self._mode = None
            self._current = {}
            self._last_forward = None
            if mode == "record" and finished and self._pending:
                self._finish_records()
            self._pending.clear()

    def _check_observable(self) -> None:
        fused = [b for b in replay_blockers(self.config) if b.attribute == "moe_router_fusion"]
        if fused:
            raise ReplayError(f"{fused[0].why}: routes can be neither recorded nor observed")

    def routes_for(self, chunk: int) -> ChunkRoutes | None:
        """The routes of the micro-batch model chunk ``chunk`` is running (None: free)."""
        return self._current.get(chunk)

    def _chunk_index(self, model: torch.nn.Module) -> int:
        cached = self._chunk_of.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        inner = model
        while True:
            for i, chunk in enumerate(self._chunks):
                if inner is chunk:
                    self._chunk_of[id(model)] = (model, i)
                    return i
            nxt = getattr(inner, "module", None)
            if not isinstance(nxt, torch.nn.Module):
                raise ReplayBindingError(
                    f"{type(model).__name__} is none of the model chunks this RoutingReplay "
                    "was built for"
                )
            inner = nxt

    @contextlib.contextmanager
    def microbatch(self, batch: MicroBatch, model: torch.nn.Module) -> Iterator[None]:
        """Around one model chunk's forward of ``batch`` (the forward step does this)."""
        if self._mode is None:
            raise ReplayError(
                "a forward ran outside replay.pass_mode(...): wrap every forward_backward "
                "call in pass_mode('record' | 'replay' | 'observe' | 'off')"
            )
        chunk = self._chunk_index(model)
        positions = [s.position for s in self.sites if s.chunk == chunk and not s.is_mtp]
        entry = None
        if self._mode != "off" and positions:
            device = next(unwrap(model).parameters()).device
            entry = chunk_routes.prepare(
                batch, mode=self._mode, chunk_positions=positions, layout=self.layout,
                device=device, require_routes=self._mode == "replay",
            )
        self._current[chunk] = entry
        try:
            yield
        finally:
            self._current[chunk] = None
        self._last_forward = (chunk, entry)
        if entry is not None:
            self._after_forward(entry, positions)

    def _after_forward(self, entry: ChunkRoutes, positions: list[int]) -> None:
        entry.wide = None  # until backward only the compact routes stay alive
        missing = sorted(set(positions) - entry.visited)
        if missing:
            layers = [self.all_moe_layers[p] for p in missing]
            raise ReplayError(
                f"micro-batch {entry.key}: the routers of decoder layers {layers} never "
                "consulted their RouterReplay (a fused or custom router path?): their "
                f"routes were not {entry.mode}ed"
            )
        if entry.mode == "record":
            per_key = self._pending.setdefault(entry.key, {})
            for position, recorded in entry.records.items():
                if position in per_key:
                    raise ReplayError(
                        f"micro-batch key {entry.key} appears twice in one record pass; "
                        "keys must be unique per pass"
                    )
                per_key[position] = recorded
            self._shapes[entry.key] = (entry.batch_size, entry.seq_len)

    def mark_output(self, output: Any, batch: MicroBatch) -> Any:
        """After the chunk's forward: hook its output so that this micro-batch's backward
        first makes its routes current again (for a recomputed forward)."""
        last, self._last_forward = self._last_forward, None
        if last is None or last[1] is None:
            return output
        chunk, entry = last
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(functools.partial(self._enter_backward, chunk, entry))
        return output

    def _enter_backward(self, chunk: int, entry: ChunkRoutes, grad: torch.Tensor) -> None:
        # Runs before any node of this micro-batch's graph in this chunk: a forward that
        # activation recompute re-runs from here on uses the same routes, uncounted.
        entry.measuring = False
        self._current[chunk] = entry

    # -- results -------------------------------------------------------------------

    def _finish_records(self) -> None:
        stage = self.layout.stage_positions
        gather = self.layout.sequence_parallel and self.layout.tp_size > 1
        for key in sorted(self._pending):
            per_position = self._pending[key]
            if sorted(per_position) != sorted(stage):
                raise ReplayError(
                    f"micro-batch {key}: recorded MoE positions {sorted(per_position)}, "
                    f"expected this rank's {list(stage)}"
                )
            B, _ = self._shapes[key]
            rows = torch.stack([per_position[p] for p in stage], dim=1)  # [S_l*B, L, k]
            routes = from_router_order(rows, B)  # [B, S_local, L, k]
            if gather:
                routes = _gather_sequence(routes)
            self._recorded[key] = routes.cpu().contiguous()
        self._pending.clear()
        self._shapes.clear()

    def take_recorded(self, key: int) -> torch.Tensor:
        """Routes this rank's routers chose for micro-batch ``key`` in the last record
        pass: ``[B, S, stage_moe_layers, topk]`` compact, on the host (S is the CP-local
        sequence). Each key can be taken once.

        Call it after the pass's forward_backward call, inside or after the ``with``
        block, in the same order on every rank of a tensor-parallel group (the first call
        after a pass gathers the sequence-parallel slices, a collective)."""
        if self._mode not in (None, "record"):
            raise ReplayError(f"take_recorded() inside pass_mode({self._mode!r})")
        if self._pending:
            self._finish_records()
        try:
            return self._recorded.pop(key)
        except KeyError:
            raise KeyError(
                f"no recorded routes for micro-batch {key} (recorded: {sorted(self._recorded)}); "
                "run it through pass_mode('record') first"
            ) from None

    def stats(self) -> dict[str, Stat]:
        """Agreement / fidelity of the passes since the last call, this rank's share
        (sum them over all ranks with metrics.stats.all_reduce_stats); resets."""
        return self.metrics.take()


def _gather_sequence(routes: torch.Tensor) -> torch.Tensor:
    """All-gather ``[B, S / TP, L, k]`` over the tensor-parallel group along S."""
    group = ps.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    # Widened for the collective (gloo lacks small integer types), compact again after.
    wide = routes.to(torch.int32).contiguous()
    pieces = [torch.empty_like(wide) for _ in range(size)]
    dist.all_gather(pieces, wide, group=group)
    return torch.cat(pieces, dim=1).to(routes.dtype)
