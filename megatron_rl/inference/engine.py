"""Generation engine: a Hugging Face Qwen3-MoE on CPU, batched, with routed-expert capture.

A background worker thread takes queued requests, runs them together (left padding,
attention mask, explicit position ids, a shared KV cache; rows leave the batch as they
finish) and resolves each request's future. Requests that arrive while a batch runs wait
for the next batch (static batching: no admission into a running batch); a batch forms
while requests keep arriving less than ``batch_wait_s`` apart, so the burst of a rollout
batch (one HTTP request after another) is served as one batch rather than cut at a fixed
deadline.

Rows with the same prompt share one prefill, whose KV cache, last logits, input logprobs
and prompt routes are copied to each of them -- what SGLang's prefix cache does for the G
samples of a group (it reports them as ``cached_tokens``, and its routes for a cached
prefix are those of the forward pass that filled the cache). Each row computes the same
values it would alone (prefill rows are independent), so sharing changes no result.

Routed experts come from forward hooks on the MoE gates (``inference.hf_model``), so they are
exactly the experts each block dispatched to. They cover the tokens fed
forward -- the prompt and every generated token but the last -- in SGLang's layout
``[prompt + response - 1, num_hidden_layers, top-k]`` int32, dense layers filled with 0.

Padding does not leak into real tokens: padded keys are masked, positions count real
tokens only, attention is eager and each token's expert computation is independent of the
other rows (tests compare batched with single generation: bit-identical in bf16). bf16
matrix products are rounded once from a wide accumulation, as on a GPU (``inference.bf16_gemm``).
Sampling follows SGLang (see
``inference.sampling``), with one generator per request.

Limits (SGLang's server arguments of the same names): at most ``max_running_requests``
sequences run together, a batch holds at most ``max_total_tokens`` tokens (prompt plus
``max_new_tokens`` of each row: what its KV cache can grow to) and prefills at most
``max_prefill_tokens`` distinct prompt tokens; at most ``max_queued_requests`` sequences
wait, further submissions are refused with :class:`QueueFull`. A sequence whose future is
aborted (the client went away) leaves its batch at the next step; :meth:`close` ends the
running batch at its next step.

A batch that fails inside the model or the sampler is run again one request at a time
(each row computes the same values alone, see above), so only the request that fails gets
the error.

Weight updates are queued like requests: the batch running (and requests queued before the
update) finish on the old weights, later ones use the new weights; each result carries the
``weight_version`` that produced it. Checkpoints are loaded and checked off the worker
thread, and a checkpoint that does not fit is refused before anything changes.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, Qwen3MoeConfig

from megatron_rl.inference import bf16_gemm, fp8
from megatron_rl.inference.hf_model import (
    DTYPES,
    RouteCapture,
    WeightUpdateError,
    load_model,
    load_tokenizer,
)
from megatron_rl.inference.sampling import effective_params, sample_next, token_logprobs
from megatron_rl.weight_sync.hf_config import ModelShape

logger = logging.getLogger(__name__)

MAX_TOP_K = 2**31 - 1
"""Largest top_k taken (SGLang keeps top_k as int32); anything above the vocabulary is off."""
SEED_RANGE = (-(2**63), 2**64)
"""Sampling seeds taken: int64 or uint64 (the generator takes the seed mod 2**64)."""


class EngineStopped(RuntimeError):
    """The engine was closed (or is shutting down): the request was not served."""


class QueueFull(RuntimeError):
    """The engine holds ``max_queued_requests`` waiting sequences; try again later (503)."""


class RequestFuture(Future):
    """A request's future; :meth:`abort` stops the request wherever it is."""

    aborted = False

    def abort(self) -> None:
        """Drop the request: cancelled while queued, or out of its batch at the next step."""
        self.aborted = True
        self.cancel()


@dataclass(kw_only=True)
class GenerationRequest:
    """One sequence to generate (SGLang's per-request fields, already normalised)."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    return_routed_experts: bool = False


@dataclass(kw_only=True)
class GenerationResult:
    rid: str
    output_ids: list[int]
    output_logprobs: list[float]
    """Logprob of each generated token (see ``inference.sampling`` for which distribution)."""
    input_logprobs: list[float | None] | None
    """Logprobs of prompt tokens from ``logprob_start_len`` (first one None), if asked."""
    routed_experts: torch.Tensor | None
    """``[prompt + response - 1, num_hidden_layers, topk]`` int32, dense layers 0."""
    finish_reason: dict
    weight_version: str
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens whose prefill this request shared with an earlier row of its batch."""
    latency_s: float


@dataclass
class _Row:
    """A request's progress inside a running batch."""

    request: GenerationRequest
    future: RequestFuture
    seed: int
    temperature: float
    top_k: int
    submitted: float
    generator: torch.Generator = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routes: list[torch.Tensor] = field(default_factory=list)  # [tokens, moe_layers, k] pieces
    finish_reason: dict | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the state before generation (to run the row again alone)."""
        self.generator = torch.Generator().manual_seed(self.seed % 2**64)  # any int, as SGLang
        self.output_ids, self.logprobs, self.routes, self.finish_reason = [], [], [], None

    @property
    def tokens(self) -> int:
        """What the row's KV cache can grow to: prompt plus every token it may generate."""
        return len(self.request.input_ids) + self.request.max_new_tokens


@dataclass
class _WeightSwap:
    state_dict: dict[str, torch.Tensor]
    weight_version: str
    model_path: str
    future: Future


class GenerationEngine:
    """Serves one Hugging Face Qwen3-MoE checkpoint directory."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        dtype: str = "bf16",
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        batch_max_wait_s: float = 0.1,
        context_length: int | None = None,
        max_total_tokens: int | None = None,
        max_prefill_tokens: int = 16384,
        max_queued_requests: int = 4096,
        weight_version: str = "default",
        original_logprobs: bool = False,
        seed: int | None = None,
        load_tokenizer_files: bool = True,
        quantization: str | None = None,
    ):
        """``max_batch_size`` is SGLang's ``--max-running-requests``; ``max_total_tokens``
        defaults to ``max_batch_size`` full contexts; ``load_tokenizer_files=False`` is
        ``--skip-tokenizer-init`` (input_ids only); ``quantization`` is SGLang's
        ``--quantization`` (``fp8``, ``w8a8_fp8``: FP8 weights, see ``inference.fp8``)."""
        limits = {"max_batch_size": max_batch_size, "max_prefill_tokens": max_prefill_tokens,
                  "max_queued_requests": max_queued_requests}  # fmt: skip
        for name, value in limits.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if quantization is not None and quantization not in fp8.SCHEMES:
            raise ValueError(f"quantization {quantization!r} is not one of {sorted(fp8.SCHEMES)}")
        self.dtype = DTYPES[dtype]
        self.quantization = quantization
        self.model_path = str(model_dir)
        self.model = load_model(self.model_path, self.dtype)
        if quantization is not None:
            # From here on every load quantizes (the FP8 modules' load_state_dict).
            fp8.quantize_model(self.model, fp8.SCHEMES[quantization])
        self.config: Qwen3MoeConfig = self.model.config
        self.shape = ModelShape.from_hf_config(self.config)
        self.context_length = context_length or self.config.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.max_total_tokens = max_total_tokens or max_batch_size * self.context_length
        # SGLang: the prefill bound is at least the context length (a full prompt fits).
        self.max_prefill_tokens = max(max_prefill_tokens, self.context_length)
        self.max_queued_requests = max_queued_requests
        self.batch_wait_s = batch_wait_s
        self.batch_max_wait_s = max(batch_max_wait_s, batch_wait_s)
        self.weight_version = weight_version
        self.original_logprobs = original_logprobs
        eos = self.config.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_token_id = self.config.pad_token_id or 0
        self.tokenizer_path = self.model_path
        self.tokenizer = load_tokenizer(self.model_path) if load_tokenizer_files else None
        self._capture = RouteCapture(self.model)
        # bf16 products rounded once from a wide accumulation, as on a GPU, without
        # oneDNN's per-shape bf16 kernels; entered on the worker thread only (inference.bf16_gemm).
        self._products = (bf16_gemm.scope(self.model) if self.dtype == torch.bfloat16
                          else None)
        self._seeds = random.Random(seed)
        self._queue: collections.deque = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._update_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._worker.start()

    # ---- public API -------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError (naming the request) for anything the engine cannot serve."""
        where = f"request {request.rid!r}"
        n = len(request.input_ids)
        if n == 0:
            raise ValueError(f"{where}: input_ids is empty")
        bad = [t for t in request.input_ids if not 0 <= t < self.shape.vocab_size]
        if bad:
            raise ValueError(
                f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {self.shape.vocab_size})"
            )
        if request.max_new_tokens < 0:
            raise ValueError(f"{where}: max_new_tokens must be >= 0, got {request.max_new_tokens}")
        if n + request.max_new_tokens > self.context_length:
            raise ValueError(
                f"{where}: prompt of {n} tokens + max_new_tokens {request.max_new_tokens} exceeds "
                f"the context length {self.context_length}"
            )
        if n + request.max_new_tokens > self.max_total_tokens:
            raise ValueError(
                f"{where}: prompt of {n} tokens + max_new_tokens {request.max_new_tokens} exceeds "
                f"max_total_tokens {self.max_total_tokens}"
            )
        # Every float is bounded on both sides and finite: a NaN would pass comparisons
        # the wrong way and turn the whole batch's sampling into garbage.
        if not (math.isfinite(request.temperature) and request.temperature >= 0):
            raise ValueError(
                f"{where}: temperature must be a finite number >= 0, got {request.temperature}"
            )
        if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
            raise ValueError(f"{where}: top_p must be in (0, 1], got {request.top_p}")
        if not (request.top_k == -1 or 1 <= request.top_k <= MAX_TOP_K):
            raise ValueError(
                f"{where}: top_k must be -1 (off) or in [1, {MAX_TOP_K}], got {request.top_k}"
            )
        seed = request.sampling_seed
        if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise ValueError(f"{where}: sampling_seed {seed} is outside [-2**63, 2**64)")
        if not -1 <= request.logprob_start_len < max(n, 1):
            raise ValueError(
                f"{where}: logprob_start_len {request.logprob_start_len} is outside [-1, {n})"
            )
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.shape.vocab_size]
        if bad:
            raise ValueError(f"{where}: stop_token_ids {bad} are outside the vocabulary")

    def submit(self, request: GenerationRequest) -> RequestFuture:
        """Queue a request; the future resolves to a :class:`GenerationResult`."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestFuture]:
        """Queue all the requests or none: ValueError if one is invalid, :class:`QueueFull`
        if they do not fit the queue (RuntimeError once closed)."""
        for request in requests:
            self.validate(request)
        if len(requests) > self.max_queued_requests:
            raise ValueError(
                f"{len(requests)} sequences in one request exceed max_queued_requests "
                f"{self.max_queued_requests}"
            )
        rows = []
        for request in requests:
            seed = request.sampling_seed
            if seed is None:
                seed = self._seeds.getrandbits(63)
            temperature, top_k = effective_params(request.temperature, request.top_k)
            top_k = -1 if top_k >= self.shape.vocab_size else top_k
            rows.append(
                _Row(request, RequestFuture(), seed, temperature, top_k, time.perf_counter())
            )
        with self._cond:
            if self._closed:
                raise EngineStopped("generation engine closed")
            if self._queued_rows + len(rows) > self.max_queued_requests:
                raise QueueFull(
                    f"the request queue is full ({self._queued_rows} sequences waiting, "
                    f"max_queued_requests {self.max_queued_requests}); retry later"
                )
            self._queue.extend(rows)
            self._queued_rows += len(rows)
            self._cond.notify_all()
        return [row.future for row in rows]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Submit all and wait (convenience for tests, benchmarks and scripts)."""
        futures = self.submit_all(requests)
        return [f.result() for f in futures]

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> str:
        """Replace the weights with the checkpoint in ``model_path``; return the new version.

        Blocks until the swap happened (after the requests queued before it). Raises
        :class:`WeightUpdateError` -- and keeps serving the old weights -- if the path is
        missing or holds a model of another shape."""
        with self._update_lock:
            new_model = load_model(model_path, self.dtype, reference=self.config)
            version = weight_version if weight_version is not None else self.weight_version
            state = new_model.state_dict()
            self._check_quantizable(state, model_path)
            swap = _WeightSwap(state, str(version), str(model_path), Future())
            del new_model
            self._enqueue(swap)
            swap.future.result()
            return self.weight_version

    def update_weights_from_tensors(
        self, tensors: dict[str, torch.Tensor], weight_version: str | None = None
    ) -> str:
        """Replace the named parameters (state-dict names and shapes, checked by the caller)
        the way :meth:`update_weights_from_disk` does: between batches, all at once."""
        with self._update_lock:
            version = weight_version if weight_version is not None else self.weight_version
            self._check_quantizable(tensors, "the received tensors")
            state = {**self.model.state_dict(), **tensors}
            swap = _WeightSwap(state, str(version), self.model_path, Future())
            self._enqueue(swap)
            swap.future.result()
            return self.weight_version

    def shutdown(self) -> None:
        """Refuse new work and end the running batch at its next step (does not wait);
        everything unfinished fails with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        self.shutdown()
        self._worker.join(timeout=timeout_s)
        with self._cond:
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    item.future.set_exception(EngineStopped("generation engine closed"))
            self._queued_rows = 0

    # ---- loading ----------------------------------------------------------------------

    def _check_quantizable(self, state: dict[str, torch.Tensor], source: str) -> None:
        """FP8: refuse non-finite weights before anything changes (WeightUpdateError)."""
        if self.quantization is not None:
            try:
                fp8.check_weights(self.model, state)
            except ValueError as exc:
                raise WeightUpdateError(f"{source}: {exc}") from None

    # ---- worker -----------------------------------------------------------------------

    def _enqueue(self, item: _WeightSwap) -> None:
        with self._cond:
            if self._closed:
                raise EngineStopped("generation engine closed")
            self._queue.append(item)
            self._cond.notify_all()

    def _next_work(self) -> list[_Row] | _WeightSwap | None:
        """The next weight swap, or the next batch of requests (waiting briefly for more)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if isinstance(self._queue[0], _WeightSwap):
                return self._queue.popleft()
            # Concurrent HTTP requests arrive a few ms apart: keep the batch open while they
            # keep coming (each arrival within batch_wait_s of the last), up to the cap.
            start = time.monotonic()
            seen, deadline = len(self._queue), start + self.batch_wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                if any(isinstance(i, _WeightSwap) for i in self._queue):
                    break
                now = time.monotonic()
                if len(self._queue) > seen:
                    seen = len(self._queue)
                    deadline = min(now + self.batch_wait_s, start + self.batch_max_wait_s)
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            batch: list[_Row] = []
            tokens, prompts = 0, {}
            while self._queue and len(batch) < self.max_batch_size:
                row = self._queue[0]
                if isinstance(row, _WeightSwap):
                    break
                prompt = tuple(row.request.input_ids)
                fill = 0 if prompt in prompts else len(prompt)
                over = (tokens + row.tokens > self.max_total_tokens
                        or sum(prompts.values()) + fill > self.max_prefill_tokens)  # fmt: skip
                if batch and over:
                    break
                batch.append(self._queue.popleft())
                tokens += row.tokens
                prompts[prompt] = len(prompt)
            self._queued_rows -= len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            if isinstance(work, _WeightSwap):
                self._apply_swap(work)
                continue
            rows = [r for r in work if r.future.set_running_or_notify_cancel()]
            if rows:
                self._run_isolated(rows)

    def _run_isolated(self, rows: list[_Row]) -> None:
        """Run a batch; if it fails, run its rows one at a time so that only the request
        that fails gets the error (a failed batch never takes the server down)."""
        try:
            self._run_batch(rows)
            return
        except Exception as exc:
            if len(rows) == 1 or self._closed:
                logger.exception("generation of %d requests failed", len(rows))
                for row in rows:
                    if not row.future.done():
                        row.future.set_exception(exc)
                return
            logger.warning("a batch of %d requests failed (%r); running them one at a time",
                           len(rows), exc)  # fmt: skip
        for row in rows:
            if row.future.done():
                continue
            row.reset()
            self._run_isolated([row])

    def _apply_swap(self, swap: _WeightSwap) -> None:
        try:
            self.model.load_state_dict(swap.state_dict, strict=True)
            self.weight_version = swap.weight_version
            self.model_path = swap.model_path
            logger.info(
                "weights updated from %s (version %s)", swap.model_path, swap.weight_version
            )
            swap.future.set_result(None)
        except Exception as exc:
            swap.future.set_exception(exc)

    # ---- generation -------------------------------------------------------------------

    @torch.inference_mode()
    def _run_batch(self, rows: list[_Row]) -> None:
        # One prefill row per distinct prompt; owner[b] is row b's prefill row.
        first: dict[tuple[int, ...], int] = {}
        owner = [first.setdefault(tuple(r.request.input_ids), len(first)) for r in rows]
        prompts = list(first)
        lengths = [len(r.request.input_ids) for r in rows]
        batch, unique, width = len(rows), len(prompts), max(lengths)
        ids = torch.full((unique, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((unique, width), dtype=torch.long)
        for u, prompt in enumerate(prompts):
            ids[u, width - len(prompt) :] = torch.tensor(prompt)
            mask[u, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        capture = any(r.request.return_routed_experts for r in rows)
        full_logits = any(
            r.request.return_logprob and r.request.logprob_start_len >= 0 for r in rows
        )

        cache = DynamicCache(config=self.config)
        self._capture.record(capture)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if full_logits else 1,
        )
        routes = self._capture.take(unique * width)
        input_logprobs = [None] * batch
        for b, row in enumerate(rows):
            u, start = owner[b], width - lengths[b]
            if routes is not None:
                row.routes.append(routes.view(unique, width, *routes.shape[1:])[u, start:])
            if full_logits and row.request.return_logprob and row.request.logprob_start_len >= 0:
                input_logprobs[b] = self._input_logprobs(row, out.logits[u, start:], ids[u, start:])
        # The first row of each prompt filled the prefill; the others reused it.
        filled: set[int] = set()
        cached = []
        for b, u in enumerate(owner):
            cached.append(lengths[b] if u in filled else 0)
            filled.add(u)
        logits = out.logits[:, -1]
        if unique < batch:
            index = torch.tensor(owner)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]

        active = list(range(batch))
        next_position = torch.tensor(lengths)
        while True:
            if self._closed:
                raise EngineStopped("generation engine shutting down")
            tokens = self._sample(rows, active, logits)
            still = []
            for j, b in enumerate(active):
                if rows[b].future.aborted:
                    rows[b].finish_reason = {"type": "abort", "message": "request aborted"}
                elif not self._advance(rows[b], int(tokens[0][j]), float(tokens[1][j])):
                    still.append(j)
            if not still:
                break
            keep = torch.tensor(still)
            if len(still) < len(active):
                cache.batch_select_indices(keep)
                mask = mask[keep]
            active = [active[j] for j in still]
            feed = tokens[0][keep][:, None]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
            self._capture.record(capture)
            out = self.model(
                input_ids=feed,
                attention_mask=mask,
                position_ids=next_position[active][:, None],
                past_key_values=cache,
                use_cache=True,
            )
            next_position[active] += 1
            step_routes = self._capture.take(len(active))
            if step_routes is not None:
                for j, b in enumerate(active):
                    rows[b].routes.append(step_routes[j : j + 1])
            logits = out.logits[:, -1]

        for b, row in enumerate(rows):
            row.future.set_result(self._result(row, lengths[b], cached[b], input_logprobs[b]))

    def _sample(self, rows: list[_Row], active: list[int], logits: torch.Tensor):
        picked = [rows[b] for b in active]
        return sample_next(
            logits,
            temperatures=torch.tensor([r.temperature for r in picked]),
            top_ks=torch.tensor([r.top_k for r in picked], dtype=torch.long),
            top_ps=torch.tensor([r.request.top_p for r in picked]),
            uniforms=torch.cat([torch.rand(1, generator=r.generator) for r in picked]),
            original_logprobs=self.original_logprobs,
        )

    def _advance(self, row: _Row, token: int, logprob: float) -> bool:
        """Record a sampled token; True when the row is finished."""
        request = row.request
        if request.max_new_tokens == 0:
            row.finish_reason = {"type": "length", "length": 0}
            return True
        row.output_ids.append(token)
        row.logprobs.append(logprob)
        if token in request.stop_token_ids or (
            not request.ignore_eos and token in self.eos_token_ids
        ):
            row.finish_reason = {"type": "stop", "matched": token}
        elif len(row.output_ids) >= request.max_new_tokens:
            row.finish_reason = {"type": "length", "length": request.max_new_tokens}
        return row.finish_reason is not None

    def _input_logprobs(self, row: _Row, logits: torch.Tensor, ids: torch.Tensor) -> list:
        temperature = 1.0 if self.original_logprobs else row.temperature
        values = token_logprobs(logits[:-1], ids[1:], temperature).tolist()
        start = row.request.logprob_start_len
        return ([None] + values)[start:]

    def _result(
        self, row: _Row, prompt_len: int, cached_tokens: int, input_logprobs
    ) -> GenerationResult:
        routed = None
        if row.request.return_routed_experts:
            fed = prompt_len + len(row.output_ids) - 1
            moe = torch.cat(row.routes, dim=0)[:fed].to(torch.int32)
            routed = torch.zeros(
                (fed, self.shape.num_hidden_layers, self.shape.num_experts_per_tok),
                dtype=torch.int32,
            )
            routed[:, list(self.shape.moe_layers)] = moe
        return GenerationResult(
            rid=row.request.rid,
            output_ids=row.output_ids,
            output_logprobs=row.logprobs,
            input_logprobs=input_logprobs,
            routed_experts=routed,
            finish_reason=row.finish_reason or {"type": "abort", "message": "unfinished"},
            weight_version=self.weight_version,
            prompt_tokens=prompt_len,
            cached_tokens=cached_tokens,
            latency_s=time.perf_counter() - row.submitted,
        )
