"""Embedded SGLang-compatible rollout server (FastAPI + uvicorn, CPU).

    python -m megatron_rl.inference.server --model-path DIR --port P [--host 127.0.0.1]
        [--dtype bfloat16|float32] [--quantization fp8|w8a8_fp8] [--max-running-requests 32]
        [--threads 1]

It takes ``sglang.launch_server``'s names for what it supports (see :func:`parse_args`), so
one script can start either engine; flags it cannot honour (``--tp-size 2``,
``--quantization awq``, ...) are refused by name. ``--quantization fp8`` and ``w8a8_fp8``
store the linear and expert weights as FP8 the way SGLang's online quantization does
(``inference.fp8``). The older ``--model``, ``--dtype bf16``,
``--max-batch-size`` and ``--seed`` spellings still work.

Serves a Hugging Face Qwen3-MoE checkpoint directory with the subset of SGLang's HTTP API
the trainer uses, same request and response schema:

- ``POST /generate``: ``input_ids`` (a list, or a list of lists for a batch) or ``text``;
  ``sampling_params`` (``n`` copies per prompt); ``return_logprob``;
  ``logprob_start_len``; ``return_routed_experts`` (SGLang's base64 int32 encoding);
  a batch or ``n > 1`` returns a list, prompt-major.
- ``GET /health``, ``GET /model_info`` (SGLang's fields plus ``model_shape``: vocabulary,
  layers, experts, top-k, MoE layers), ``GET /server_info``; also by SGLang's deprecated
  names ``/get_model_info`` and ``/get_server_info``.
- ``POST /flush_cache`` (a no-op that succeeds: prompts are shared only within a batch,
  no prefix cache outlives it).
- ``POST /update_weights_from_disk`` ``{model_path, load_format, weight_version,
  flush_cache}``: requests already queued finish on the old weights; a missing path or a
  checkpoint of another shape is refused with 400 and the old weights keep serving.

Errors are JSON in SGLang's shapes: a body that does not parse or validate gets SGLang's
``ErrorResponse`` (``{"object": "error", "message", "type", "param", "code"}``, 400); every
other error ``{"error": {"message": ...}}`` with its status (400 refused, 401 no key, 413
body too large, 503 queue full or shutting down, 500 a generation that failed). With an API
key (``--api-key``, or the ``MEGATRON_RL_SERVER_API_KEY`` environment variable, which keeps
it out of ``ps``) every path requires ``Authorization: Bearer <key>``, ``/docs`` and
``/openapi.json`` included.

Limits: every numeric sampling field is bounded and finite; a request's sequences (prompts
times ``n``) and the queue are bounded by ``--max-queued-requests``, bodies by
``--max-request-bytes``, batches by ``--max-running-requests``, ``--max-total-tokens`` and
``--max-prefill-tokens``. Prompts are expanded and responses encoded off the event loop, a
request whose client disconnects is aborted, a request that fails inside the engine fails
alone. SIGTERM stops the server within seconds even mid-generation; with ``--parent-pid``
it also stops when that process dies (``inference.lifetime``).

From Python, :func:`start_server_process` (re-exported from ``inference.launcher``) starts it
as a subprocess and returns a handle with ``.url`` and ``.stop()`` once ``/health`` answers;
:func:`create_app` serves an in-process :class:`GenerationEngine` with any ASGI server.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import uuid
from http import HTTPStatus
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from megatron_rl import __version__
from megatron_rl.inference.engine import (
    MAX_TOP_K,
    EngineStopped,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestFuture,
)
from megatron_rl.inference.fp8 import SCHEMES
from megatron_rl.inference.hf_model import WeightUpdateError
from megatron_rl.inference.launcher import (  # noqa: F401
    API_KEY_ENV,
    ServerHandle,
    start_server_process,
)
from megatron_rl.inference.lifetime import Lifetime
from megatron_rl.inference.weight_update import SERVER_LAYOUT, add_distributed_weight_update
from megatron_rl.rollout.protocol import encode_routed_experts

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
# Bounded on both sides and finite: a value the engine takes is safe to batch with others.
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Real = Annotated[float, Field(allow_inf_nan=False, ge=-1e9, le=1e9)]
DISCONNECT_POLL_S = 0.25
"""How often a waiting /generate checks whether its client went away."""


class SamplingParamsIn(BaseModel):
    """SGLang's sampling parameters; unknown names are refused, unsupported values too."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_new_tokens: Count = 128
    temperature: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e9)] = 1.0
    top_p: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] = -1
    min_p: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)] = 0.0
    min_new_tokens: Count = 0
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[Count], Field(max_length=1024)] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=INT32_MAX)] = 1
    sampling_seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: Real = 0.0
    presence_penalty: Real = 0.0
    repetition_penalty: Real = 1.0

    def unsupported(self) -> list[str]:
        """Features SGLang has and this server does not implement, when asked for."""
        defaults = {
            "min_p": 0.0, "min_new_tokens": 0, "frequency_penalty": 0.0,
            "presence_penalty": 0.0, "repetition_penalty": 1.0,
        }  # fmt: skip
        out = [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        if self.stop:
            out.append("stop strings (use stop_token_ids)")
        return out


class GenerateIn(BaseModel):
    """SGLang's ``GenerateReqInput`` fields this server reads (other fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsIn | list[SamplingParamsIn] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: (
        Annotated[int, Field(ge=-1, le=INT32_MAX)]
        | list[Annotated[int, Field(ge=-1, le=INT32_MAX)]]
    ) = -1
    top_logprobs_num: Count | list[Count] = 0
    return_routed_experts: bool = False
    stream: bool = False


class UpdateWeightsIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True


class BadRequest(ValueError):
    """A request this server refuses with 400."""


def _error(status: int, message: str) -> JSONResponse:
    """SGLang's error body for refused and failed requests (``_create_error_response``)."""
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _invalid(message: str) -> JSONResponse:
    """SGLang's body for a request that does not validate (its ``ErrorResponse``)."""
    status = HTTPStatus.BAD_REQUEST
    body = {"object": "error", "message": message, "type": status.phrase, "param": None,
            "code": status.value}  # fmt: skip
    return JSONResponse(body, status_code=status.value)


def _per_prompt(value: Any, count: int, name: str) -> list:
    """Broadcast a scalar field over the prompts, or check a list field's length."""
    if isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def _expand(body: GenerateIn, engine: GenerationEngine) -> tuple[list[GenerationRequest], bool]:
    """One :class:`GenerationRequest` per output sequence; and whether to answer a list."""
    if body.stream:
        raise BadRequest("stream=true is not supported by the embedded server")
    if (body.text is None) == (body.input_ids is None):
        raise BadRequest("give exactly one of text and input_ids")
    if body.input_ids is not None:
        single = not body.input_ids or isinstance(body.input_ids[0], int)
        prompts = [body.input_ids] if single else body.input_ids
    else:
        single = isinstance(body.text, str)
        texts = [body.text] if single else body.text
        if engine.tokenizer is None:
            raise BadRequest("this checkpoint has no tokenizer: send input_ids, not text")
        prompts = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not prompts:
        raise BadRequest("the batch holds no prompt")
    count = len(prompts)
    params = _per_prompt(body.sampling_params or SamplingParamsIn(), count, "sampling_params")
    # Count before expanding: n = 10**6 must be refused, not materialised.
    sequences = sum(p.n for p in params)
    if sequences > engine.max_queued_requests:
        raise BadRequest(
            f"the request asks for {sequences} sequences ({count} prompts x n); the server "
            f"takes at most {engine.max_queued_requests} (--max-queued-requests)"
        )
    rids = _per_prompt(body.rid, count, "rid")
    return_logprob = _per_prompt(body.return_logprob, count, "return_logprob")
    start_len = _per_prompt(body.logprob_start_len, count, "logprob_start_len")
    top_logprobs = _per_prompt(body.top_logprobs_num, count, "top_logprobs_num")
    requests = []
    for i, prompt in enumerate(prompts):
        p = params[i]
        rid = rids[i] if rids[i] is not None else uuid.uuid4().hex
        problems = p.unsupported() + (
            [f"top_logprobs_num={top_logprobs[i]}"] if top_logprobs[i] else []
        )
        if problems:
            raise BadRequest(f"request {rid!r}: not supported by the embedded server: {problems}")
        for j in range(p.n):
            requests.append(
                GenerationRequest(
                    rid=rid if p.n == 1 else f"{rid}-{j}",
                    input_ids=list(prompt),
                    max_new_tokens=p.max_new_tokens,
                    temperature=p.temperature,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    stop_token_ids=tuple(p.stop_token_ids or ()),
                    ignore_eos=p.ignore_eos,
                    # Copies of one prompt must differ: offset the seed per copy.
                    sampling_seed=None if p.sampling_seed is None else p.sampling_seed + j,
                    return_logprob=return_logprob[i],
                    logprob_start_len=start_len[i],
                    return_routed_experts=body.return_routed_experts,
                )
            )
    for request in requests:
        try:
            engine.validate(request)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    return requests, not single or len(requests) > 1


def _response(request: GenerationRequest, result: GenerationResult, engine) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": result.rid,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.output_ids),
        "cached_tokens": result.cached_tokens,
        "weight_version": result.weight_version,
        "e2e_latency": result.latency_s,
    }
    if request.return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tok, None]
            for lp, tok in zip(result.output_logprobs, result.output_ids, strict=True)
        ]
        if result.input_logprobs is not None:
            ids = request.input_ids[request.logprob_start_len :]
            meta["input_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(result.input_logprobs, ids, strict=True)
            ]
    if result.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(result.routed_experts)
    return {
        "text": (
            engine.tokenizer.decode(result.output_ids, skip_special_tokens=True)
            if engine.tokenizer is not None
            else ""
        ),
        "output_ids": result.output_ids,
        "meta_info": meta,
    }


class _Gate:
    """Pure ASGI middleware (a ``BaseHTTPMiddleware`` would hide client disconnects from
    the handlers): the API key on every path, and a cap on the body's size, read here so
    that an over-large body is refused before it is parsed on the event loop."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            message = "Unauthorized: missing or wrong API key (send 'Authorization: Bearer <key>')"
            await _error(401, message)(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the handler sees it as a disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope, receive, send) -> None:
        message = f"request body larger than {self.max_body_bytes} bytes (--max-request-bytes)"
        await _error(413, message)(scope, receive, send)


async def _await_or_abort(request: Request, futures: list[RequestFuture]) -> list | None:
    """The futures' outcomes (results or exceptions); None if the client disconnected
    first. If it disconnects or the handler is cancelled, the futures are aborted so
    they stop using the engine."""
    waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                logger.info("client of %d sequences disconnected: aborting them", len(futures))
                return None
    finally:
        if not waiter.done():
            for future in futures:
                future.abort()
            waiter.cancel()


def create_app(
    engine: GenerationEngine, *, api_key: str | None = None, max_body_bytes: int = 64 << 20
) -> FastAPI:
    """The HTTP API over ``engine`` (the caller owns the engine and closes it)."""
    app = FastAPI(title="megatron_rl embedded rollout server", version=__version__)
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return _invalid("invalid request: " + "; ".join(problems[:8]))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(400, str(exc))

    def submit(body: GenerateIn) -> tuple[list[GenerationRequest], bool, list[RequestFuture]]:
        requests, as_list = _expand(body, engine)
        try:
            return requests, as_list, engine.submit_all(requests)
        except QueueFull:
            raise
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @app.post("/generate")
    async def generate(body: GenerateIn, request: Request):
        # Tokenising and expanding a large request is CPU work: keep it off the event loop
        # so /health and the other requests are served meanwhile.
        try:
            requests, as_list, futures = await asyncio.to_thread(submit, body)
        except (QueueFull, EngineStopped) as exc:
            return _error(503, str(exc))
        outcomes = await _await_or_abort(request, futures)
        if outcomes is None:
            return _error(400, "client disconnected; the request was aborted")
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            stopped = [o for o in failed if isinstance(o, EngineStopped)]
            if stopped:
                return _error(503, f"server shutting down: {stopped[0]}")
            logger.error("generation of %d sequences failed: %r", len(futures), failed[0])
            return _error(500, f"generation failed: {failed[0]!r}")

        def encode() -> JSONResponse:
            # Rendered here, off the event loop; a returned Response also skips FastAPI's
            # jsonable_encoder, whose walk over every logprob entry cost ~0.1 s per
            # 128 x 64-token batch on the loop, competing with generation for the GIL.
            outputs = [_response(q, r, engine) for q, r in zip(requests, outcomes, strict=True)]
            return JSONResponse(outputs if as_list else outputs[0])

        return await asyncio.to_thread(encode)

    @app.get("/health")
    @app.get("/health_generate")
    async def health():
        return {"status": "ok"}

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's deprecated name, still what sglang-router forwards
    async def model_info():
        return {
            "model_path": engine.model_path,
            "tokenizer_path": engine.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": engine.config.model_type,
            "architectures": list(engine.config.architectures or ["Qwen3MoeForCausalLM"]),
            "model_shape": engine.shape.to_dict(),
        }

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {
            "version": f"megatron_rl {__version__} embedded server",
            "model_path": engine.model_path,
            "tokenizer_path": engine.tokenizer_path,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "quantization": engine.quantization,
            "context_length": engine.context_length,
            "max_running_requests": engine.max_batch_size,
            "max_total_tokens": engine.max_total_tokens,
            "max_prefill_tokens": engine.max_prefill_tokens,
            "max_queued_requests": engine.max_queued_requests,
            "skip_tokenizer_init": engine.tokenizer is None,
            "enable_return_routed_experts": True,
            "api_key_required": api_key is not None,
            "weight_version": engine.weight_version,
            "return_original_logprob": engine.original_logprobs,
            **SERVER_LAYOUT,
        }

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return {
            "success": True,
            "message": "Cache flushed (the embedded server keeps no prefix cache).",
        }

    @app.post("/update_weights_from_disk")
    async def update_weights(body: UpdateWeightsIn):
        if body.load_format not in (None, "auto", "safetensors"):
            return JSONResponse(
                {"success": False, "message": f"load_format {body.load_format!r} is not supported"},
                status_code=400,
            )
        try:
            version = await asyncio.to_thread(
                engine.update_weights_from_disk, body.model_path, body.weight_version
            )
        except WeightUpdateError as exc:
            logger.warning("weight update refused: %s", exc)
            return JSONResponse({"success": False, "message": str(exc)}, status_code=400)
        return {
            "success": True,
            "message": f"Succeeded to update model weights from {body.model_path}.",
            "num_paused_requests": 0,
            "weight_version": version,
        }

    add_distributed_weight_update(app, engine)
    return app


DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32",
               "auto": "bf16"}  # fmt: skip
"""SGLang's --dtype names and the older short ones; 'auto' serves bf16 (SGLang's 'auto'
keeps a bf16 checkpoint in bf16, and it would turn fp32 into fp16, which is not served)."""

# sglang.launch_server flags this server cannot honour, with the value it can (None: only
# absent) and why. A value that changes nothing (``--tp-size 1``) is accepted.
UNSUPPORTED_FLAGS: dict[str, tuple[str | None, str]] = {
    "--tp-size": ("1", "the embedded server runs one CPU process (no tensor parallelism)"),
    "--tensor-parallel-size": ("1", "the embedded server runs one CPU process"),
    "--dp-size": ("1", "start several servers instead (--rl-rollout-num-servers)"),
    "--data-parallel-size": ("1", "start several servers instead (--rl-rollout-num-servers)"),
    "--pp-size": ("1", "the embedded server runs one CPU process (no pipeline parallelism)"),
    "--pipeline-parallel-size": ("1", "the embedded server runs one CPU process"),
    "--ep-size": ("1", "the embedded server runs one CPU process (no expert parallelism)"),
    "--expert-parallel-size": ("1", "the embedded server runs one CPU process"),
    "--kv-cache-dtype": ("auto", "the KV cache is kept in the model's dtype"),
    "--speculative-algorithm": (None, "speculative decoding is not implemented"),
    "--enable-lora": (None, "LoRA adapters are not implemented"),
    "--lora-paths": (None, "LoRA adapters are not implemented"),
    "--tokenizer-path": (None, "the tokenizer is read from --model-path"),
    "--trust-remote-code": (None, "only transformers' own Qwen3-MoE class is served"),
    "--enable-memory-saver": (None, "memory release/resume is not implemented"),
    "--admin-api-key": (None, "one --api-key covers every endpoint"),
    "--device": ("cpu", "the embedded server runs on the CPU"),
}


QUANTIZATIONS = tuple(SCHEMES)
"""``--quantization`` methods served (SGLang's names; ``inference.fp8``)."""


class FlagError(ValueError):
    """A command-line flag the server refuses (one line, naming the flag)."""


def _refuse_unsupported(unknown: list[str]) -> None:
    i = 0
    while i < len(unknown):
        token = unknown[i]
        name, _, value = token.partition("=")
        if not name.startswith("--"):
            raise FlagError(f"unexpected argument {token!r}")
        if name not in UNSUPPORTED_FLAGS:
            raise FlagError(f"{name} is not a flag of the embedded server")
        if not value and i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
            value, i = unknown[i + 1], i + 1
        allowed, reason = UNSUPPORTED_FLAGS[name]
        if allowed is None or value != allowed:
            shown = f"{name} {value}".strip()
            raise FlagError(f"{shown} is not supported by the embedded server: {reason}")
        i += 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--model-path",
        "--model",
        dest="model_path",
        required=True,
        help="Hugging Face Qwen3-MoE checkpoint directory",
    )
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=30000)
    add(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (visible in ps: prefer ${API_KEY_ENV})",
    )
    add("--dtype", choices=sorted(DTYPE_NAMES), default="bfloat16")
    add(
        "--quantization",
        default=None,
        help="fp8: FP8 linear and expert weights, bf16 activations; w8a8_fp8: FP8 weights "
        "and per-token FP8 activations (SGLang's online quantization of a bf16 checkpoint; "
        "router gates, embeddings, lm_head and norms stay bf16)",
    )
    add(
        "--max-running-requests",
        "--max-batch-size",
        dest="max_running_requests",
        type=int,
        default=32,
        help="most sequences generated together in one batch",
    )
    add(
        "--max-total-tokens",
        type=int,
        default=None,
        help="most tokens (prompt + max_new_tokens per sequence) in one batch; default: "
        "max-running-requests full contexts",
    )
    add(
        "--max-prefill-tokens",
        type=int,
        default=16384,
        help="most distinct prompt tokens prefilled together (at least the context length)",
    )
    add(
        "--max-queued-requests",
        type=int,
        default=4096,
        help="most sequences waiting; more are refused with 503 (one request: 400)",
    )
    add("--max-request-bytes", type=int, default=64 << 20, help="largest request body")
    add(
        "--context-length",
        type=int,
        default=None,
        help="longest prompt + max_new_tokens (default: the model's max_position_embeddings)",
    )
    add("--weight-version", default="default")
    add(
        "--random-seed",
        "--seed",
        dest="random_seed",
        type=int,
        default=None,
        help="seed for requests without a sampling_seed",
    )
    add(
        "--skip-tokenizer-init",
        action="store_true",
        help="do not load the tokenizer: input_ids only, responses without text",
    )
    add(
        "--enable-return-routed-experts",
        action="store_true",
        help="accepted for SGLang compatibility: routes are always available",
    )
    add(
        "--enable-deterministic-inference",
        action="store_true",
        help="accepted for SGLang compatibility: generation is always deterministic",
    )
    add(
        "--return-original-logprob",
        action="store_true",
        help="report logprobs at temperature 1 (SGLANG_RETURN_ORIGINAL_LOGPROB=1)",
    )
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 suits small models beside a trainer on few cores)",
    )
    add(
        "--parent-pid",
        type=int,
        default=None,
        help="stop when this process (the one that started the server) dies",
    )
    add("--log-level", default="info")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The server's flags; raises :class:`FlagError` for flags it cannot honour."""
    args, unknown = build_parser().parse_known_args(argv)
    _refuse_unsupported(unknown)
    limits = ("max_running_requests", "max_total_tokens", "max_prefill_tokens",
              "max_queued_requests", "max_request_bytes", "context_length", "threads")  # fmt: skip
    for name in limits:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FlagError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    args.dtype = DTYPE_NAMES[args.dtype]
    if args.quantization is not None:
        if args.quantization not in QUANTIZATIONS:
            raise FlagError(
                f"--quantization {args.quantization} is not supported by the embedded server: "
                f"it emulates {' and '.join(QUANTIZATIONS)} only (FP8 weights quantized at "
                "load from a bf16 or fp32 checkpoint)"
            )
        if args.dtype != "bf16":
            raise FlagError(
                f"--quantization {args.quantization} computes in bfloat16 (as SGLang's FP8 "
                "kernels): drop --dtype float32"
            )
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except FlagError as exc:
        build_parser().exit(2, f"error: {exc}\n")

    import torch
    from transformers.utils import logging as hf_logging

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    engine = GenerationEngine(
        args.model_path,
        dtype=args.dtype,
        max_batch_size=args.max_running_requests,
        context_length=args.context_length,
        max_total_tokens=args.max_total_tokens,
        max_prefill_tokens=args.max_prefill_tokens,
        max_queued_requests=args.max_queued_requests,
        weight_version=args.weight_version,
        original_logprobs=args.return_original_logprob,
        seed=args.random_seed,
        load_tokenizer_files=not args.skip_tokenizer_init,
        quantization=args.quantization,
    )
    app = create_app(engine, api_key=args.api_key, max_body_bytes=args.max_request_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, timeout_graceful_shutdown=3)  # fmt: skip
    server = StoppableServer(config, engine)
    if args.parent_pid is not None:
        server.lifetime.watch_parent(args.parent_pid)
    try:
        server.run()
    finally:
        engine.close(timeout_s=5)


class StoppableServer(uvicorn.Server):
    """uvicorn's server, stopped promptly: a stop request (SIGTERM, SIGINT, parent death)
    also ends the engine's running batch, so in-flight requests answer 503 at once instead
    of holding the graceful shutdown until they finish."""

    def __init__(self, config: uvicorn.Config, engine: GenerationEngine):
        super().__init__(config)
        self.engine = engine
        self.lifetime = Lifetime(self.stop_now)

    def stop_now(self) -> None:
        self.engine.shutdown()
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        self.lifetime.request_stop(f"signal {sig}")
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
