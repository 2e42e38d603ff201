"""The rollout servers as a client knows them from batch to batch: where ``/generate`` goes,
which servers get control calls, which are routers, which are down, and which weights
they were last given.

A server that comes back (a probe succeeds, or a later batch finds a down server healthy)
may have restarted from its initial checkpoint: if its weight version is not the one of the
last weight update, the checkpoint of that version is reloaded on it before it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx

from megatron_rl.rollout.control import reload_if_stale
from megatron_rl.rollout.server_pool import ServerState

logger = logging.getLogger(__name__)


class RolloutServers:
    """Generation URLs, workers, routers, down servers and the served weight version."""

    def __init__(self, urls: Sequence[str], worker_urls: Sequence[str] = ()):
        """``urls`` get ``/generate``; ``worker_urls`` (default: ``urls``) the control
        calls: weight updates, cache flushes, health checks."""
        if not urls:
            raise ValueError("a rollout client needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.given_workers = [u.rstrip("/") for u in worker_urls]
        self.worker_urls = self.given_workers or list(self.urls)
        """Servers that get weight updates, cache flushes and health checks."""
        self.routers: list[str] = []
        """Those of ``urls`` that are sglang-routers (found when the client connects)."""
        self.down: dict[str, str] = {}
        """URL -> reason, for servers declared down (cleared when one rejoins)."""
        self._weight_version: str | None = None
        self._reload_path: str | None = None

    @property
    def all_urls(self) -> list[str]:
        """Generation URLs, then the workers that are not among them."""
        return list(dict.fromkeys(self.urls + self.worker_urls))

    @property
    def weight_version(self) -> str | None:
        """Version of the weights the servers were last given; once set, every sample must
        carry it."""
        return self._weight_version

    def note_weights(self, weight_version: str | None, model_path: str | None = None) -> None:
        """Record the weights the servers now serve -- the one way the version is set (the
        client's own disk update calls it too).

        ``model_path`` (a checkpoint directory the servers can read) lets the client reload
        those weights on a server that restarts; without it (weights that travelled over
        the network) such a server is kept out."""
        self._weight_version = None if weight_version is None else str(weight_version)
        self._reload_path = None if model_path is None else str(model_path)

    def live_workers(self) -> list[str]:
        """Workers not declared down: the servers a weight update reaches."""
        return [u for u in self.worker_urls if u not in self.down]

    def declare_down(self, url: str, reason: str, during: str, fatal: bool) -> None:
        self.down[url] = reason
        logger.error("rollout server %s is down (%s during %s)%s", url, reason, during,
                     "; failing the run" if fatal else "")

    async def ready_to_serve(self, http: httpx.AsyncClient, url: str) -> bool:
        """Whether ``url`` serves the current weights, after reloading them if it can."""
        return await reload_if_stale(http, url, self._weight_version, self._reload_path)

    async def rejoin(self, http: httpx.AsyncClient, batch: list[ServerState]) -> None:
        """Down servers that answer again and serve (or reload) the current weights rejoin,
        generation servers (``batch``, the states of this batch) and control-only workers
        alike; those still down are marked so in ``batch``."""
        workers = [ServerState(u) for u in self.down if u not in self.urls]
        for server in [*batch, *workers]:
            if server.url not in self.down:
                continue
            try:
                healthy = (await http.get(f"{server.url}/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and await self.ready_to_serve(http, server.url):
                logger.info("rollout server %s is reachable again and rejoins", server.url)
                del self.down[server.url]
            else:
                server.down, server.reason = True, self.down[server.url]
