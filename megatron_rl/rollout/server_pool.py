"""The servers of one rollout batch: which are live, suspect or down, and who gets a request.

A connection error makes a server *suspect*: it gets no new requests while a probe calls
``/health`` up to ``probes`` times with exponential backoff. If it answers it is live
again; if not it is *down* for the rest of the batch, logged by URL. Requests wait while
no server is live and some are suspect; they fail once every server is down, or as soon
as one is declared down under the ``'fail'`` policy (``failed`` is set then, so the batch
can stop its requests in flight). A server still suspect when every request is done counts
as down for later batches, without failing the finished one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from megatron_rl.rollout.protocol import RolloutServerError

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    url: str
    in_flight: int = 0
    suspect: bool = False
    down: bool = False
    reason: str = ""


def describe(servers: list[ServerState]) -> str:
    return ", ".join(f"{s.url} ({s.reason})" for s in servers)


class ServerPool:
    """Server states on one event loop, with the health probes of suspect servers."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        servers: list[ServerState],
        *,
        probes: int,
        backoff: Callable[[int], float],
        fail_on_down: bool,
        on_down: Callable[[ServerState], None],
        on_back: Callable[[ServerState], Awaitable[bool]] | None = None,
    ):
        """``on_down`` records a server declared down; ``on_back`` prepares a server whose
        /health answers again (e.g. reloads the current weights) and says if it may serve."""
        self.http, self.servers = http, servers
        self.probes, self.backoff = probes, backoff
        self.fail_on_down, self.on_down, self.on_back = fail_on_down, on_down, on_back
        self.changed = asyncio.Condition()
        self.tasks: list[asyncio.Task] = []
        self.turn = 0
        self.failed = asyncio.Event()
        """Set when a server is declared down under the 'fail' policy (see ``error``)."""
        self.error: RolloutServerError | None = None

    async def pick(self, avoid: ServerState | None = None) -> ServerState:
        """The live server with the fewest requests in flight (not ``avoid`` if possible)."""
        async with self.changed:
            while True:
                down = [s for s in self.servers if s.down]
                if down and self.fail_on_down:
                    raise RolloutServerError(f"rollout server down: {describe(down)}")
                if len(down) == len(self.servers):
                    raise RolloutServerError(f"all rollout servers are down: {describe(down)}")
                live = [s for s in self.servers if not s.down and not s.suspect]
                if live:
                    preferred = [s for s in live if s is not avoid] or live
                    # Least loaded first; ties rotate so equal servers share the work.
                    self.turn += 1
                    n = len(self.servers)
                    return min(
                        preferred,
                        key=lambda s: (s.in_flight, (self.servers.index(s) - self.turn) % n),
                    )
                await self.changed.wait()

    async def connection_failed(self, server: ServerState, error: Exception) -> None:
        """Mark ``server`` suspect and start probing it (once)."""
        async with self.changed:
            if server.suspect or server.down:
                return
            server.suspect = True
            server.reason = (
                f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            )
            logger.warning("rollout server %s unreachable (%s); probing /health", server.url, error)
            self.tasks.append(asyncio.create_task(self._probe(server)))

    async def _probe(self, server: ServerState) -> None:
        for attempt in range(self.probes):
            await asyncio.sleep(self.backoff(attempt))
            try:
                healthy = (
                    await self.http.get(f"{server.url}/health", timeout=5.0)
                ).status_code == 200
                if healthy and (self.on_back is None or await self.on_back(server)):
                    logger.info("rollout server %s is back", server.url)
                    async with self.changed:
                        server.suspect = False
                        self.changed.notify_all()
                    return
            except httpx.HTTPError:
                pass
        async with self.changed:
            server.suspect, server.down = False, True
            logger.error(
                "rollout server %s is down after %d health probes (%s)",
                server.url,
                self.probes,
                server.reason,
            )
            self.on_down(server)
            if self.fail_on_down:
                self.error = RolloutServerError(f"rollout server down: {describe([server])}")
                self.failed.set()
            self.changed.notify_all()

    def close(self) -> None:
        """Stop probing. A server still suspect counts as down (it may rejoin later)."""
        for task in self.tasks:
            task.cancel()
        for server in self.servers:
            if server.suspect:
                server.suspect, server.down = False, True
                server.reason += " (still unreachable when the batch ended)"
                logger.error("rollout server %s is down: %s", server.url, server.reason)
                self.on_down(server)
