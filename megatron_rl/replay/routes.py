"""Route tensors: the experts chosen for each token of a sample, per MoE layer.

Layout of one sample's routes: ``[tokens, moe_layers, topk]`` where ``tokens`` is
``len(prompt) + len(response) - 1`` -- the tokens the model is fed to score the
response (the last response token is never fed forward, so neither SGLang nor the
trainer has a route for it) -- and ``moe_layers`` counts only MoE layers, in layer
order. Ids are stored in the smallest integer type that holds them and widened to
int64 only on the device that uses them.
"""

from __future__ import annotations

import torch


class RouteError(ValueError):
    """Route data that cannot be replayed; the message names sample, token and layer."""


def route_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype holding expert ids ``0 .. num_experts - 1``."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


def compact(routes: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Store ids in :func:`route_dtype` (ids must already be validated in range)."""
    return routes.to(route_dtype(num_experts))


def padding_routes(
    num_tokens: int, num_moe_layers: int, topk: int, num_experts: int, start: int = 0
) -> torch.Tensor:
    """Routes for padding tokens: expert ``(p * topk + j) mod E`` for position ``p``.

    The ``topk`` ids of a token are distinct (no duplicates to break dispatch split
    sizes) and consecutive padding tokens cycle through all experts, so padding adds
    the same load to every expert instead of piling onto expert 0."""
    positions = torch.arange(start, start + num_tokens, dtype=torch.int64)
    ids = (positions[:, None] * topk + torch.arange(topk)[None, :]) % num_experts
    return compact(ids[:, None, :].expand(num_tokens, num_moe_layers, topk).contiguous(), num_experts)


def validate(
    routes: torch.Tensor,
    *,
    num_tokens: int,
    num_moe_layers: int,
    topk: int,
    num_experts: int,
    sample: str,
    layer_names: list[str] | None = None,
) -> None:
    """Check one sample's routes before use; raise :class:`RouteError` naming the problem.

    ``layer_names`` names the MoE layers in messages (e.g. "decoder layer 3"); by default
    they are called "MoE layer i"."""
    names = layer_names or [f"MoE layer {i}" for i in range(num_moe_layers)]
    if not isinstance(routes, torch.Tensor):
        raise RouteError(f"{sample}: routes must be a tensor, got {type(routes).__name__}")
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise RouteError(f"{sample}: routes must hold integer expert ids, got dtype {routes.dtype}")
    if routes.dim() != 3:
        raise RouteError(
            f"{sample}: routes must have shape [tokens, moe_layers, topk], got {tuple(routes.shape)}"
        )
    tokens, layers, k = routes.shape
    if tokens != num_tokens:
        raise RouteError(
            f"{sample}: routes cover {tokens} tokens, expected {num_tokens} "
            f"(prompt + response - 1)"
        )
    if layers != num_moe_layers:
        raise RouteError(f"{sample}: routes have {layers} MoE layers, the model has {num_moe_layers}")
    if k != topk:
        raise RouteError(f"{sample}: routes have top-k {k}, the model routes to {topk} experts")
    if tokens == 0:
        return
    ids = routes.to(torch.int64)
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        t, layer, j = (int(v) for v in bad.nonzero()[0])
        raise RouteError(
            f"{sample}: expert id {int(ids[t, layer, j])} at token {t}, {names[layer]} is out of "
            f"range [0, {num_experts})"
        )
    for layer in range(layers):
        if not ids[:, layer].any() and (topk > 1 or tokens >= 16):
            raise RouteError(
                f"{sample}: every route of {names[layer]} is expert 0 -- the capture of this "
                f"layer was lost (dense-layer filler or a missing return_routed_experts)"
            )
    if topk > 1:
        ordered = ids.sort(dim=-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        if dup.any():
            t, layer = (int(v) for v in dup.nonzero()[0])
            raise RouteError(
                f"{sample}: duplicate expert ids {ids[t, layer].tolist()} at token {t}, "
                f"{names[layer]}"
            )
