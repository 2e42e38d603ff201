"""Control calls to rollout servers: health, cache flush, weight updates, and reloading the
current weights on a server that restarted.

Every call goes to each server concurrently; a call that must reach all of them reports
which servers failed (with their answer) and which succeeded.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from megatron_rl.rollout.protocol import RolloutServerError

logger = logging.getLogger(__name__)


async def call_all(
    http: httpx.AsyncClient, urls: list[str], method: str, path: str, body: dict | None, what: str
) -> None:
    """``method path`` on every server; raise :class:`RolloutServerError` unless all succeed
    (HTTP 200, and no ``"success": false`` in a JSON answer)."""

    async def call(url: str) -> str | None:
        try:
            response = await http.request(method, f"{url}{path}", json=body)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        try:
            success = response.json().get("success", True)
        except (ValueError, AttributeError):
            success = True  # SGLang answers /flush_cache with plain text
        if response.status_code != 200 or success is False:
            return f"HTTP {response.status_code}: {response.text[:300]}"
        return None

    outcomes = await asyncio.gather(*(call(u) for u in urls))
    failed = [f"{u} ({why})" for u, why in zip(urls, outcomes, strict=True) if why]
    if failed:
        ok = [u for u, why in zip(urls, outcomes, strict=True) if not why]
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


async def reload_if_stale(
    http: httpx.AsyncClient, url: str, version: str | None, model_path: str | None
) -> bool:
    """Make ``url`` serve weight ``version`` before it serves again; False if it cannot.

    A server that comes back may have restarted from its initial checkpoint. If its
    ``/get_model_info`` reports another version, the checkpoint ``model_path`` of ``version``
    is loaded with ``/update_weights_from_disk``; without such a path it stays out."""
    if version is None:
        return True
    try:
        served = (
            (await http.get(f"{url}/get_model_info", timeout=10.0)).json().get("weight_version")
        )
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
