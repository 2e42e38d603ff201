"""The rollout client: an async core over SGLang (or embedded) servers, built from a
:class:`RolloutConfig`, and the synchronous face the training loop calls.

Topology: ``/generate`` goes to the generation URLs -- SGLang servers, over which the
client spreads requests itself, or one sglang-router; weight updates, cache flushes and
health checks go to the worker URLs, the servers themselves (sglang-router does not forward
those calls; default: the generation URLs). :meth:`AsyncRolloutClient.connect` waits until
every URL answers ``/health``, recognises a router by its ``/workers`` listing (and refuses
one given without its workers, naming what the router lists), and checks every server
against the trainer's model. Through a router each sample goes as its own ``/generate``
(the router refuses batched requests with per-sample request ids and seeds).

How a batch is generated and retried is in ``generation``; which servers are down and which
weights they serve, in ``servers``; the HTTP clients, in ``transport``. Control calls: a
worker that cannot be reached is probed (``retries`` health checks with backoff); once
declared down it is skipped by later control calls (``'continue'``) or fails the call
(``'fail'``). Behind a router, the router's own health checks stop routing to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.control import (
    call_each,
    health_all,
    probe_health,
    router_workers,
    wait_ready,
)
from megatron_rl.rollout.generation import BatchGenerator
from megatron_rl.rollout.protocol import RolloutServerError
from megatron_rl.rollout.server_checks import check_server
from megatron_rl.rollout.servers import RolloutServers
from megatron_rl.rollout.transport import HttpTransport
from megatron_rl.rollout.types import RolloutRequest, RolloutSample
from megatron_rl.weight_sync.hf_config import ModelShape

logger = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncRolloutClient:
    """Generation and control calls on the rollout servers, on the caller's event loop."""

    def __init__(
        self,
        config: RolloutConfig,
        shape: ModelShape,
        *,
        urls: Sequence[str] | None = None,
        return_routed_experts: bool = False,
        network: httpx.AsyncBaseTransport | None = None,
    ):
        """``config`` says how to talk to the servers and sample; what it cannot know comes
        beside it: ``urls`` (default ``config.urls``; the embedded servers' URLs once they
        are started), the served model's ``shape``, and whether samples carry routed
        experts (routing replay r3). ``network`` replaces httpx's network transport (tests
        use httpx.MockTransport)."""
        self.config, self.shape = config, shape
        self.return_routed_experts = return_routed_experts
        self.servers = RolloutServers(config.urls if urls is None else urls, config.worker_urls)
        self.transport = HttpTransport(config, hosts=len(self.servers.all_urls), network=network)
        self.generator = BatchGenerator(config, shape, self.servers, self.transport,
                                        return_routed_experts=return_routed_experts)

    async def generate(
        self,
        requests: Sequence[RolloutRequest],
        batch_id: str,
        on_sample: Callable[[RolloutSample], None] | None = None,
    ) -> list[RolloutSample]:
        """See :meth:`BatchGenerator.generate`."""
        return await self.generator.generate(requests, batch_id, on_sample)

    async def connect(self) -> dict[str, dict]:
        """Wait until every URL answers /health (up to the start-up timeout), find the
        routers among the generation URLs, and check every server (see ``server_checks``):
        refuse a router given without its workers, servers whose model differs from the
        trainer's, and (r3) generation URLs that return no routed experts. Returns each
        checked URL's ``/model_info``."""
        servers, temperature = self.servers, self.config.temperature
        async with self.transport.client() as http:
            await wait_ready(http, list(dict.fromkeys(servers.urls + servers.given_workers)),
                             self.config.startup_timeout_s)
            listings = await asyncio.gather(*(router_workers(http, u) for u in servers.urls))
            routed = {u: w for u, w in zip(servers.urls, listings, strict=True) if w is not None}
            servers.routers = list(routed)
            if routed and not servers.given_workers:
                lists = "; ".join(f"{u} routes to {' '.join(w) or 'no workers yet'}"
                                  for u, w in routed.items())
                raise RolloutServerError(
                    f"--rl-rollout-url {' '.join(routed)} is an sglang-router, which does not "
                    f"forward weight updates: add --rl-rollout-worker-urls with the SGLang "
                    f"servers behind it, as the trainer reaches them ({lists})"
                )
            for router, workers in routed.items():
                missing = sorted(set(workers) - set(servers.worker_urls))
                if missing:
                    logger.warning(
                        "sglang-router %s routes to %s, which --rl-rollout-worker-urls does "
                        "not list: such a worker gets no weight updates, and its samples "
                        "will be refused as stale (unless the names differ only in how "
                        "the router and the trainer reach the same server)",
                        router, ", ".join(missing),
                    )  # fmt: skip
            checked = servers.all_urls
            infos = await asyncio.gather(*(
                check_server(http, u, self.shape, self.return_routed_experts and u in servers.urls,
                             temperature=temperature, router=u in routed)
                for u in checked
            ), return_exceptions=True)  # fmt: skip
        errors = [str(e) for e in infos if isinstance(e, BaseException)]
        if errors:
            raise RolloutServerError("rollout server check failed:\n  " + "\n  ".join(errors))
        if routed:
            logger.info("rollout: /generate through sglang-router %s; control calls to %s",
                        ", ".join(routed), ", ".join(servers.worker_urls))
        return dict(zip(checked, infos, strict=True))

    async def update_weights_from_disk(
        self, model_path: str, weight_version: str, flush_cache: bool = True
    ) -> None:
        """``POST /update_weights_from_disk`` on every worker that is not down; all must
        succeed. The servers' weight version is then ``weight_version``."""
        body = {
            "model_path": str(model_path),
            "weight_version": str(weight_version),
            "flush_cache": flush_cache,
        }
        await self._control(
            "POST", "/update_weights_from_disk", body, f"weight update to version {weight_version}"
        )
        self.servers.note_weights(weight_version, model_path)

    async def flush_cache(self) -> None:
        await self._control("POST", "/flush_cache", None, "cache flush")

    async def health(self) -> dict[str, bool]:
        """URL -> whether ``/health`` answers 200, for every generation URL and worker."""
        async with self.transport.client() as http:
            return await health_all(http, self.servers.all_urls)

    async def _control(self, method: str, path: str, body: dict | None, what: str) -> None:
        """``method path`` on every worker not down. A worker that cannot be reached is
        probed and, if it stays away, declared down: under 'continue' the call stands on
        the others, under 'fail' it fails."""
        servers, config = self.servers, self.config
        keep_going = config.on_server_failure == "continue"
        targets = servers.live_workers()
        for url in servers.worker_urls:
            if url in servers.down:
                logger.warning("%s skips %s, which is down (%s)", what, url, servers.down[url])
        if not targets:
            raise RolloutServerError(f"{what}: every rollout server is down: {servers.down}")
        async with self.transport.client() as http:
            outcomes = await call_each(http, targets, method, path, body)
            unreachable = [u for u, why in outcomes.items() if why and why[1]]
            if unreachable:
                back = await asyncio.gather(*(
                    probe_health(http, u, config.retries, config.backoff_s) for u in unreachable
                ))  # fmt: skip
                retry = [u for u, ok in zip(unreachable, back, strict=True) if ok]
                outcomes.update(await call_each(http, retry, method, path, body))
                for url, ok in zip(unreachable, back, strict=True):
                    if not ok:
                        servers.declare_down(url, outcomes[url][0], what, fatal=not keep_going)
        failed = {u: why for u, why in outcomes.items()
                  if why and not (why[1] and u in servers.down and keep_going)}
        if failed or all(outcomes.values()):
            ok = [u for u, why in outcomes.items() if not why]
            problems = failed or {u: why for u, why in outcomes.items() if why}
            raise RolloutServerError(
                f"{what} failed on: {'; '.join(f'{u} ({why[0]})' for u, why in problems.items())}"
                f"; succeeded on: {ok or 'none'}"
            )


class RolloutClient:
    """The calls the training loop makes, each run to completion on an event loop of its
    own (see :func:`run_sync`). Server state -- generation URLs, workers, routers, down
    servers, the weight version -- is ``servers``; the async operations are ``core``."""

    def __init__(
        self,
        config: RolloutConfig,
        shape: ModelShape,
        *,
        urls: Sequence[str] | None = None,
        return_routed_experts: bool = False,
        network: httpx.AsyncBaseTransport | None = None,
    ):
        """See :class:`AsyncRolloutClient`."""
        self.core = AsyncRolloutClient(config, shape, urls=urls, network=network,
                                       return_routed_experts=return_routed_experts)
        self.servers = self.core.servers

    @property
    def last_batch_stats(self) -> dict[str, Any]:
        """Samples, retries, servers down, seconds and response tokens of the last batch."""
        return self.core.generator.last_batch_stats

    def connect(self) -> dict[str, dict]:
        return run_sync(self.core.connect())

    def generate_batch(
        self,
        requests: Sequence[RolloutRequest],
        batch_id: str,
        on_sample: Callable[[RolloutSample], None] | None = None,
    ) -> list[RolloutSample]:
        return run_sync(self.core.generate(requests, batch_id, on_sample))

    def update_weights_from_disk(
        self, model_path: str, weight_version: str, flush_cache: bool = True
    ) -> None:
        run_sync(self.core.update_weights_from_disk(model_path, weight_version, flush_cache))

    def flush_cache(self) -> None:
        run_sync(self.core.flush_cache())

    def health(self) -> dict[str, bool]:
        return run_sync(self.core.health())


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


__all__ = ["AsyncRolloutClient", "RolloutClient", "RolloutRequest", "run_sync"]
