"""HTTP to the rollout servers: httpx clients with the API key, timeouts and connection
limits, and a rollout batch's requests spread over small connection pools."""

from __future__ import annotations

import contextlib
import functools
import math
import ssl
from collections.abc import AsyncIterator

import httpx

from megatron_rl.rollout.config import RolloutConfig

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


class HttpTransport:
    """Makes the httpx clients of one rollout client, all alike but for their size."""

    def __init__(
        self, config: RolloutConfig, *, hosts: int, network: httpx.AsyncBaseTransport | None = None
    ):
        """``hosts``: how many distinct servers (and routers) the clients talk to.
        ``network`` replaces httpx's network transport (tests use httpx.MockTransport)."""
        key = config.resolved_api_key()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = config.generate_timeout_s
        self.concurrency, self.hosts, self.network = config.concurrency, hosts, network

    def client(self, in_flight: int | None = None) -> httpx.AsyncClient:
        """A client with room for ``in_flight`` requests (default: the concurrency) plus
        two connections per host for control calls and health probes."""
        in_flight = self.concurrency if in_flight is None else in_flight
        limits = httpx.Limits(max_connections=in_flight + 2 * self.hosts)
        # A dead host should not hold a request for the whole generation timeout.
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        return httpx.AsyncClient(
            headers=self.headers, timeout=timeout, limits=limits, transport=self.network,
            verify=_ssl_context(),
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def pools(self, calls: int) -> AsyncIterator[list[httpx.AsyncClient]]:
        """Clients for up to ``calls`` requests in flight, at most REQUESTS_PER_POOL per
        client: the i-th call of a batch goes over ``clients[i % len(clients)]``."""
        shards = max(1, math.ceil(calls / REQUESTS_PER_POOL))
        # Calls go round-robin to the pools; slack keeps a pool that momentarily holds
        # more than its share from queueing a call for a connection.
        per_pool = 2 * math.ceil(calls / shards)
        async with contextlib.AsyncExitStack() as stack:
            yield [await stack.enter_async_context(self.client(per_pool)) for _ in range(shards)]
