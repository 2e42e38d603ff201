"""Embedded SGLang-compatible rollout server (FastAPI + uvicorn, CPU).

    python -m megatron_rl.inference.server --model DIR --port P [--host 127.0.0.1]
        [--api-key K] [--dtype bf16|fp32] [--max-batch-size 32] [--threads 1]

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

Bad requests get a 4xx JSON error ``{"error": {"message": ...}}`` (SGLang's shape), never a
crash. With ``--api-key`` every endpoint requires ``Authorization: Bearer <key>``.

From Python, :func:`start_server_process` (re-exported from ``inference.launcher``) starts it
as a subprocess and returns a handle with ``.url`` and ``.stop()`` once ``/health`` answers;
:func:`create_app` serves an in-process :class:`GenerationEngine` with any ASGI server.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from megatron_rl import __version__
from megatron_rl.inference.engine import GenerationEngine, GenerationRequest, GenerationResult
from megatron_rl.inference.hf_model import WeightUpdateError
from megatron_rl.inference.launcher import ServerHandle, start_server_process  # noqa: F401
from megatron_rl.rollout.protocol import encode_routed_experts

logger = logging.getLogger(__name__)


class SamplingParamsIn(BaseModel):
    """SGLang's sampling parameters; unknown names are refused, unsupported values too."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

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
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
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
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


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
        if p.n < 1:
            raise BadRequest(f"request {rid!r}: n must be >= 1, got {p.n}")
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


def create_app(engine: GenerationEngine, *, api_key: str | None = None) -> FastAPI:
    """The HTTP API over ``engine`` (the caller owns the engine and closes it)."""
    app = FastAPI(title="megatron_rl embedded rollout server", version=__version__)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return _error(400, "invalid request: " + "; ".join(problems[:8]))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(400, str(exc))

    @app.post("/generate")
    async def generate(body: GenerateIn):
        requests, as_list = _expand(body, engine)
        try:
            futures = [asyncio.wrap_future(engine.submit(r)) for r in requests]
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except RuntimeError as exc:
            return _error(503, str(exc))
        try:
            results = await asyncio.gather(*futures)
        except Exception as exc:
            logger.exception("generation failed")
            return _error(500, f"generation failed: {exc}")
        outputs = [_response(q, r, engine) for q, r in zip(requests, results, strict=True)]
        return outputs if as_list else outputs[0]

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
            "context_length": engine.context_length,
            "max_running_requests": engine.max_batch_size,
            "enable_return_routed_experts": True,
            "api_key_required": api_key is not None,
            "weight_version": engine.weight_version,
            "return_original_logprob": engine.original_logprobs,
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

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--seed", type=int, default=None, help="seed for requests without one")
    parser.add_argument(
        "--return-original-logprob",
        action="store_true",
        help="report logprobs at temperature 1 (SGLANG_RETURN_ORIGINAL_LOGPROB=1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 suits small models beside a trainer on few cores)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    import torch
    import uvicorn
    from transformers.utils import logging as hf_logging

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    engine = GenerationEngine(
        args.model,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        context_length=args.context_length,
        weight_version=args.weight_version,
        original_logprobs=args.return_original_logprob,
        seed=args.seed,
    )
    try:
        uvicorn.run(
            create_app(engine, api_key=args.api_key),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
        )
    finally:
        engine.close()


if __name__ == "__main__":
    main()
