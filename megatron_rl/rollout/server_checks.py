"""Start-up checks of a rollout server against the trainer's model.

Where the served model's shape comes from, in order:

1. ``model_shape`` in ``GET /model_info`` (``/get_model_info`` on older servers and
   through sglang-router) -- the embedded server reports it;
2. ``config.json`` in the directory named by ``model_path`` of ``/model_info`` -- real
   SGLang reports only paths (model_path, tokenizer_path, is_generation, weight_version,
   ...), so the trainer reads the checkpoint's config itself. With weight sync through
   ``/update_weights_from_disk`` the trainer and the servers share that filesystem anyway.

A server whose shape cannot be read is refused rather than trusted: a wrong vocabulary or
layer layout would otherwise surface as silently wrong logprobs or routes.

With routing replay r3 the server must also return routed experts: ``/server_info``
is asked for ``enable_return_routed_experts`` (SGLang's server argument), and a one-token
probe request with ``return_routed_experts`` must come back with routes of the expected
shape -- this also catches routers and gateways that drop the request field
(sglang-router 0.3.2 does: it re-serialises ``/generate`` bodies with the fields it knows).

Logprobs and temperature: SGLang reports mu_old as log softmax(logits / temperature)
unless the server runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB``, an environment variable
that SGLang 0.5.23's ``/server_info`` does not report. The embedded server reports its
``return_original_logprob``; a server that says it returns temperature-1 logprobs is
refused when the trainer samples at another temperature, and a server that does not say
gets a warning at such temperatures (nothing the trainer can read tells).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import httpx

from megatron_rl.rollout.control import get_info
from megatron_rl.rollout.protocol import (
    RolloutProtocolError,
    RolloutServerError,
    SamplingParams,
    build_generate_request,
    decode_generate_response,
)
from megatron_rl.weight_sync.hf_config import ModelShape, read_model_shape

logger = logging.getLogger(__name__)


async def _get_json(http: httpx.AsyncClient, url: str, name: str) -> dict[str, Any]:
    """SGLang's ``name`` info endpoint (see ``control.get_info``) as a JSON object."""
    path = f"/{name}"
    try:
        path, response = await get_info(http, url, name)
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
            return ModelShape.from_dict(info["model_shape"]), "/model_info model_shape"
        except ValueError as exc:
            raise RolloutServerError(f"{url}: {exc}") from None
    model_path = info.get("model_path")
    if isinstance(model_path, str) and os.path.isfile(os.path.join(model_path, "config.json")):
        try:
            return read_model_shape(model_path), f"{model_path}/config.json"
        except ValueError as exc:
            raise RolloutServerError(f"{url}: {exc}") from None
    raise RolloutServerError(
        f"{url}: cannot verify the served model: /model_info has no model_shape and its "
        f"model_path {model_path!r} is not a checkpoint directory readable here (serve a "
        f"directory shared with the trainer, as weight sync from disk needs anyway)"
    )


async def check_server(
    http: httpx.AsyncClient,
    url: str,
    trainer: ModelShape,
    require_routed_experts: bool,
    *,
    temperature: float = 1.0,
    router: bool = False,
) -> dict[str, Any]:
    """Raise :class:`RolloutServerError` naming ``url`` unless the server fits; return its
    ``/model_info``. ``router``: ``url`` is an sglang-router (its own /server_info says
    nothing of the workers; the routed-experts probe goes through it)."""
    info = await _get_json(http, url, "model_info")
    if info.get("is_generation") is False:
        raise RolloutServerError(f"{url}: serves an embedding model, not a generation model")
    shape, source = served_shape(info, url)
    differences = trainer.differences(shape)
    if differences:
        raise RolloutServerError(
            f"{url}: served model does not match the trainer (trainer vs server, from {source}): "
            + "; ".join(differences)
        )
    server_info: dict[str, Any] = {}
    if not router:
        try:
            server_info = await _get_json(http, url, "server_info")
        except RolloutServerError:
            server_info = {}  # gateways may not forward it; the checks below decide
        check_logprob_temperature(server_info, url, temperature)
    if require_routed_experts:
        if server_info.get("enable_return_routed_experts") is False:
            raise RolloutServerError(
                f"{url}: started without --enable-return-routed-experts, which routing replay r3 needs"
            )
        await probe_routed_experts(http, url, trainer, router=router)
    return info


def check_logprob_temperature(server_info: dict[str, Any], url: str, temperature: float) -> None:
    """Refuse a server that says its logprobs are at temperature 1 when the trainer samples
    (and scores mu_old) at another temperature; warn when it cannot say (SGLang)."""
    if temperature in (0.0, 1.0):
        return  # greedy and temperature-1 logprobs are the same either way
    original = server_info.get("return_original_logprob")
    if original is True:
        raise RolloutServerError(
            f"{url}: reports logprobs at temperature 1 (return_original_logprob), but the "
            f"trainer samples at --rl-temperature {temperature} and takes the reported "
            f"logprobs as mu_old of that distribution: start the server without it"
        )
    if original is None:
        logger.warning(
            "rollout server %s does not say at which temperature it reports logprobs; the "
            "trainer takes them as log softmax(logits / %s). SGLang does so unless it runs "
            "with SGLANG_RETURN_ORIGINAL_LOGPROB set: make sure it does not, or mu_old and "
            "every IS weight will be wrong", url, temperature,
        )  # fmt: skip


async def probe_routed_experts(
    http: httpx.AsyncClient, url: str, shape: ModelShape, *, router: bool = False
) -> None:
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
        hint = (
            " -- this URL is an sglang-router, which drops the request's "
            "return_routed_experts field (sglang-router 0.3.2 does): for r3 give the servers "
            "themselves as --rl-rollout-url (the client spreads requests over them); "
            "without r3, --no-rl-router-agreement stops asking for routes"
            if router else ""
        )
        raise RolloutServerError(
            f"{url}: returns no usable routed experts, which r3 (and the router-agreement "
            f"metric) need: {exc}{hint}"
        ) from None
