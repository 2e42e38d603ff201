"""Rewards from a remote reward service (``--rl-reward-url``), for reward models that need
GPUs of their own.

Protocol (one prompt's group of samples per request)::

    POST <--rl-reward-url>
    Authorization: Bearer <key>          (only when a key is configured)
    {"samples": [{"id": "step3/p1/s0", "index": 17, "prompt": "...", "question": "...",
                  "response": "...", "answer": "...", "metadata": {...}}, ...]}

    200 {"rewards": [1.0, 0.0, ...], "errors": [null, "why", ...]}

``rewards`` are in the order of ``samples``, one per sample; ``errors`` is optional (a
non-null entry marks a response the service could not score -- counted in
``rollout/reward_failure_frac`` like a local scorer's exception). ``index`` is the task
item's index, ``question``/``answer``/``metadata`` the task item's own fields. The service
applies any binarisation itself: rewards are used as they come, after the same checks as
local ones (finite numbers within ±REWARD_LIMIT), an unusable one stopping the run with
the sample named.

Connection errors, timeouts and 5xx answers are retried with doubling backoff; a 4xx
answer is the service refusing the request and fails the step with its message. The key
comes from ``--rl-reward-api-key-file`` or ``$MEGATRON_RL_REWARD_API_KEY``, never from
the command line. ``python -m megatron_rl.rewards.server`` is a reference service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import stat
import threading

import httpx

from megatron_rl.config.flags import ConfigError
from megatron_rl.data.tasks import REWARD_LIMIT, RewardError, TaskItem
from megatron_rl.rollout.types import RolloutSample

logger = logging.getLogger(__name__)

API_KEY_ENV = "MEGATRON_RL_REWARD_API_KEY"
MAX_BACKOFF_S = 8.0


class RewardServiceError(RuntimeError):
    """The reward service refused a request, or could not be reached after the retries."""


def resolve_api_key(key_file: str | None) -> str | None:
    """The service's key: the file's contents (stripped; refused if group or world may read
    it), else $MEGATRON_RL_REWARD_API_KEY (empty = unset), else None."""
    if key_file is None:
        return os.environ.get(API_KEY_ENV) or None
    where = f"--rl-reward-api-key-file {key_file}"
    try:
        mode = os.stat(key_file).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{where} is not a regular file")
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigError(f"{where} may be read by other users (mode "
                              f"{stat.S_IMODE(mode):o}): chmod 600 {key_file}")
        with open(key_file, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}") from None
    if not key:
        raise ConfigError(f"{where} is empty")
    return key


def request_body(samples: list[RolloutSample], items: dict[int, TaskItem]) -> dict:
    """The JSON body scoring ``samples`` (their ``metadata['response_text']`` decoded)."""
    rows = []
    for s in samples:
        item = items[s.prompt_index]
        rows.append({"id": s.request_id, "index": item.index, "prompt": item.prompt,
                     "question": item.entry.get("question", item.prompt),
                     "response": s.metadata["response_text"], "answer": item.answer,
                     "metadata": item.entry.get("metadata", {})})
    return {"samples": rows}


class RemoteRewards:
    """Client of one reward service. Its requests run on an event loop in a thread of its
    own, so the rollout client's loop and the trainer never wait on them; at most
    ``concurrency`` requests are in flight."""

    def __init__(self, url: str, *, concurrency: int, retries: int, timeout_s: float,
                 api_key: str | None, backoff_s: float = 0.5,
                 network: httpx.AsyncBaseTransport | None = None) -> None:
        self.url, self.retries, self.timeout_s, self.backoff_s = url, retries, timeout_s, backoff_s
        self.concurrency = concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._network = network
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client",
                                        daemon=True)
        self._thread.start()
        self._http: httpx.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None

    def submit(self, samples: list[RolloutSample],
               items: dict[int, TaskItem]) -> concurrent.futures.Future:
        """Score ``samples`` (decoded: ``metadata['response_text']`` set) in one request;
        the future is done once every ``sample.reward`` is set, or holds the error."""
        return asyncio.run_coroutine_threadsafe(self._score(samples, items), self._loop)

    def score(self, samples: list[RolloutSample], items: dict[int, TaskItem]) -> None:
        self.submit(samples, items).result()

    async def _score(self, samples: list[RolloutSample], items: dict[int, TaskItem]) -> None:
        if self._http is None:
            # Created on the service's own loop, on first use.
            self._http = httpx.AsyncClient(timeout=self.timeout_s, transport=self._network)
            self._limit = asyncio.Semaphore(self.concurrency)
        body = request_body(samples, items)
        async with self._limit:
            answer = await self._post(body, samples)
        apply_answer(answer, samples, items, self.url)

    async def _post(self, body: dict, samples: list[RolloutSample]) -> object:
        what = (f"reward service {self.url} (samples {samples[0].request_id}.."
                f"{samples[-1].request_id})")
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = await self._http.post(self.url, json=body, headers=self._headers)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise RewardServiceError(f"{what} answered with no JSON: "
                                                 f"{response.text[:300]!r}") from exc
                if 400 <= response.status_code < 500:
                    raise RewardServiceError(f"{what} refused the request: HTTP "
                                             f"{response.status_code}: {response.text[:500]}")
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            logger.warning("%s failed (attempt %d of %d): %s", what, attempt + 1,
                           self.retries + 1, last)
        raise RewardServiceError(f"{what} failed {self.retries + 1} times; last: {last}")

    def close(self) -> None:
        if self._http is not None:
            asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def apply_answer(answer: object, samples: list[RolloutSample], items: dict[int, TaskItem],
                 url: str) -> None:
    """Set each sample's reward from the service's ``answer``, refusing anything that is not
    one finite number within ±REWARD_LIMIT per sample (naming the sample)."""
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list) or len(rewards) != len(samples):
        raise RewardServiceError(
            f"reward service {url} answered {str(answer)[:300]} for {len(samples)} samples "
            f"({samples[0].request_id}..): expected {{\"rewards\": [one number per sample]}}")
    errors = answer.get("errors") or [None] * len(samples)
    if not isinstance(errors, list) or len(errors) != len(samples):
        raise RewardServiceError(f"reward service {url}: 'errors' must be a list with one "
                                 f"entry per sample, got {str(errors)[:200]}")
    for sample, value, error in zip(samples, rewards, errors, strict=True):
        item = items[sample.prompt_index]
        where = (f"reward service {url} returned {value!r} for sample {sample.request_id} "
                 f"(item {item.index}, response {sample.metadata['response_text'][:80]!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardError(f"{where}: a reward must be a number")
        if not math.isfinite(value) or abs(value) > REWARD_LIMIT:
            raise RewardError(f"{where}: rewards must be finite numbers within "
                              f"±{REWARD_LIMIT:g}")
        sample.reward = float(value)
        if error is not None:
            sample.metadata["reward_error"] = str(error)
            logger.warning("reward service %s could not score %s: %s", url, sample.request_id,
                           error)
