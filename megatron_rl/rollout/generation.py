"""Generating one rollout batch on the servers: request ids, seeds, grouping, concurrency,
retries and failover.

- every sample has a stable id ``{batch_id}/p{prompt}/s{sample}`` and a ``sampling_seed``
  derived from it, and results are keyed by that id: a sample is recorded exactly once.
  Each attempt of a request goes with a fresh SGLang ``rid`` (``<id>#retry<n>``): SGLang
  refuses a rid that is still registered (HTTP 400 "Duplicate request ID"), as the first
  attempt is after a client-side timeout. A retry keeps the sample's seed, so on the
  embedded server (and on SGLang with ``--enable-deterministic-inference``) it samples
  the same tokens with the same weights; SGLang otherwise ignores ``sampling_seed``;
- the samples of one prompt go as one batched ``/generate`` (``group_requests``; else one
  request per sample; always one per sample through a router); at most ``concurrency``
  samples are in flight, and each request goes to the live server with the fewest samples
  in flight (a retry avoids the server that just failed it). A request succeeds or is
  retried as a whole;
- a connection error makes the server *suspect* (see ``server_pool``): it is probed, and
  either comes back or is declared down, and its requests go again elsewhere;
- timeouts, 5xx answers and aborted requests are retried up to ``retries`` times with
  backoff; 4xx answers and malformed responses fail the batch with the request and server
  named (they are configuration errors that retrying would hide);
- once the servers were given a weight version, every sample must carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.protocol import (
    GenerateResponse,
    RolloutAbortedError,
    RolloutProtocolError,
    RolloutServerError,
    build_batch_request,
    build_generate_request,
    decode_generate_response,
)
from megatron_rl.rollout.server_pool import ServerPool, ServerState
from megatron_rl.rollout.servers import RolloutServers
from megatron_rl.rollout.transport import HttpTransport
from megatron_rl.rollout.types import RolloutRequest, RolloutSample
from megatron_rl.weight_sync.hf_config import ModelShape

logger = logging.getLogger(__name__)

Group = list[tuple[RolloutRequest, str]]
"""The requests of one /generate call, each with its sample id."""


def sample_seed(base_seed: int, rid: str) -> int:
    """A 63-bit sampling seed that depends only on the base seed and the request id."""
    digest = hashlib.blake2b(f"{base_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Retry(Exception):
    """An attempt failed in a way a retry may fix; ``error`` says how."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class BatchGenerator:
    """Generates rollout batches on ``servers`` as ``config`` says."""

    def __init__(
        self,
        config: RolloutConfig,
        shape: ModelShape,
        servers: RolloutServers,
        transport: HttpTransport,
        *,
        return_routed_experts: bool,
    ):
        self.config, self.shape, self.servers, self.transport = config, shape, servers, transport
        self.sampling = config.sampling_params()
        self.return_routed_experts = return_routed_experts
        self.last_batch_stats: dict[str, Any] = {}
        self._retries = 0

    async def generate(
        self,
        requests: Sequence[RolloutRequest],
        batch_id: str,
        on_sample: Callable[[RolloutSample], None] | None = None,
    ) -> list[RolloutSample]:
        """Generate one response per request; samples come back in the requests' order.

        ``batch_id`` (e.g. ``"step12"``) makes request ids unique across batches and, with
        the config's seed, fixes each sample's sampling seed. ``on_sample`` is called with
        each sample as it arrives (on the event loop's thread)."""
        rids = [f"{batch_id}/p{r.prompt_index}/s{r.sample_index}" for r in requests]
        if len(set(rids)) != len(rids):
            raise ValueError(f"batch {batch_id}: two requests share a (prompt_index, sample_index)")
        started = time.perf_counter()
        groups = self._groups(requests, rids)
        config, servers = self.config, self.servers
        async with self.transport.pools(min(config.concurrency, len(groups))) as clients:
            http = clients[0]
            pool = ServerPool(
                http,
                [ServerState(u) for u in servers.urls],
                probes=config.retries,
                backoff=config.backoff_s,
                fail_on_down=config.on_server_failure == "fail",
                on_down=lambda s: servers.down.__setitem__(s.url, s.reason),
                on_back=lambda s: servers.ready_to_serve(http, s.url),
            )
            await servers.rejoin(http, pool.servers)
            self._retries = 0
            limit = _SampleLimit(config.concurrency)
            with _progress(config.progress, len(requests), batch_id) as advance:

                async def one(group: Group, client: httpx.AsyncClient) -> list[RolloutSample]:
                    async with limit.take(len(group)):
                        samples = await self._generate_group(pool, client, group)
                    for sample in samples:
                        advance()
                        if on_sample is not None:
                            on_sample(sample)
                    return samples

                tasks = [asyncio.create_task(one(group, clients[i % len(clients)]))
                         for i, group in enumerate(groups)]
                try:
                    results = [s for group in await _gather_or_cancel(tasks, pool) for s in group]
                finally:
                    pool.close()
        by_rid = {s.request_id: s for s in results}
        if sorted(by_rid) != sorted(rids):  # guards the no-loss/no-duplicate contract
            raise RuntimeError(f"batch {batch_id}: results do not match the requests one to one")
        self.last_batch_stats = {
            "samples": len(results),
            "retries": self._retries,
            "servers_down": sorted({s.url for s in pool.servers if s.down} | set(servers.down)),
            "seconds": time.perf_counter() - started,
            "response_tokens": sum(len(s.response_ids) for s in results),
        }
        return [by_rid[rid] for rid in rids]

    def _groups(self, requests: Sequence[RolloutRequest], rids: list[str]) -> list[Group]:
        """The /generate calls of a batch: the samples of each prompt index together (in
        request order), or one call per sample."""
        if not self.config.group_requests or self.servers.routers:
            # sglang-router 0.3.2 refuses a batched /generate with a list of rids or of
            # sampling params (HTTP 422), which per-sample seeds need.
            return [[(q, rid)] for q, rid in zip(requests, rids, strict=True)]
        groups: dict[int, Group] = {}
        for q, rid in zip(requests, rids, strict=True):
            groups.setdefault(q.prompt_index, []).append((q, rid))
        return list(groups.values())

    def _bodies(self, group: Group, attempt: int) -> list[dict]:
        """The /generate bodies of one attempt: a fresh SGLang rid per attempt (a timed-out
        attempt may still be registered on the server), the sample's own seed always."""
        return [
            build_generate_request(
                rid=rid if attempt == 0 else f"{rid}#retry{attempt}",
                input_ids=request.prompt_ids,
                sampling=self.sampling,
                sampling_seed=sample_seed(self.config.seed, rid),
                return_routed_experts=self.return_routed_experts,
            )
            for request, rid in group
        ]

    async def _generate_group(
        self, pool: ServerPool, http: httpx.AsyncClient, group: Group
    ) -> list[RolloutSample]:
        label = group[0][1] + (f" (and {len(group) - 1} more of its group)" if len(group) > 1 else "")
        retries = self.config.retries
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
                if failures > retries:
                    raise RolloutServerError(
                        f"gave up after {failures} attempts: {retry.error}"
                    ) from retry.error
                logger.warning("retrying (%d/%d): %s", failures, retries, retry.error)
                self._retries += 1
                await asyncio.sleep(self.config.backoff_s(failures - 1))
                continue
            except httpx.TransportError as exc:
                # Unreachable, or died mid-request: wait for the server or use another one.
                # Bounded in case /health answers while /generate keeps failing.
                unreachable += 1
                if unreachable > retries + len(self.servers.urls):
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
        version = self.servers.weight_version
        if version is not None and decoded.weight_version != version:
            raise RolloutProtocolError(
                f"generated with weight version {decoded.weight_version!r}, the servers were "
                f"updated to {version!r}",
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
            message = f"no answer within {self.transport.timeout_s} s ({type(exc).__name__})"
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
