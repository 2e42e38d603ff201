"""Async rollout client over one or more SGLang (or embedded) servers.

Topology: ``/generate`` goes to ``urls`` -- SGLang servers, over which the client spreads
requests itself, or one sglang-router; weight updates, cache flushes and health checks go
to ``worker_urls``, the servers themselves (sglang-router does not forward those calls;
default: ``urls``). :meth:`RolloutClient.connect` waits until every URL answers
``/health``, recognises a router by its ``/workers`` listing (and refuses one given
without its workers, naming what the router lists), and checks every server against the
trainer's model. Through a router each sample goes as its own ``/generate`` (the router
refuses batched requests with per-sample request ids and seeds).

Reliability model, per rollout batch:

- every sample has a stable id ``{batch_id}/p{prompt}/s{sample}`` and a ``sampling_seed``
  derived from it, and results are keyed by that id: a sample is recorded exactly once.
  Each attempt of a request goes with a fresh SGLang ``rid`` (``<id>#retry<n>``): SGLang
  refuses a rid that is still registered (HTTP 400 "Duplicate request ID"), as the first
  attempt is after a client-side timeout. A retry keeps the sample's seed, so on the
  embedded server (and on SGLang with ``--enable-deterministic-inference``) it samples
  the same tokens with the same weights; SGLang otherwise ignores ``sampling_seed``;
- the samples of one prompt go as one batched ``/generate`` (``group_requests``; else one
  request per sample); at most ``concurrency`` samples are in flight, and each request
  goes to the live server with the fewest samples in flight (a retry avoids the server
  that just failed it). A request succeeds or is retried as a whole;
- a connection error makes the server *suspect*: it gets no new requests while a probe
  calls ``/health`` up to ``retries`` times with exponential backoff. If it answers, it
  is back; if not, it is declared *down* -- logged by URL, listed in ``down_servers`` --
  and the batch continues on the other servers (``on_server_failure='continue'``), or
  fails at once (``'fail'``), or fails when no server is left. Requests it held are sent
  again (to another server, or to it once it is back);
- timeouts, 5xx answers and aborted requests are retried up to ``retries`` times with
  backoff; 4xx answers and malformed responses fail the batch with the request and server
  named (they are configuration errors that retrying would hide);
- a worker that a control call cannot reach is probed like a generation server; once
  declared down it is skipped by later control calls (``'continue'``) or fails the call
  (``'fail'``). Behind a router, the router's own health checks stop routing to it.

A server that comes back (a probe succeeds, or a later batch finds a down server healthy)
may have restarted from its initial checkpoint: if its weight version is not the one of the
last weight update, the client reloads that checkpoint on it before sending requests. Once
the client has updated the weights, every sample must carry that version.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from megatron_rl.model.config import ModelConfig
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.control import (
    call_each,
    health_all,
    reload_if_stale,
    router_workers,
    wait_ready,
)
from megatron_rl.rollout.protocol import (
    GenerateResponse,
    RolloutAbortedError,
    RolloutProtocolError,
    RolloutServerError,
    SamplingParams,
    build_batch_request,
    build_generate_request,
    decode_generate_response,
)
from megatron_rl.rollout.server_checks import check_server
from megatron_rl.rollout.server_pool import ServerPool, ServerState
from megatron_rl.rollout.types import RolloutSample
from megatron_rl.weight_sync.hf_config import ModelShape

REQUESTS_PER_POOL = 16
"""In-flight requests per httpx connection pool. httpcore scans every connection of its
pool for every queued request whenever a request starts or ends, so one pool with
hundreds of requests in flight costs the trainer's event loop time quadratic in the
concurrency (measured: 0.8 s of CPU per 128-request rollout batch); a batch is spread
over several small pools instead."""


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """httpx builds a new context (reading the CA bundle, ~30 ms) for every client."""
    return httpx.create_ssl_context()


logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BACKOFF_S = 30.0


@dataclass(kw_only=True)
class RolloutRequest:
    """One response to generate: which prompt, which sample of its group, the prompt ids."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


def sample_seed(base_seed: int, rid: str) -> int:
    """A 63-bit sampling seed that depends only on the base seed and the request id."""
    digest = hashlib.blake2b(f"{base_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code (also inside a running loop)."""
    box: list[T] = []

    async def main() -> None:
        # The main task returns nothing: on the way out, asyncio.run's SIGINT bookkeeping
        # (signal.getsignal on Python 3.11) formats the repr of the task -- result
        # included -- and a rollout batch's samples with their tensors took ~0.1 s of
        # CPU to print.
        box.append(await coro)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(main())
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, main()).result()
    return box[0]


class _Retry(Exception):
    """An attempt failed in a way a retry may fix; ``error`` says how."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class RolloutClient:
    """Generates rollout batches on SGLang-compatible servers; weight-sync control calls.

    Async methods start with ``a``; each has a synchronous twin for the training loop."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_config: ModelConfig,
        sampling: SamplingParams | None = None,
        api_key: str | None = None,
        seed: int = 1234,
        concurrency: int = 64,
        group_requests: bool = True,
        timeout_s: float = 600.0,
        retries: int = 5,
        retry_backoff_s: float = 1.0,
        on_server_failure: str = "continue",
        return_routed_experts: bool = False,
        progress: bool = False,
        worker_urls: Sequence[str] | None = None,
        startup_timeout_s: float = 180.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """``urls`` get ``/generate``; ``worker_urls`` (default: ``urls``) the control
        calls. ``transport`` replaces httpx's network transport (tests use
        httpx.MockTransport)."""
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        if on_server_failure not in ("continue", "fail"):
            raise ValueError(
                f"on_server_failure must be 'continue' or 'fail', got {on_server_failure!r}"
            )
        self.urls = [u.rstrip("/") for u in urls]
        self._given_workers = [u.rstrip("/") for u in worker_urls or ()]
        self.worker_urls = self._given_workers or list(self.urls)
        """Servers that get weight updates, cache flushes and health checks."""
        self.routers: list[str] = []
        """Those of ``urls`` that are sglang-routers (found by :meth:`connect`)."""
        self.startup_timeout_s = startup_timeout_s
        self.model_config = model_config
        self.shape = ModelShape.from_model_config(model_config)
        self.sampling = sampling or SamplingParams()
        self.api_key, self.seed = api_key, seed
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.group_requests = group_requests
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.on_server_failure = on_server_failure
        self.return_routed_experts, self.progress = return_routed_experts, progress
        self.transport = transport
        self.down_servers: dict[str, str] = {}
        """URL -> reason, for servers declared down (cleared when one rejoins)."""
        self._weight_version: str | None = None
        self._weights_path: str | None = None
        self.last_batch_stats: dict[str, Any] = {}

    @property
    def weight_version(self) -> str | None:
        """Version of the weights the servers were last given; once set, every sample must
        carry it. Set by :meth:`update_weights_from_disk` or :meth:`note_weights`."""
        return self._weight_version

    @weight_version.setter
    def weight_version(self, version: str | None) -> None:
        if version is not None and str(version) == self._weight_version:
            return  # already recorded, keep the checkpoint path that came with it
        # Weights synced by other means (e.g. NCCL broadcast): no checkpoint to reload.
        self.note_weights(version, None)

    def note_weights(self, weight_version: str | None, model_path: str | None = None) -> None:
        """Record weights the servers received through another client, process or channel.

        ``model_path`` (a checkpoint directory the servers can read) lets the client reload
        those weights on a server that restarts; without it such a server is kept out."""
        self._weight_version = None if weight_version is None else str(weight_version)
        self._weights_path = None if model_path is None else str(model_path)

    @classmethod
    def from_config(
        cls,
        config: RolloutConfig,
        model_config: ModelConfig,
        *,
        urls: Sequence[str] | None = None,
        return_routed_experts: bool = False,
    ) -> RolloutClient:
        """Client for ``config`` (``urls`` overrides ``config.urls``, e.g. embedded servers)."""
        return cls(
            urls if urls is not None else config.urls,
            model_config=model_config,
            sampling=config.sampling_params(),
            api_key=config.api_key,
            seed=config.seed,
            concurrency=config.concurrency,
            group_requests=config.group_requests,
            timeout_s=config.generate_timeout_s,
            retries=config.retries,
            retry_backoff_s=config.retry_backoff_s,
            on_server_failure=config.on_server_failure,
            return_routed_experts=return_routed_experts,
            progress=config.progress,
            worker_urls=config.worker_urls,
            startup_timeout_s=config.startup_timeout_s,
        )

    def backoff(self, attempt: int) -> float:
        return min(self.retry_backoff_s * 2**attempt, MAX_BACKOFF_S)

    def _http(self, in_flight: int | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        in_flight = self.concurrency if in_flight is None else in_flight
        limits = httpx.Limits(
            max_connections=in_flight + 2 * len(set(self.urls) | set(self.worker_urls))
        )
        # A dead host should not hold a request for the whole generation timeout.
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        return httpx.AsyncClient(
            headers=headers, timeout=timeout, limits=limits, transport=self.transport,
            verify=_ssl_context(),
        )

    # ---- generation -------------------------------------------------------------------

    def generate_batch(
        self,
        requests: Sequence[RolloutRequest],
        batch_id: str,
        on_sample: Callable[[RolloutSample], None] | None = None,
    ) -> list[RolloutSample]:
        """Synchronous :meth:`agenerate`."""
        return run_sync(self.agenerate(requests, batch_id, on_sample))

    async def agenerate(
        self,
        requests: Sequence[RolloutRequest],
        batch_id: str,
        on_sample: Callable[[RolloutSample], None] | None = None,
    ) -> list[RolloutSample]:
        """Generate one response per request; samples come back in the requests' order.

        ``batch_id`` (e.g. ``"step12"``) makes request ids unique across batches and, with
        the client's seed, fixes each sample's sampling seed. ``on_sample`` is called with
        each sample as it arrives (on the event loop's thread)."""
        rids = [f"{batch_id}/p{r.prompt_index}/s{r.sample_index}" for r in requests]
        if len(set(rids)) != len(rids):
            raise ValueError(f"batch {batch_id}: two requests share a (prompt_index, sample_index)")
        started = time.perf_counter()
        groups = self._groups(requests, rids)
        calls = min(self.concurrency, len(groups))  # most /generate calls in flight
        shards = max(1, math.ceil(calls / REQUESTS_PER_POOL))
        # Calls go round-robin to the pools; slack keeps a pool that momentarily holds
        # more than its share from queueing a call for a connection.
        per_pool = 2 * math.ceil(calls / shards)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self._http(per_pool))
                       for _ in range(shards)]
            http = clients[0]
            pool = ServerPool(
                http,
                [ServerState(u) for u in self.urls],
                probes=self.retries,
                backoff=self.backoff,
                fail_on_down=self.on_server_failure == "fail",
                on_down=lambda s: self.down_servers.__setitem__(s.url, s.reason),
                on_back=lambda s: reload_if_stale(
                    http, s.url, self.weight_version, self._weights_path
                ),
            )
            await self._rejoin_down_servers(http, pool)
            self._retries = 0
            limit = _SampleLimit(self.concurrency)
            with _progress(self.progress, len(requests), batch_id) as advance:

                async def one(group: list[tuple[RolloutRequest, str]],
                              client: httpx.AsyncClient) -> list[RolloutSample]:
                    async with limit.take(len(group)):
                        samples = await self._generate_group(pool, client, group)
                    for sample in samples:
                        advance()
                        if on_sample is not None:
                            on_sample(sample)
                    return samples

                tasks = [asyncio.create_task(one(group, clients[i % shards]))
                         for i, group in enumerate(groups)]
                try:
                    results = [s for group in await _gather_or_cancel(tasks, pool) for s in group]
                finally:
                    pool.close()
        by_rid = {s.request_id: s for s in results}
        if sorted(by_rid) != sorted(rids):  # guards the no-loss/no-duplicate contract
            raise RuntimeError(f"batch {batch_id}: results do not match the requests one to one")
        elapsed = time.perf_counter() - started
        self.last_batch_stats = {
            "samples": len(results),
            "retries": self._retries,
            "servers_down": sorted({s.url for s in pool.servers if s.down} | set(self.down_servers)),
            "seconds": elapsed,
            "response_tokens": sum(len(s.response_ids) for s in results),
        }
        return [by_rid[rid] for rid in rids]

    def _groups(
        self, requests: Sequence[RolloutRequest], rids: list[str]
    ) -> list[list[tuple[RolloutRequest, str]]]:
        """The /generate calls of a batch: the samples of each prompt index together (in
        request order), or one call per sample."""
        if not self.group_requests or self.routers:
            # sglang-router 0.3.2 refuses a batched /generate with a list of rids or of
            # sampling params (HTTP 422), which per-sample seeds need.
            return [[(q, rid)] for q, rid in zip(requests, rids, strict=True)]
        groups: dict[int, list[tuple[RolloutRequest, str]]] = {}
        for q, rid in zip(requests, rids, strict=True):
            groups.setdefault(q.prompt_index, []).append((q, rid))
        return list(groups.values())

    def _bodies(self, group: list[tuple[RolloutRequest, str]], attempt: int) -> list[dict]:
        """The /generate bodies of one attempt: a fresh SGLang rid per attempt (a timed-out
        attempt may still be registered on the server), the sample's own seed always."""
        return [
            build_generate_request(
                rid=rid if attempt == 0 else f"{rid}#retry{attempt}",
                input_ids=request.prompt_ids,
                sampling=self.sampling,
                sampling_seed=sample_seed(self.seed, rid),
                return_routed_experts=self.return_routed_experts,
            )
            for request, rid in group
        ]

    async def _generate_group(
        self, pool: ServerPool, http: httpx.AsyncClient, group: list[tuple[RolloutRequest, str]]
    ) -> list[RolloutSample]:
        label = group[0][1] + (f" (and {len(group) - 1} more of its group)" if len(group) > 1 else "")
        failures, unreachable, avoid = 0, 0, None
        while True:
            bodies = self._bodies(group, failures + unreachable)
            body = bodies[0] if len(bodies) == 1 else build_batch_request(bodies)
            server = await pool.pick(avoid)
            avoid = server  # a retry goes elsewhere if it can
            started = time.perf_counter()
            server.in_flight += len(group)
            try:
                decoded = await self._attempt(http, server.url, body, bodies, label)
            except _Retry as retry:
                failures += 1
                if failures > self.retries:
                    raise RolloutServerError(
                        f"gave up after {failures} attempts: {retry.error}"
                    ) from retry.error
                logger.warning("retrying (%d/%d): %s", failures, self.retries, retry.error)
                self._retries += 1
                await asyncio.sleep(self.backoff(failures - 1))
                continue
            except httpx.TransportError as exc:
                # Unreachable, or died mid-request: wait for the server or use another one.
                # Bounded in case /health answers while /generate keeps failing.
                unreachable += 1
                if unreachable > self.retries + len(self.urls):
                    raise RolloutServerError(
                        f"request {label!r}: gave up after {unreachable} connection failures, "
                        f"last on {server.url} ({type(exc).__name__}: {exc})"
                    ) from exc
                await pool.connection_failed(server, exc)
                self._retries += 1
                continue
            finally:
                server.in_flight -= len(group)
            latency = time.perf_counter() - started
            return [self._sample(request, rid, answer, server.url, latency)
                    for (request, rid), answer in zip(group, decoded, strict=True)]

    def _sample(self, request: RolloutRequest, rid: str, decoded: GenerateResponse,
                url: str, latency_s: float) -> RolloutSample:
        if self.weight_version is not None and decoded.weight_version != self.weight_version:
            raise RolloutProtocolError(
                f"generated with weight version {decoded.weight_version!r}, the servers were "
                f"updated to {self.weight_version!r}",
                rid=rid,
                server_url=url,
            )
        return RolloutSample(
            prompt_index=request.prompt_index,
            sample_index=request.sample_index,
            prompt_ids=list(request.prompt_ids),
            response_ids=decoded.output_ids,
            rollout_logprobs=decoded.logprobs,
            routes=decoded.routes,
            finish_reason=decoded.finish_reason,
            weight_version=decoded.weight_version,
            prompt_tokens=decoded.prompt_tokens,
            completion_tokens=decoded.completion_tokens,
            latency_s=latency_s,
            server_url=url,
            request_id=rid,
            metadata=dict(request.metadata),
        )

    async def _attempt(
        self, http: httpx.AsyncClient, url: str, body: dict, bodies: list[dict], label: str
    ) -> list[GenerateResponse]:
        """One ``/generate`` call (of ``bodies``, batched into ``body`` when several).
        Raises :class:`_Retry` for what a retry may fix (timeout, 5xx, abort),
        ``httpx.TransportError`` when the server is unreachable, and
        :class:`RolloutProtocolError` for refusals (4xx) and malformed responses."""
        try:
            response = await http.post(f"{url}/generate", json=body)
        except httpx.TimeoutException as exc:
            message = f"no answer within {self.timeout_s} s ({type(exc).__name__})"
            raise _Retry(RolloutProtocolError(message, rid=label, server_url=url)) from None
        status = response.status_code
        if status >= 500:
            message = f"HTTP {status}: {response.text[:300]}"
            raise _Retry(RolloutProtocolError(message, rid=label, server_url=url))
        if status >= 400:
            message = f"HTTP {status}: {response.text[:500]}"
            raise RolloutProtocolError(message, rid=label, server_url=url)
        try:
            # Parsing and decoding a long response takes tens of ms: keep the event loop
            # free for the other requests meanwhile.
            return await asyncio.to_thread(self._decode, response, bodies, url, label)
        except RolloutAbortedError as exc:
            raise _Retry(exc) from None

    def _decode(
        self, response: httpx.Response, bodies: list[dict], url: str, label: str
    ) -> list[GenerateResponse]:
        try:
            payload = response.json()
        except ValueError as exc:
            raise RolloutProtocolError(
                f"response is not JSON: {exc}", rid=label, server_url=url
            ) from None
        if len(bodies) == 1:
            return [decode_generate_response(payload, request=bodies[0], shape=self.shape,
                                             server_url=url)]
        if not isinstance(payload, list) or len(payload) != len(bodies):
            got = f"a list of {len(payload)}" if isinstance(payload, list) else type(payload).__name__
            raise RolloutProtocolError(
                f"a batched /generate of {len(bodies)} sequences was answered with {got}",
                rid=label, server_url=url,
            )
        return [decode_generate_response(answer, request=body, shape=self.shape, server_url=url)
                for answer, body in zip(payload, bodies, strict=True)]

    async def _rejoin_down_servers(self, http: httpx.AsyncClient, pool: ServerPool) -> None:
        """Down servers that answer again and serve (or reload) the current weights rejoin,
        generation servers and control-only workers alike."""
        workers = [ServerState(u) for u in self.down_servers if u not in self.urls]
        for server in [*pool.servers, *workers]:
            if server.url not in self.down_servers:
                continue
            try:
                healthy = (await http.get(f"{server.url}/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and await reload_if_stale(
                http, server.url, self.weight_version, self._weights_path
            ):
                logger.info("rollout server %s is reachable again and rejoins", server.url)
                del self.down_servers[server.url]
            else:
                server.down, server.reason = True, self.down_servers[server.url]

    # ---- start-up checks and control calls --------------------------------------------

    def connect(self, require_routed_experts: bool | None = None) -> dict[str, dict]:
        """Synchronous :meth:`aconnect`."""
        return run_sync(self.aconnect(require_routed_experts))

    async def aconnect(
        self, require_routed_experts: bool | None = None, model_config: ModelConfig | None = None
    ) -> dict[str, dict]:
        """Wait until every URL answers /health (up to ``startup_timeout_s``), find the
        routers among ``urls``, and check every server (see ``server_checks``): refuse a
        router given without its workers, servers whose model differs from the trainer's,
        and (r3) generation URLs that return no routed experts. Returns each checked URL's
        ``/model_info``."""
        shape = ModelShape.from_model_config(model_config or self.model_config)
        need_routes = (
            self.return_routed_experts if require_routed_experts is None else require_routed_experts
        )
        async with self._http() as http:
            await wait_ready(http, list(dict.fromkeys(self.urls + self._given_workers)),
                             self.startup_timeout_s)
            listings = await asyncio.gather(*(router_workers(http, u) for u in self.urls))
            routed = {u: w for u, w in zip(self.urls, listings, strict=True) if w is not None}
            self.routers = list(routed)
            if routed and not self._given_workers:
                lists = "; ".join(f"{u} routes to {' '.join(w) or 'no workers yet'}"
                                  for u, w in routed.items())
                raise RolloutServerError(
                    f"--rl-rollout-url {' '.join(routed)} is an sglang-router, which does not "
                    f"forward weight updates: add --rl-rollout-worker-urls with the SGLang "
                    f"servers behind it, as the trainer reaches them ({lists})"
                )
            self.worker_urls = self._given_workers or list(self.urls)
            for router, workers in routed.items():
                missing = sorted(set(workers) - set(self.worker_urls))
                if missing:
                    logger.warning(
                        "sglang-router %s routes to %s, which --rl-rollout-worker-urls does "
                        "not list: such a worker gets no weight updates, and its samples "
                        "will be refused as stale (unless the names differ only in how "
                        "the router and the trainer reach the same server)",
                        router, ", ".join(missing),
                    )  # fmt: skip
            checks = [
                check_server(http, u, shape, need_routes, temperature=self.sampling.temperature,
                             router=u in routed)
                for u in self.urls
            ] + [
                check_server(http, u, shape, False, temperature=self.sampling.temperature)
                for u in self.worker_urls if u not in self.urls
            ]
            checked = [u for u in self.urls] + [u for u in self.worker_urls if u not in self.urls]
            infos = await asyncio.gather(*checks, return_exceptions=True)
        errors = [str(e) for e in infos if isinstance(e, BaseException)]
        if errors:
            raise RolloutServerError("rollout server check failed:\n  " + "\n  ".join(errors))
        if routed:
            logger.info("rollout: /generate through sglang-router %s; control calls to %s",
                        ", ".join(routed), ", ".join(self.worker_urls))
        return dict(zip(checked, infos, strict=True))

    def check_servers(
        self, model_config: ModelConfig | None = None, require_routed_experts: bool | None = None
    ) -> dict[str, dict]:
        """:meth:`connect` with another model config to check against."""
        return run_sync(self.aconnect(require_routed_experts, model_config))

    def update_weights_from_disk(
        self, model_path: str, weight_version: str, flush_cache: bool = True
    ) -> None:
        run_sync(self.aupdate_weights_from_disk(model_path, weight_version, flush_cache))

    async def aupdate_weights_from_disk(
        self, model_path: str, weight_version: str, flush_cache: bool = True
    ) -> None:
        """``POST /update_weights_from_disk`` on every worker that is not down; all must succeed."""
        body = {
            "model_path": str(model_path),
            "weight_version": str(weight_version),
            "flush_cache": flush_cache,
        }
        await self._control(
            "POST", "/update_weights_from_disk", body, f"weight update to version {weight_version}"
        )
        self.note_weights(weight_version, model_path)

    def flush_cache(self) -> None:
        run_sync(self.aflush_cache())

    async def aflush_cache(self) -> None:
        await self._control("POST", "/flush_cache", None, "cache flush")

    def health(self) -> dict[str, bool]:
        return run_sync(self.ahealth())

    async def ahealth(self) -> dict[str, bool]:
        """URL -> whether ``/health`` answers 200, for every worker and generation URL."""
        async with self._http() as http:
            return await health_all(http, list(dict.fromkeys(self.urls + self.worker_urls)))

    async def _control(self, method: str, path: str, body: dict | None, what: str) -> None:
        """``method path`` on every worker not down. A worker that cannot be reached is
        probed (``retries`` health checks with backoff) and, if it stays away, declared
        down: under 'continue' the call stands on the others, under 'fail' it fails."""
        targets = [u for u in self.worker_urls if u not in self.down_servers]
        for url in self.worker_urls:
            if url in self.down_servers:
                logger.warning("%s skips %s, which is down (%s)", what, url, self.down_servers[url])
        if not targets:
            raise RolloutServerError(f"{what}: every rollout server is down: {self.down_servers}")
        async with self._http() as http:
            outcomes = await call_each(http, targets, method, path, body)
            unreachable = [u for u, why in outcomes.items() if why and why[1]]
            if unreachable:
                back = await asyncio.gather(*(self._probe(http, u) for u in unreachable))
                retry = [u for u, ok in zip(unreachable, back, strict=True) if ok]
                outcomes.update(await call_each(http, retry, method, path, body))
                for url, ok in zip(unreachable, back, strict=True):
                    if not ok:
                        self._declare_down(url, outcomes[url][0], what)
        failed = {u: why for u, why in outcomes.items()
                  if why and not (why[1] and u in self.down_servers
                                  and self.on_server_failure == "continue")}
        if failed or all(outcomes.values()):
            ok = [u for u, why in outcomes.items() if not why]
            problems = failed or {u: why for u, why in outcomes.items() if why}
            raise RolloutServerError(
                f"{what} failed on: {'; '.join(f'{u} ({why[0]})' for u, why in problems.items())}"
                f"; succeeded on: {ok or 'none'}"
            )

    async def _probe(self, http: httpx.AsyncClient, url: str) -> bool:
        """Whether ``url`` answers /health within ``retries`` probes with backoff."""
        for attempt in range(max(self.retries, 1)):
            await asyncio.sleep(self.backoff(attempt))
            try:
                if (await http.get(f"{url}/health", timeout=5.0)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        return False

    def _declare_down(self, url: str, reason: str, what: str) -> None:
        self.down_servers[url] = reason
        logger.error("rollout server %s is down (%s during %s)%s", url, reason, what,
                     "" if self.on_server_failure == "continue" else "; failing the run")


class _SampleLimit:
    """At most ``capacity`` samples in flight; a call takes all of its samples at once (a
    group larger than the capacity takes the whole capacity), so calls never hold part of
    what they need while waiting for the rest."""

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, samples: int):
        need = min(samples, self.capacity)
        async with self.changed:
            await self.changed.wait_for(lambda: self.free >= need)
            self.free -= need
        try:
            yield
        finally:
            async with self.changed:
                self.free += need
                self.changed.notify_all()


async def _gather_or_cancel(tasks: list[asyncio.Task], pool: ServerPool) -> list:
    """Results of all tasks; on the first failure (or the pool's ``failed`` event) cancel
    the rest and raise."""
    abort = asyncio.create_task(pool.failed.wait())
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(
                pending | {abort}, return_when=asyncio.FIRST_COMPLETED
            )
            if abort in done:
                raise pool.error
            pending.discard(abort)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
    finally:
        abort.cancel()
        for task in pending:
            task.cancel()
        # Collect every outcome, so no failed task is left unretrieved (asyncio would log
        # it when the task is garbage-collected).
        await asyncio.gather(abort, *tasks, return_exceptions=True)
    return [t.result() for t in tasks]


class _progress:
    """A rich progress bar for one batch (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, batch_id: str):
        self.enabled, self.total, self.batch_id = enabled, total, batch_id

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("rollout {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            transient=True,
        )  # fmt: skip
        self.bar.start()
        task = self.bar.add_task(self.batch_id, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
