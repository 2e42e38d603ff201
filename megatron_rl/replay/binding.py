"""Find megatron-core's MoE routers in model chunks and name each by its global layer.

megatron-core (0.16+) gives every ``TopKRouter`` a ``RouterReplay`` when
``moe_enable_routing_replay`` is set, appends it to the process-global list
``RouterReplay.global_router_replay_instances`` and feeds it by list position. That
position is wrong as soon as a process holds several model chunks (virtual pipeline),
several models, or MTP layers. Here each router is identified by the global number of
the transformer layer that owns it (megatron's ``layer_number``, offset for the pipeline
stage), and the routers' instances are taken out of the global list so nothing can
drive them by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_rl.replay.config import replay_blockers


class ReplayBindingError(RuntimeError):
    """The model's routers cannot be bound to routes unambiguously."""


@dataclass(frozen=True)
class RouterSite:
    """One TopKRouter of this rank and where its routes come from."""

    chunk: int
    """Index of the model chunk (virtual pipeline stage) on this rank."""
    name: str
    """Module path inside the chunk, for messages."""
    layer: int
    """Global 0-based layer index (dense layers count). For an MTP layer, the number
    megatron gives it past the decoder (num_layers + depth - 1)."""
    position: int | None
    """Position on the MoE-layer axis of route tensors; None for MTP routers, which the
    inference engine reports no routes for and which therefore route freely."""
    router: TopKRouter

    @property
    def is_mtp(self) -> bool:
        return self.position is None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers (their ``.module`` chain)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _is_mtp_path(name: str, modules: dict[str, torch.nn.Module]) -> bool:
    parts = name.split(".")
    for i in range(len(parts)):
        owner = modules.get(".".join(parts[:i]))
        if owner is not None and "MultiTokenPrediction" in type(owner).__name__:
            return True
    return False


def _mtp_layer_index(name: str, modules: dict[str, torch.nn.Module], num_layers: int,
                     layer_module: TransformerLayer) -> int:
    """Global 0-based index of the MTP layer that owns router ``name``: ``num_layers +
    depth - 1`` (depth from 1), megatron's own number for an MTP router.

    Taken from the enclosing ``MultiTokenPredictionLayer``'s ``layer_number`` (its depth,
    plus the pipeline offset), which means the same in every megatron-core release: the
    inner TransformerLayer's number does not. Up to 0.16 the inner layer continues the
    decoder's numbering (``num_layers + depth``); later releases number it from 1 like
    the MTP layer itself and add ``num_layers`` where they need a global number."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = modules.get(".".join(parts[:i]))
        if isinstance(owner, MultiTokenPredictionLayer):
            return num_layers + int(owner.layer_number) - 1
    # An MTP router outside a MultiTokenPredictionLayer: only the old numbering can tell.
    return int(layer_module.layer_number) - 1


def _owning_layer(name: str, modules: dict[str, torch.nn.Module]) -> TransformerLayer | None:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = modules.get(".".join(parts[:i]))
        if isinstance(owner, TransformerLayer):
            return owner
    return None


def find_routers(chunks: Sequence[torch.nn.Module], all_moe_layers: Sequence[int],
                 num_layers: int) -> list[RouterSite]:
    """Every TopKRouter in ``chunks`` with its global layer, in chunk then module order.

    ``all_moe_layers`` are the global indices of the model's MoE layers (the route
    tensors' layer axis). Raises :class:`ReplayBindingError` if a router's layer cannot be
    determined, is not a MoE layer of the pattern, or appears twice."""
    sites: list[RouterSite] = []
    seen: dict[int, str] = {}
    for index, chunk in enumerate(chunks):
        modules = dict(unwrap(chunk).named_modules())
        for name, module in modules.items():
            if not isinstance(module, TopKRouter):
                continue
            layer_module = _owning_layer(name, modules)
            if layer_module is None:
                raise ReplayBindingError(
                    f"router {name} of model chunk {index} is not inside a TransformerLayer; "
                    "cannot tell which layer's routes it needs"
                )
            layer = int(layer_module.layer_number) - 1  # megatron numbers layers from 1
            mtp = (
                bool(getattr(module, "is_mtp_layer", False))  # megatron >= 0.17
                or _is_mtp_path(name, modules)
                or layer >= num_layers
            )
            position = None
            if mtp:
                layer = _mtp_layer_index(name, modules, num_layers, layer_module)
            else:
                own = getattr(module, "layer_number", None)
                if own is not None and int(own) != layer + 1:
                    raise ReplayBindingError(
                        f"router {name}: layer_number {own} disagrees with its layer's "
                        f"{layer + 1}"
                    )
                if layer not in all_moe_layers:
                    raise ReplayBindingError(
                        f"router {name} sits in decoder layer {layer}, which the MoE layer "
                        f"pattern marks dense (MoE layers: {list(all_moe_layers)})"
                    )
                if layer in seen:
                    raise ReplayBindingError(
                        f"decoder layer {layer} has two routers ({seen[layer]} and chunk "
                        f"{index} {name}): pass one model's chunks to one RoutingReplay"
                    )
                seen[layer] = f"chunk {index} {name}"
                position = list(all_moe_layers).index(layer)
            sites.append(RouterSite(index, name, layer, position, module))
    return sites


def forget_global_instances(chunks: Iterable[torch.nn.Module]) -> int:
    """Take the RouterReplay objects of ``chunks``' routers out of megatron's
    process-global list (by identity), so that models built by this project neither leak
    through it nor can be driven by list position. Returns how many were removed."""
    mine = {
        id(module.router_replay)
        for chunk in chunks
        for module in unwrap(chunk).modules()
        if isinstance(module, TopKRouter) and getattr(module, "router_replay", None) is not None
    }
    return drop_from_global_list(mine)


def drop_from_global_list(ids: set[int]) -> int:
    """Remove the RouterReplay objects with these ``id()`` from megatron's global list
    (in place: megatron's static methods keep working on what remains)."""
    registry = RouterReplay.global_router_replay_instances
    kept = [r for r in registry if id(r) not in ids]
    removed = len(registry) - len(kept)
    registry[:] = kept
    return removed


def check_routers_replayable(config) -> None:
    """Refuse megatron settings under which a replayed top-k would not be what the
    experts receive (``config`` is the model's TransformerConfig)."""
    problems = [f"{b.attribute} ({b.why})" for b in replay_blockers(config)]
    if problems:
        raise ReplayBindingError("routing replay cannot be exact with " + "; ".join(problems))
