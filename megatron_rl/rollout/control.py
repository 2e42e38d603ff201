"""Control calls to rollout servers: readiness, health, router detection, info endpoints,
cache flush, weight updates, and reloading the current weights on a server that restarted.

Every call goes to each server concurrently; a call that must reach all of them reports
which servers failed (with their answer) and which succeeded.

SGLang 0.5.23 names its info endpoints ``/model_info`` and ``/server_info``; the old names
``/get_model_info`` and ``/get_server_info`` still answer (with a deprecation warning in
the server's log) and are what sglang-router 0.3.2 forwards, so :func:`get_info` asks the
current name first and falls back on a 404.

sglang-router 0.3.2 forwards ``/generate``, ``/health``, ``/get_model_info``,
``/get_server_info`` and ``/flush_cache`` only, and answers ``GET /workers`` with the
workers it routes to: :func:`router_workers` recognises a router by that listing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from megatron_rl.rollout.protocol import RolloutServerError

logger = logging.getLogger(__name__)


INFO_PATHS = {
    "model_info": ("/model_info", "/get_model_info"),
    "server_info": ("/server_info", "/get_server_info"),
}


async def get_info(http: httpx.AsyncClient, url: str, name: str) -> tuple[str, httpx.Response]:
    """``GET`` SGLang's ``name`` endpoint ('model_info' or 'server_info') by its current
    path, or by the deprecated one where that answers 404; the path used and its answer."""
    current, deprecated = INFO_PATHS[name]
    response = await http.get(f"{url}{current}", timeout=30.0)
    if response.status_code == 404:
        response = await http.get(f"{url}{deprecated}", timeout=30.0)
        return deprecated, response
    return current, response


async def router_workers(http: httpx.AsyncClient, url: str) -> list[str] | None:
    """The worker URLs ``url`` routes to if it is an sglang-router (it answers
    ``GET /workers`` with ``{"workers": [{"url": ...}, ...]}``), else None."""
    try:
        response = await http.get(f"{url}/workers", timeout=10.0)
        listing = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(listing, dict) or not isinstance(listing.get("workers"), list):
        return None
    return [str(w["url"]).rstrip("/") for w in listing["workers"]
            if isinstance(w, dict) and "url" in w]


async def wait_ready(
    http: httpx.AsyncClient, urls: list[str], timeout_s: float, *, interval_s: float = 0.5
) -> None:
    """Poll ``/health`` of every URL until all answer 200; after ``timeout_s`` raise
    :class:`RolloutServerError` naming each URL that never did, with its last answer."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {u: "no answer yet" for u in urls}
    refused: dict[str, str] = {}

    async def one(url: str) -> None:
        while True:
            try:
                response = await http.get(f"{url}/health", timeout=5.0)
                if response.status_code == 200:
                    del last[url]
                    return
                last[url] = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code in (401, 403):
                    refused[url] = (f"{last.pop(url)} (check the API key: --rl-rollout-api-key, "
                                    "--rl-rollout-api-key-file or $MEGATRON_RL_ROLLOUT_API_KEY)")
                    return  # up, and waiting will not change the key
            except httpx.HTTPError as exc:
                last[url] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(interval_s)

    started = time.monotonic()
    await asyncio.gather(*(one(u) for u in urls))
    if refused:
        raise RolloutServerError(
            "rollout servers refuse the trainer: "
            + "; ".join(f"{u} ({why})" for u, why in refused.items())
        )
    if last:
        raise RolloutServerError(
            f"rollout servers not ready after {timeout_s:.0f} s (--rl-rollout-startup-timeout): "
            + "; ".join(f"{u} ({why})" for u, why in last.items())
        )
    waited = time.monotonic() - started
    if waited > 2 * interval_s:
        logger.info("rollout servers ready after %.1f s: %s", waited, ", ".join(urls))


async def call_each(
    http: httpx.AsyncClient, urls: list[str], method: str, path: str, body: dict | None
) -> dict[str, tuple[str, bool] | None]:
    """``method path`` on every server: URL -> None on success (HTTP 200 and no
    ``"success": false``), else (what went wrong, whether the server was unreachable)."""

    async def call(url: str) -> tuple[str, bool] | None:
        try:
            response = await http.request(method, f"{url}{path}", json=body)
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}", True
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", False
        try:
            success = response.json().get("success", True)
        except (ValueError, AttributeError):
            success = True  # SGLang answers /flush_cache with plain text
        if response.status_code != 200 or success is False:
            return f"HTTP {response.status_code}: {response.text[:300]}", False
        return None

    return dict(zip(urls, await asyncio.gather(*(call(u) for u in urls)), strict=True))


async def call_all(
    http: httpx.AsyncClient, urls: list[str], method: str, path: str, body: dict | None, what: str
) -> None:
    """``method path`` on every server; raise :class:`RolloutServerError` unless all succeed
    (HTTP 200, and no ``"success": false`` in a JSON answer)."""

    outcomes = await call_each(http, urls, method, path, body)
    failed = [f"{u} ({why[0]})" for u, why in outcomes.items() if why]
    if failed:
        ok = [u for u, why in outcomes.items() if not why]
        raise RolloutServerError(
            f"{what} failed on: {'; '.join(failed)}; succeeded on: {ok or 'none'}"
        )


async def health_all(http: httpx.AsyncClient, urls: list[str]) -> dict[str, bool]:
    """URL -> whether ``/health`` answers 200."""

    async def ok(url: str) -> bool:
        try:
            return (await http.get(f"{url}/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    return dict(zip(urls, await asyncio.gather(*(ok(u) for u in urls)), strict=True))


async def probe_health(
    http: httpx.AsyncClient, url: str, attempts: int, backoff: Callable[[int], float]
) -> bool:
    """Whether ``url`` answers ``/health`` within ``attempts`` probes (at least one), each
    after its ``backoff(attempt)`` seconds."""
    for attempt in range(max(attempts, 1)):
        await asyncio.sleep(backoff(attempt))
        try:
            if (await http.get(f"{url}/health", timeout=5.0)).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
    return False


async def reload_if_stale(
    http: httpx.AsyncClient, url: str, version: str | None, model_path: str | None
) -> bool:
    """Make ``url`` serve weight ``version`` before it serves again; False if it cannot.

    A server that comes back may have restarted from its initial checkpoint. If its
    ``/model_info`` reports another version, the checkpoint ``model_path`` of ``version``
    is loaded with ``/update_weights_from_disk``; without such a path it stays out."""
    if version is None:
        return True
    try:
        served = (await get_info(http, url, "model_info"))[1].json().get("weight_version")
        if str(served) == version:
            return True
        if model_path is None:
            logger.warning(
                "rollout server %s serves weight version %r, not %s, and no checkpoint of that "
                "version is known to reload: keeping it out", url, served, version,
            )  # fmt: skip
            return False
        logger.warning(
            "rollout server %s serves weight version %r; reloading version %s from %s",
            url, served, version, model_path,
        )  # fmt: skip
        body = {"model_path": model_path, "weight_version": version}
        response = await http.post(f"{url}/update_weights_from_disk", json=body)
        return response.status_code == 200 and response.json().get("success", True) is not False
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        logger.warning("rollout server %s: weight check failed (%s)", url, exc)
        return False
