"""SGLang's ``/generate`` wire format: building requests, checking and decoding responses.

Request (one sequence per request; see ``shared/reference.md`` section 3)::

    {"rid": ..., "input_ids": [...], "sampling_params": {"temperature", "top_p", "top_k",
     "max_new_tokens", "stop_token_ids", "ignore_eos", "sampling_seed", "n": 1},
     "return_logprob": true, "logprob_start_len": -1, "return_routed_experts": true}

Response: ``{"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": ...},
"prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
"output_token_logprobs": [[logprob, token_id, text|null], ...], "routed_experts"}}``.

``routed_experts`` is base64 of little-endian int32 in C order, logical shape
``[prompt + response - 1, num_hidden_layers, top-k]`` with dense layers filled with 0
(older SGLang builds sent the same array as nested JSON lists; both are accepted). The
decoder keeps only the MoE layers, in the compact dtype of ``data.routes``.

Every response is checked before use; anything malformed raises
:class:`RolloutProtocolError` naming the request id and the server.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megatron_rl.data import routes as route_utils
from megatron_rl.weight_sync.hf_config import ModelShape

FINISH_TYPES = ("stop", "length", "abort")


class RolloutProtocolError(RuntimeError):
    """A request the server refused or a response that breaks the protocol."""

    def __init__(self, message: str, *, rid: str | None = None, server_url: str | None = None):
        self.rid, self.server_url, self.detail = rid, server_url, message
        where = ", ".join(
            p
            for p in (
                f"request {rid!r}" if rid else "",
                f"server {server_url}" if server_url else "",
            )
            if p
        )
        super().__init__(f"{where}: {message}" if where else message)


class RolloutServerError(RuntimeError):
    """Rollout servers that are down, refuse a control call, or do not fit the trainer."""


class RolloutAbortedError(RolloutProtocolError):
    """The server aborted the request (finish_reason 'abort'); worth retrying."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """SGLang sampling parameters the trainer uses."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k (SGLang's convention)."""
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def to_json(self, sampling_seed: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "max_new_tokens": int(self.max_new_tokens),
            "ignore_eos": bool(self.ignore_eos),
            "n": 1,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        if sampling_seed is not None:
            params["sampling_seed"] = int(sampling_seed)
        return params


def build_generate_request(
    *,
    rid: str,
    input_ids: list[int],
    sampling: SamplingParams,
    sampling_seed: int | None = None,
    return_routed_experts: bool = False,
    logprob_start_len: int = -1,
) -> dict[str, Any]:
    """The JSON body of one ``POST /generate`` for one sequence."""
    body: dict[str, Any] = {
        "rid": rid,
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": sampling.to_json(sampling_seed),
        "return_logprob": True,
        "logprob_start_len": int(logprob_start_len),
        "stream": False,
    }
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


BATCH_SHARED_FIELDS = ("return_logprob", "logprob_start_len", "stream", "return_routed_experts")
"""Fields a batched /generate carries once for all its sequences."""


def build_batch_request(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One batched ``POST /generate`` from single-sequence bodies (each built by
    :func:`build_generate_request`): SGLang takes lists for ``rid``, ``input_ids`` and
    ``sampling_params`` (so every sequence keeps its own seed) and answers a list in the
    same order."""
    if not bodies:
        raise ValueError("a batched /generate needs at least one sequence")
    for body in bodies[1:]:
        for name in BATCH_SHARED_FIELDS:
            if body.get(name) != bodies[0].get(name):
                raise ValueError(
                    f"request {body['rid']!r}: {name} differs from {bodies[0]['rid']!r} in one "
                    "batched /generate"
                )
    batch: dict[str, Any] = {
        "rid": [b["rid"] for b in bodies],
        "input_ids": [b["input_ids"] for b in bodies],
        "sampling_params": [b["sampling_params"] for b in bodies],
    }
    batch.update({k: bodies[0][k] for k in BATCH_SHARED_FIELDS if k in bodies[0]})
    return batch


@dataclass(kw_only=True)
class GenerateResponse:
    """A checked ``/generate`` response for one sequence."""

    rid: str
    output_ids: list[int]
    logprobs: torch.Tensor
    """mu_old per generated token, float32 ``[len(output_ids)]``."""
    routes: torch.Tensor | None
    """MoE-layer routes ``[prompt + response - 1, moe_layers, topk]`` (compact dtype)."""
    finish_reason: str
    weight_version: str | None
    prompt_tokens: int
    completion_tokens: int
    meta_info: dict[str, Any] = field(default_factory=dict)


def encode_routed_experts(routes: torch.Tensor | np.ndarray) -> str:
    """SGLang's encoding: base64 of the little-endian int32 bytes in C order."""
    array = routes.numpy() if isinstance(routes, torch.Tensor) else np.asarray(routes)
    return base64.b64encode(np.ascontiguousarray(array, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(
    value: Any, *, num_tokens: int, shape: ModelShape, rid: str = "", server_url: str = ""
) -> torch.Tensor:
    """``meta_info.routed_experts`` -> compact MoE-layer routes ``[num_tokens, moe, topk]``."""

    def fail(message: str) -> RolloutProtocolError:
        return RolloutProtocolError(f"routed_experts: {message}", rid=rid, server_url=server_url)

    layers, topk = shape.num_hidden_layers, shape.num_experts_per_tok
    expected = num_tokens * layers * topk
    layout = f"[{num_tokens} tokens (prompt + response - 1), {layers} layers, top-{topk}]"
    if isinstance(value, str):
        try:
            raw = _b64decode(value)
        except (binascii.Error, ValueError) as exc:
            raise fail(f"invalid base64 ({exc}); truncated or corrupted payload") from None
        if len(raw) % 4:
            raise fail(f"{len(raw)} bytes is not a whole number of int32 values")
        if len(raw) // 4 != expected:
            raise fail(f"{len(raw) // 4} int32 values, expected {expected} for {layout}")
        array = np.frombuffer(raw, dtype="<i4").astype(np.int32)  # native order, writable
    elif isinstance(value, list):
        # Older SGLang builds: nested JSON lists with the same logical shape.
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise fail(f"ragged JSON lists ({exc})") from None
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise fail(f"JSON lists hold {array.dtype} values, not integer expert ids")
        if array.size != expected or (expected and array.shape != (num_tokens, layers, topk)):
            raise fail(f"JSON lists of shape {list(array.shape)}, expected {layout}")
        if array.size and (array.min() < -(2**31) or array.max() >= 2**31):
            raise fail("JSON lists hold values outside int32")
        array = array.astype(np.int32)
    elif value is None:
        raise fail(
            "missing (null): start SGLang with --enable-return-routed-experts, and check that "
            "no router or gateway drops the request's return_routed_experts field"
        )
    else:
        raise fail(f"expected a base64 string or nested lists, got {type(value).__name__}")
    ids = torch.from_numpy(array).view(num_tokens, layers, topk)
    return _checked_moe_routes(ids, shape, fail)


def _b64decode(text: str) -> bytes:
    try:
        # strict_mode (Python 3.11+) rejects stray characters and bad padding, and is
        # faster than base64.b64decode(validate=True).
        return binascii.a2b_base64(text, strict_mode=True)
    except TypeError:
        return base64.b64decode(text, validate=True)


def _checked_moe_routes(ids: torch.Tensor, shape: ModelShape, fail) -> torch.Tensor:
    """All-layer int32 ids -> validated MoE-layer routes in the compact dtype.

    The checks of ``data.routes.validate``, vectorised for responses of many thousand
    tokens, plus one of SGLang's layout: dense layers must hold zeros."""
    num_tokens, layers, topk = ids.shape
    moe = list(shape.moe_layers)
    dense = [i for i in range(layers) if i not in moe]
    if dense and num_tokens:
        nonzero = ids.index_select(1, torch.tensor(dense)).reshape(num_tokens, len(dense), topk)
        hit = nonzero.any(dim=2).any(dim=0)
        if hit.any():
            # SGLang fills dense layers with 0; anything else means the layer axis is misread.
            layer = dense[int(hit.nonzero()[0])]
            raise fail(
                f"dense layer {layer} carries non-zero expert ids: the server's layer layout "
                f"differs from the trainer's MoE layers {moe}"
            )
    picked = ids.index_select(1, torch.tensor(moe, dtype=torch.long))
    bad = (picked < 0) | (picked >= shape.num_experts)
    if bad.any():
        t, j, k = (int(v) for v in bad.nonzero()[0])
        raise fail(
            f"expert id {int(picked[t, j, k])} at token {t}, layer {moe[j]} is out of range "
            f"[0, {shape.num_experts})"
        )
    routes = route_utils.compact(picked, shape.num_experts)
    if topk > 1 and num_tokens:
        ordered = routes.sort(dim=-1).values
        dup = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1)
        if dup.any():
            t, j = (int(v) for v in dup.nonzero()[0])
            raise fail(f"duplicate expert ids {picked[t, j].tolist()} at token {t}, layer {moe[j]}")
    elif num_tokens >= 16:
        silent = ~routes.reshape(num_tokens, len(moe)).any(dim=0)
        if silent.any():
            layer = moe[int(silent.nonzero()[0])]
            raise fail(
                f"every route of layer {layer} is expert 0: the capture of this layer was lost"
            )
    return routes


def _field(container: dict, name: str, kinds: tuple[type, ...], where: str, fail) -> Any:
    if name not in container:
        raise fail(f"missing field {where}{name}")
    value = container[name]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise fail(
            f"{where}{name} is {type(value).__name__}, expected {'/'.join(k.__name__ for k in kinds)}"
        )
    return value


def decode_generate_response(
    payload: Any,
    *,
    request: dict[str, Any],
    shape: ModelShape,
    server_url: str = "",
) -> GenerateResponse:
    """Check a ``/generate`` response to ``request`` (built by :func:`build_generate_request`)."""
    rid = str(request.get("rid", ""))

    def fail(message: str) -> RolloutProtocolError:
        return RolloutProtocolError(message, rid=rid, server_url=server_url)

    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]  # a batch of one
    if not isinstance(payload, dict):
        raise fail(f"response is {type(payload).__name__}, expected a JSON object")
    output_ids = _field(payload, "output_ids", (list,), "", fail)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in output_ids):
        raise fail("output_ids holds non-integer values")
    bad = [t for t in output_ids if not 0 <= t < shape.vocab_size]
    if bad:
        raise fail(f"output_ids {bad[:5]} are outside the vocabulary [0, {shape.vocab_size})")
    max_new = request.get("sampling_params", {}).get("max_new_tokens")
    if max_new is not None and len(output_ids) > max_new:
        raise fail(f"{len(output_ids)} output tokens exceed max_new_tokens {max_new}")
    meta = _field(payload, "meta_info", (dict,), "", fail)

    if meta.get("id") is not None and str(meta["id"]) != rid:
        raise fail(f"meta_info.id {meta['id']!r} answers another request")
    finish = meta.get("finish_reason")
    finish_type = finish.get("type") if isinstance(finish, dict) else finish
    if finish_type not in FINISH_TYPES:
        raise fail(f"meta_info.finish_reason {finish!r} is not one of {FINISH_TYPES}")
    if finish_type == "abort":
        message = finish.get("message", "") if isinstance(finish, dict) else ""
        raise RolloutAbortedError(
            f"aborted by the server: {message}", rid=rid, server_url=server_url
        )

    prompt_len = len(request["input_ids"])
    prompt_tokens = meta.get("prompt_tokens", prompt_len)
    if prompt_tokens != prompt_len:
        raise fail(f"meta_info.prompt_tokens {prompt_tokens} != {prompt_len} input ids sent")
    completion_tokens = meta.get("completion_tokens", len(output_ids))
    if completion_tokens != len(output_ids):
        raise fail(
            f"meta_info.completion_tokens {completion_tokens} != {len(output_ids)} output_ids"
        )

    entries = _field(meta, "output_token_logprobs", (list,), "meta_info.", fail)
    if len(entries) != len(output_ids):
        raise fail(f"{len(entries)} output_token_logprobs for {len(output_ids)} output_ids")
    values = []
    for i, (entry, token) in enumerate(zip(entries, output_ids, strict=True)):
        if not isinstance(entry, list) or len(entry) < 2:
            raise fail(
                f"output_token_logprobs[{i}] is {entry!r}, expected [logprob, token_id, text]"
            )
        logprob, entry_token = entry[0], entry[1]
        if entry_token != token:
            raise fail(
                f"output_token_logprobs[{i}] is for token {entry_token}, output_ids[{i}] is {token}"
            )
        if (
            isinstance(logprob, bool)
            or not isinstance(logprob, (int, float))
            or not math.isfinite(logprob)
        ):
            raise fail(f"output_token_logprobs[{i}] logprob {logprob!r} is not a finite number")
        if logprob > 1e-4:
            raise fail(f"output_token_logprobs[{i}] logprob {logprob} is positive")
        values.append(float(logprob))

    routes = None
    if request.get("return_routed_experts"):
        routes = decode_routed_experts(
            meta.get("routed_experts"),
            num_tokens=max(prompt_len + len(output_ids) - 1, 0),
            shape=shape,
            rid=rid,
            server_url=server_url,
        )
    version = meta.get("weight_version")
    return GenerateResponse(
        rid=rid,
        output_ids=list(output_ids),
        logprobs=torch.tensor(values, dtype=torch.float32),
        routes=routes,
        finish_reason=str(finish_type),
        weight_version=None if version is None else str(version),
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        meta_info={
            k: v for k, v in meta.items() if k not in ("routed_experts", "output_token_logprobs")
        },
    )
