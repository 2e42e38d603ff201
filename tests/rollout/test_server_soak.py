"""Soak: good and hostile traffic together against a real server process on loopback.

Every good request must be answered with exactly the tokens it gets alone; every hostile
one must get its own error (or be abandoned by its client) without hurting the others;
/health must keep answering; memory must not grow without bound; abandoned requests must
stop; SIGTERM mid-generation must stop the server within seconds and delete its temporary
log. ``MEGATRON_RL_SOAK_S`` sets the traffic's duration (default 24 s; 30-60 s for a real
soak). Not less: over 6 s the bf16 kernels' per-shape state can still grow as fast in the
second half as in the first (seen: 471 -> 719 -> 951 MiB), which the test cannot tell from
a leak; over 24 s it levels off (471 -> 1223 -> 1318 MiB)."""

from __future__ import annotations

import collections
import json
import os
import threading
import time

import httpx
import psutil
import pytest

from megatron_rl.inference.launcher import start_server_process

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
PROMPTS = [[5 + i, 9, 11, 13 + i] for i in range(6)]
MAX_BODY = 1_000_000


def good_body(i: int) -> dict:
    return {"input_ids": PROMPTS[i], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "sampling_seed": 100 + i}}  # fmt: skip


# kind -> (body or raw bytes, headers, expected status; None: the client gives up)
HOSTILE = {
    "temperature NaN": ({"input_ids": [5], "sampling_params": {"temperature": float("nan")}}, AUTH, 400),
    "top_k 2**63": ({"input_ids": [5], "sampling_params": {"top_k": 2**63}}, AUTH, 400),
    "n 10**6": ({"input_ids": [5], "sampling_params": {"n": 10**6}}, AUTH, 400),
    "oversized body": (b'{"input_ids": [' + b"5, " * (MAX_BODY // 3) + b"5]}", AUTH, 413),
    "malformed JSON": (b'{"input_ids": [1, 2', AUTH, 400),
    "wrong key": ({"input_ids": [5]}, {**AUTH, "Authorization": "Bearer nope"}, 401),
    "abandoned": ({"input_ids": [7, 8], "sampling_params": {
        "n": 32, "max_new_tokens": 2000, "ignore_eos": True}}, AUTH, None),
}  # fmt: skip


def send(client: httpx.Client, url: str, body, headers, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"{url}/generate", content=content, headers=headers, timeout=timeout)


@pytest.mark.slow
def test_soak_mixed_good_and_hostile_traffic(checkpoints):
    duration = float(os.environ.get("MEGATRON_RL_SOAK_S", "24"))
    handle = start_server_process(
        checkpoints.main, api_key=KEY, max_batch_size=16, startup_timeout_s=240,
        extra_args=["--max-request-bytes", str(MAX_BODY), "--max-queued-requests", "256"],
    )  # fmt: skip
    try:
        url, server = handle.url, psutil.Process(handle.pid)
        with httpx.Client() as client:
            expected = [send(client, url, good_body(i), AUTH).json() for i in range(len(PROMPTS))]
        rss_before = server.memory_info().rss
        served, wrong, errors = collections.Counter(), [], collections.defaultdict(collections.Counter)
        health_worst = [0.0]
        stop = threading.Event()

        def good_traffic(offset: int) -> None:
            with httpx.Client() as client:
                k = offset
                while not stop.is_set():
                    i = k % len(PROMPTS)
                    k += 1
                    response = send(client, url, good_body(i), AUTH)
                    got = response.json() if response.status_code == 200 else response.text
                    if response.status_code != 200 or got["output_ids"] != expected[i]["output_ids"] or (
                        got["meta_info"]["output_token_logprobs"]
                        != expected[i]["meta_info"]["output_token_logprobs"]
                    ):
                        wrong.append((i, response.status_code, str(got)[:300]))
                    served["good"] += 1

        def hostile_traffic() -> None:
            with httpx.Client() as client:
                kinds = sorted(HOSTILE)
                k = 0
                while not stop.is_set():
                    kind = kinds[k % len(kinds)]
                    k += 1
                    body, headers, _ = HOSTILE[kind]
                    try:
                        timeout = 0.3 if kind == "abandoned" else 60
                        errors[kind][send(client, url, body, headers, timeout).status_code] += 1
                    except httpx.TimeoutException:
                        errors[kind]["client gave up"] += 1

        def health() -> None:
            with httpx.Client() as client:
                while not stop.is_set():
                    start = time.monotonic()
                    assert client.get(f"{url}/health", headers=AUTH, timeout=30).status_code == 200
                    health_worst[0] = max(health_worst[0], time.monotonic() - start)
                    time.sleep(0.1)

        threads = [threading.Thread(target=good_traffic, args=(o,)) for o in range(3)]
        threads += [threading.Thread(target=hostile_traffic), threading.Thread(target=health)]
        for thread in threads:
            thread.start()
        # RSS halfway and at the end: the first half warms the allocator up (its high-water
        # mark differs between torch builds); a leak keeps growing in the second half.
        time.sleep(duration / 2)
        rss_mid = server.memory_info().rss
        time.sleep(duration / 2)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        rss_after = server.memory_info().rss

        # Abandoned generations were aborted: a fresh request is not queued behind them.
        start = time.monotonic()
        with httpx.Client() as client:
            assert send(client, url, good_body(0), AUTH).json()["output_ids"] == expected[0]["output_ids"]
        idle_latency = time.monotonic() - start

        print(f"\nsoak {duration:.0f} s: {served['good']} good requests served, {len(wrong)} wrong; "
              f"hostile: { {k: dict(v) for k, v in errors.items()} }; worst /health "
              f"{health_worst[0] * 1000:.0f} ms; RSS {rss_before / 2**20:.0f} -> "
              f"{rss_mid / 2**20:.0f} (halfway) -> {rss_after / 2**20:.0f} MiB; next request "
              f"after it {idle_latency:.2f} s")  # fmt: skip
        assert not wrong, wrong[:3]
        assert served["good"] >= 3
        for kind, (_, _, status) in HOSTILE.items():
            want = status if status is not None else "client gave up"
            assert errors[kind] and set(errors[kind]) == {want}, (kind, dict(errors[kind]))
        assert health_worst[0] < 2.0
        assert idle_latency < 5.0
        # Bounded (the request and batch limits hold; the issue saw 7.9 GB) and levelling
        # off: measured here, 415 -> 1375 -> 1375 MiB over 24 s (allocator high water
        # reached in the first half); a leak grows as much in the second half as the first.
        assert rss_after - rss_before < 2048 * 2**20
        assert rss_after - rss_mid < 0.5 * max(rss_mid - rss_before, 0) + 100 * 2**20

        # SIGTERM mid-generation: the server ends its batch and exits within seconds.
        outcome = {}

        def long_generation() -> None:
            body = {"input_ids": [5, 6], "sampling_params": {
                "n": 16, "max_new_tokens": 3000, "ignore_eos": True}}  # fmt: skip
            try:
                with httpx.Client() as client:
                    outcome["status"] = send(client, url, body, AUTH, timeout=120).status_code
            except httpx.TransportError as exc:
                outcome["status"] = type(exc).__name__

        generating = threading.Thread(target=long_generation)
        generating.start()
        time.sleep(1.0)
        start = time.monotonic()
        handle.stop(timeout_s=30)
        stopped_after = time.monotonic() - start
        generating.join(timeout=30)
        assert stopped_after < 6, f"SIGTERM took {stopped_after:.1f} s"
        assert outcome["status"] in (503, "RemoteProtocolError"), outcome
        assert not handle.log_path.exists()
    finally:
        handle.stop()
