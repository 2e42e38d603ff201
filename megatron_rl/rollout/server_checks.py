"""Start-up checks of a rollout server against the trainer's model.

Where the served model's shape comes from, in order:

1. ``model_shape`` in ``GET /get_model_info`` -- the embedded server reports it;
2. ``config.json`` in the directory named by ``model_path`` of ``/get_model_info`` -- real
   SGLang reports only paths (model_path, tokenizer_path, is_generation, weight_version,
   ...), so the trainer reads the checkpoint's config itself. With weight sync through
   ``/update_weights_from_disk`` the trainer and the servers share that filesystem anyway.

A server whose shape cannot be read is refused rather than trusted: a wrong vocabulary or
layer layout would otherwise surface as silently wrong logprobs or routes.

With routing replay r3 the server must also return routed experts: ``/get_server_info``
is asked for ``enable_return_routed_experts`` (SGLang's server argument), and a one-token
probe request with ``return_routed_experts`` must come back with routes of the expected
shape -- this also catches routers and gateways that drop the request field.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx

from megatron_rl.rollout.protocol import (
    RolloutProtocolError,
    RolloutServerError,
    SamplingParams,
    build_generate_request,
    decode_generate_response,
)
from megatron_rl.weight_sync.hf_config import ModelShape, read_model_shape


async def _get_json(http: httpx.AsyncClient, url: str, path: str) -> dict[str, Any]:
    try:
        response = await http.get(f"{url}{path}", timeout=30.0)
    except httpx.HTTPError as exc:
        raise RolloutServerError(f"{url}: {path} failed ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        raise RolloutServerError(
            f"{url}: {path} answered HTTP {response.status_code}: {response.text[:300]}"
        )
    try:
        data = response.json()
    except ValueError:
        raise RolloutServerError(f"{url}: {path} did not answer JSON") from None
    if not isinstance(data, dict):
        raise RolloutServerError(f"{url}: {path} answered {type(data).__name__}, not an object")
    return data


def served_shape(info: dict[str, Any], url: str) -> tuple[ModelShape, str]:
    """The served model's shape and where it was read (see the module docstring)."""
    if "model_shape" in info:
        try:
            return ModelShape.from_dict(info["model_shape"]), "/get_model_info model_shape"
        except ValueError as exc:
            raise RolloutServerError(f"{url}: {exc}") from None
    model_path = info.get("model_path")
    if isinstance(model_path, str) and os.path.isfile(os.path.join(model_path, "config.json")):
        try:
            return read_model_shape(model_path), f"{model_path}/config.json"
        except ValueError as exc:
            raise RolloutServerError(f"{url}: {exc}") from None
    raise RolloutServerError(
        f"{url}: cannot verify the served model: /get_model_info has no model_shape and its "
        f"model_path {model_path!r} is not a checkpoint directory readable here (serve a "
        f"directory shared with the trainer, as weight sync from disk needs anyway)"
    )


async def check_server(
    http: httpx.AsyncClient, url: str, trainer: ModelShape, require_routed_experts: bool
) -> dict[str, Any]:
    """Raise :class:`RolloutServerError` naming ``url`` unless the server fits; return its
    ``/get_model_info``."""
    info = await _get_json(http, url, "/get_model_info")
    if info.get("is_generation") is False:
        raise RolloutServerError(f"{url}: serves an embedding model, not a generation model")
    shape, source = served_shape(info, url)
    differences = trainer.differences(shape)
    if differences:
        raise RolloutServerError(
            f"{url}: served model does not match the trainer (trainer vs server, from {source}): "
            + "; ".join(differences)
        )
    if require_routed_experts:
        try:
            server_info = await _get_json(http, url, "/get_server_info")
        except RolloutServerError:
            server_info = {}  # routers may not forward it; the probe below decides
        if server_info.get("enable_return_routed_experts") is False:
            raise RolloutServerError(
                f"{url}: started without --enable-return-routed-experts, which routing replay r3 needs"
            )
        await probe_routed_experts(http, url, trainer)
    return info


async def probe_routed_experts(http: httpx.AsyncClient, url: str, shape: ModelShape) -> None:
    """One greedy token with ``return_routed_experts``; the routes must decode."""
    body = build_generate_request(
        rid=f"routed-experts-probe-{uuid.uuid4().hex[:12]}",
        input_ids=[1 % shape.vocab_size, 2 % shape.vocab_size],
        sampling=SamplingParams(temperature=0.0, max_new_tokens=1),
        return_routed_experts=True,
    )
    try:
        response = await http.post(f"{url}/generate", json=body, timeout=120.0)
    except httpx.HTTPError as exc:
        raise RolloutServerError(
            f"{url}: routed-experts probe failed ({type(exc).__name__}: {exc})"
        ) from None
    if response.status_code != 200:
        raise RolloutServerError(
            f"{url}: routed-experts probe answered HTTP {response.status_code}: {response.text[:300]}"
        )
    try:
        decode_generate_response(response.json(), request=body, shape=shape, server_url=url)
    except (RolloutProtocolError, ValueError) as exc:
        raise RolloutServerError(
            f"{url}: returns no usable routed experts, which r3 needs: {exc}"
        ) from None
