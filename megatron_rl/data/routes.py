"""Route tensors: the experts chosen for each token of a sample, per MoE layer.

Layout of one sample's routes: ``[tokens, moe_layers, topk]`` where ``tokens`` is
``len(prompt) + len(response) - 1`` -- the tokens the model is fed to score the
response (the last response token is never fed forward, so neither SGLang nor the
trainer has a route for it) -- and ``moe_layers`` counts only MoE layers, in layer
order. Ids are stored in the smallest integer type that holds them and widened to
int64 only on the device that uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RouteError(ValueError):
    """Route data that cannot be replayed; the message names sample, token and layer."""


# Every integer dtype a route tensor may arrive in, with the largest id it can hold.
_ID_LIMITS = {
    torch.uint8: 255,
    torch.int8: 127,
    torch.int16: 32767,
    torch.int32: 2**31 - 1,
    torch.int64: 2**63 - 1,
}


def moe_layer_names(global_layers: Sequence[int]) -> list[str]:
    """Names of MoE layers in messages, by global 0-based layer index (dense layers count).

    ``global_layers[j]`` is the layer of position ``j`` on the MoE-layer axis."""
    return [f"decoder layer {g} (MoE layer {j})" for j, g in enumerate(global_layers)]


def check_dtype(routes: torch.Tensor, num_experts: int, where: str) -> None:
    """Expert ids must be integers in a dtype wide enough for ``num_experts - 1``: a
    float, a bool, or a too narrow integer (ids wrapped on conversion) is refused."""
    limit = _ID_LIMITS.get(routes.dtype)
    if limit is None:
        raise RouteError(
            f"{where}: routes must hold integer expert ids, got dtype {routes.dtype}"
        )
    if limit < num_experts - 1:
        raise RouteError(
            f"{where}: dtype {routes.dtype} cannot hold expert ids up to {num_experts - 1} "
            f"(ids were truncated on conversion); use {route_dtype(num_experts)}"
        )


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
    check_dtype(routes, num_experts, sample)
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


def validate_microbatch(
    routes: torch.Tensor,
    *,
    sample_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sample_index: Sequence[int],
    topk: int,
    num_experts: int,
    layer_names: Sequence[str],
    where: str,
) -> None:
    """Check a micro-batch's routes ``[B, S, layers, topk]`` (this rank's share: its
    stage's layers, CP chunk and SP slice) before the routers use them.

    ``sample_ids``/``position_ids`` (``[B, S]``, same slice) name the sample and the token
    in messages; padding tokens are checked too, since they are replayed as well. Runs on
    the routes' device with a single synchronisation when nothing is wrong."""
    if not isinstance(routes, torch.Tensor):
        raise RouteError(f"{where}: routes must be a tensor, got {type(routes).__name__}")
    expected = route_dtype(num_experts)
    if routes.dtype != expected:
        check_dtype(routes, num_experts, where)
        raise RouteError(
            f"{where}: routes have dtype {routes.dtype}; micro-batches carry the compact "
            f"{expected} (data.routes.route_dtype) and are widened only on the device"
        )
    if routes.dim() != 4 or tuple(routes.shape[:2]) != tuple(sample_ids.shape):
        raise RouteError(
            f"{where}: routes of shape {tuple(routes.shape)} do not cover the micro-batch's "
            f"{tuple(sample_ids.shape)} tokens as [B, S, moe_layers, topk]"
        )
    if routes.shape[2] != len(layer_names):
        raise RouteError(
            f"{where}: routes have {routes.shape[2]} MoE layers, expected {len(layer_names)}"
        )
    if routes.shape[3] != topk:
        raise RouteError(
            f"{where}: routes have top-k {routes.shape[3]}, the model routes to {topk} experts"
        )
    if routes.numel() == 0:
        return
    ids = routes
    if num_experts - 1 < _ID_LIMITS[expected]:
        out_of_range = ids >= num_experts
    else:  # every value of the dtype is a valid id (and comparing with E would wrap)
        out_of_range = torch.zeros_like(ids, dtype=torch.bool)
    if expected != torch.uint8:  # uint8 ids cannot be negative
        out_of_range |= ids < 0
    ordered = ids.sort(dim=-1).values
    duplicate = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)  # [B, S, L]
    # With top-k > 1 a layer of zeros is also a duplicate: the per-sample check (for the
    # clearer message) runs only once something is wrong.
    silent = _silent_layers(ids, sample_ids, len(sample_index), topk) if topk == 1 else None
    checks = [out_of_range.any(), duplicate.any()] + ([silent.any()] if silent is not None else [])
    flags = torch.stack(checks).tolist()
    if not any(flags):
        return
    if silent is None:
        silent = _silent_layers(ids, sample_ids, len(sample_index), topk)

    def token(b: int, s: int) -> str:
        local = int(sample_ids[b, s])
        if local < 0:
            return f"padding token (row {b}, position {s})"
        return f"sample {sample_index[local]}, token {int(position_ids[b, s])}"

    if flags[0]:
        b, s, layer, j = (int(v) for v in out_of_range.nonzero()[0])
        raise RouteError(
            f"{where}: expert id {int(ids[b, s, layer, j])} at {token(b, s)}, "
            f"{layer_names[layer]} is out of range [0, {num_experts})"
        )
    if silent.any():
        local, layer = (int(v) for v in silent.nonzero()[0])
        raise RouteError(
            f"{where}: sample {sample_index[local]}: every route of {layer_names[layer]} is "
            f"expert 0 -- the capture of this layer was lost (dense-layer filler or a missing "
            f"return_routed_experts)"
        )
    b, s, layer = (int(v) for v in duplicate.nonzero()[0])
    raise RouteError(
        f"{where}: duplicate expert ids {ids[b, s, layer].tolist()} at {token(b, s)}, "
        f"{layer_names[layer]}"
    )


def _silent_layers(
    ids: torch.Tensor, sample_ids: torch.Tensor, num_samples: int, topk: int
) -> torch.Tensor:
    """``[samples, layers]``: True where every token of a sample routes only to expert 0
    in a layer -- SGLang's filler for layers it did not capture. With top-k 1 a short
    sample may legitimately do so, hence the same 16-token floor as :func:`validate`."""
    layers = ids.shape[2]
    if num_samples == 0:
        return torch.zeros((0, layers), dtype=torch.bool, device=ids.device)
    real = sample_ids >= 0
    owner = sample_ids.clamp(min=0).reshape(-1)
    nonzero = (ids.any(dim=-1) & real[..., None]).reshape(-1, layers).to(torch.int64)
    hits = torch.zeros((num_samples, layers), dtype=torch.int64, device=ids.device)
    hits.index_add_(0, owner, nonzero)
    tokens = torch.zeros(num_samples, dtype=torch.int64, device=ids.device)
    tokens.index_add_(0, owner, real.reshape(-1).to(torch.int64))
    judged = tokens >= (16 if topk == 1 else 1)
    return (hits == 0) & judged[:, None]
