"""SGLang-format responses built from the documented wire format (reference.md section 3),
and an httpx MockTransport that answers like an SGLang server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import httpx
import torch

from megatron_rl.rollout.protocol import encode_routed_experts
from megatron_rl.weight_sync.hf_config import ModelShape


def _rng(rid: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(rid.encode()).hexdigest()[:12], 16))


def all_layer_routes(num_tokens: int, shape: ModelShape, gen: torch.Generator) -> torch.Tensor:
    """Random routes in SGLang's layout: [tokens, ALL layers, topk] int32, dense layers 0."""
    routes = torch.zeros(
        (num_tokens, shape.num_hidden_layers, shape.num_experts_per_tok), dtype=torch.int32
    )
    for layer in shape.moe_layers:
        for t in range(num_tokens):
            routes[t, layer] = torch.randperm(shape.num_experts, generator=gen)[
                : shape.num_experts_per_tok
            ]
    return routes


def sglang_response(
    request: dict,
    shape: ModelShape,
    *,
    routes_format: str = "base64",
    weight_version: str = "default",
) -> tuple[dict, torch.Tensor]:
    """A valid response to ``request`` and the all-layer routes it carries."""
    rid = request["rid"]
    gen = _rng(rid)
    new = request["sampling_params"]["max_new_tokens"]
    output_ids = torch.randint(0, shape.vocab_size, (new,), generator=gen).tolist()
    logprobs = (-torch.rand(new, generator=gen) * 5).tolist()
    routes = all_layer_routes(len(request["input_ids"]) + new - 1, shape, gen)
    meta = {
        "id": rid,
        "finish_reason": {"type": "length", "length": new},
        "prompt_tokens": len(request["input_ids"]),
        "completion_tokens": new,
        "cached_tokens": 0,
        "weight_version": weight_version,
        "output_token_logprobs": [
            [lp, t, None] for lp, t in zip(logprobs, output_ids, strict=True)
        ],
    }
    if request.get("return_routed_experts"):
        meta["routed_experts"] = (
            encode_routed_experts(routes) if routes_format == "base64" else routes.tolist()
        )
    return {"text": "", "output_ids": output_ids, "meta_info": meta}, routes


def split_batch(body: dict) -> list[dict] | None:
    """The single-sequence bodies of a batched /generate (lists of rid, input_ids and
    sampling_params), or None for a single request."""
    if not isinstance(body.get("rid"), list):
        return None
    shared = {k: v for k, v in body.items() if k not in ("rid", "input_ids", "sampling_params")}
    return [
        {**shared, "rid": rid, "input_ids": ids, "sampling_params": params}
        for rid, ids, params in zip(
            body["rid"], body["input_ids"], body["sampling_params"], strict=True
        )
    ]


def answer(body: dict, shape: ModelShape, **kwargs) -> dict | list[dict]:
    """SGLang's answer to a single or batched /generate body."""
    parts = split_batch(body)
    if parts is None:
        return sglang_response(body, shape, **kwargs)[0]
    return [sglang_response(part, shape, **kwargs)[0] for part in parts]


Handler = Callable[[httpx.Request], httpx.Response]


def sample_id(rid: str) -> str:
    """The sample a wire rid belongs to (a retry adds ``#retry<n>``)."""
    return rid.split("#", 1)[0]


def rids_of(body: dict) -> list[str]:
    rid = body.get("rid")
    return [] if rid is None else list(rid) if isinstance(rid, list) else [rid]


DEPRECATED = {"/get_model_info": "/model_info", "/get_server_info": "/server_info"}


def fake_sglang(
    shape: ModelShape, *, model_path: str = "/nonexistent", generate: Handler | None = None, **info
) -> Handler:
    """A handler answering SGLang 0.5.23's endpoints; ``generate`` overrides ``/generate``.

    Like SGLang, a rid still in flight is refused with 400 "Duplicate request ID detected";
    a ``generate`` that raises (e.g. httpx.ReadTimeout, the client giving up) leaves its
    rids registered, as SGLang keeps generating them until aborted (``/abort_request``).
    The deprecated ``/get_model_info`` and ``/get_server_info`` answer with a ``Warning``
    header and are counted in ``handle.deprecated_calls``; ``handle.in_flight`` holds the
    registered rids."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        headers = {}
        if path in DEPRECATED:
            handle.deprecated_calls.append(path)
            headers["Warning"] = (
                f'299 - "Endpoint {path!r} is deprecated; use {DEPRECATED[path]!r}"'
            )
            path = DEPRECATED[path]
        if path == "/health":
            return httpx.Response(200)
        if path == "/model_info":
            return httpx.Response(
                200,
                headers=headers,
                json={
                    "model_path": model_path,
                    "tokenizer_path": model_path,
                    "is_generation": True,
                    "weight_version": "default",
                },
            )
        if path == "/server_info":
            return httpx.Response(
                200, headers=headers, json={"enable_return_routed_experts": True, **info}
            )
        if path == "/generate":
            body = json.loads(request.content)
            rids = rids_of(body)
            for rid in rids:
                if rid in handle.in_flight:
                    return httpx.Response(
                        400, json={"error": {"message": f"Duplicate request ID detected: {rid}"}}
                    )
            handle.in_flight.update(rids)
            if generate is not None:
                response = generate(request)
            else:
                response = httpx.Response(200, json=answer(body, shape))
            handle.in_flight.difference_update(rids)
            return response
        if path == "/abort_request":
            handle.in_flight.discard(json.loads(request.content).get("rid"))
            return httpx.Response(200)
        if path in ("/flush_cache", "/update_weights_from_disk"):
            return httpx.Response(200, json={"success": True, "message": "ok"})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    handle.in_flight = set()
    handle.deprecated_calls = []
    return handle
