"""The embedded server served from this process (--rl-rollout-colocate): the same answers
as a server process, weight updates, a clean stop, and a start that fails saying why."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
from rollout_env import API_KEY

from megatron_rl.inference.colocated import ColocatedServerStopped, start_colocated_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
pytestmark = pytest.mark.slow  # compares with a server process


def generate(url: str, seed: int) -> list[dict]:
    body = {"input_ids": [[5, 9, 33, 7], [5, 9, 33, 7], [80, 2, 14]],
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": seed},
            "return_logprob": True, "return_routed_experts": True}
    response = httpx.post(f"{url}/generate", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def tokens_and_logprobs(answers: list[dict]) -> list:
    return [(a["output_ids"], a["meta_info"]["output_token_logprobs"],
             a["meta_info"]["routed_experts"]) for a in answers]


def test_serves_what_a_server_process_serves_and_stops_cleanly(servers, checkpoints):
    threads_before = threading.active_count()
    server = start_colocated_server(checkpoints.main, api_key=API_KEY, max_batch_size=8,
                                    weight_version="7")
    try:
        assert server.alive() and server.pid == os.getpid() != servers.main.pid
        ours, theirs = generate(server.url, 3), generate(servers.main.url, 3)
        assert tokens_and_logprobs(ours) == tokens_and_logprobs(theirs)
        assert {a["meta_info"]["weight_version"] for a in ours} == {"7"}
        # The API key is enforced as in the server process.
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 401
        # Weights load through the same route.
        update = httpx.post(f"{server.url}/update_weights_from_disk", headers=AUTH, timeout=60,
                            json={"model_path": str(checkpoints.other_weights),
                                  "weight_version": "8"})
        assert update.status_code == 200 and update.json()["success"], update.text
        updated = generate(server.url, 3)
        assert {a["meta_info"]["weight_version"] for a in updated} == {"8"}
        assert tokens_and_logprobs(updated) != tokens_and_logprobs(ours)
        server.check()
    finally:
        server.stop()
    assert not server.alive()
    server.check()  # stopped on purpose: nothing to report
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", headers=AUTH, timeout=5)
    assert threading.active_count() <= threads_before


def test_a_start_that_fails_says_why_at_once(servers, checkpoints):
    taken = int(servers.main.url.rsplit(":", 1)[1])
    with pytest.raises(ColocatedServerStopped, match=rf"127.0.0.1:{taken} stopped before it "
                                                     r"served \(SystemExit"):
        start_colocated_server(checkpoints.main, port=taken, startup_timeout_s=60)


def test_a_server_that_stops_on_its_own_is_reported(checkpoints):
    server = start_colocated_server(checkpoints.main, api_key=API_KEY)
    try:
        server._server.should_exit = True  # uvicorn leaves its loop as if it had failed
        server._thread.join(timeout=30)
        with pytest.raises(ColocatedServerStopped, match="stopped while serving: its thread "
                                                         "ended"):
            server.check()
    finally:
        server.stop()
    server.check()
