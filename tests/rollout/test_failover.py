"""Real server processes dying in the middle of a rollout batch."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import pytest
import torch
from rollout_env import API_KEY

from megatron_rl.rollout.client import RolloutClient, RolloutRequest
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.protocol import RolloutServerError
from megatron_rl.weight_sync.hf_config import ModelShape

pytestmark = pytest.mark.slow  # starts and kills server processes


def make_client(urls, tiny, **fields) -> RolloutClient:
    """A client of ``urls``; ``fields`` of its RolloutConfig."""
    config = RolloutConfig(urls=tuple(urls), max_new_tokens=12, api_key=API_KEY, concurrency=32,
                           progress=False, **fields)
    return RolloutClient(config, ModelShape.from_model_config(tiny), return_routed_experts=True)


def batch(n: int = 24) -> list[RolloutRequest]:
    g = torch.Generator().manual_seed(3)
    return [
        RolloutRequest(
            prompt_index=i // 4,
            sample_index=i % 4,
            prompt_ids=torch.randint(4, 128, (6,), generator=g).tolist(),
        )
        for i in range(n)
    ]


def run_and_interrupt(client: RolloutClient, batch_id: str, after: int, interrupt) -> list:
    """Run a batch in a thread; call ``interrupt()`` once ``after`` samples have arrived."""
    arrived = threading.Event()
    count = [0]

    def on_sample(_):
        count[0] += 1
        if count[0] == after:
            arrived.set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.generate_batch, batch(), batch_id, on_sample)
        assert arrived.wait(120), "the batch never got going"
        done_at_interrupt = count[0]
        interrupt()
        return future.result(timeout=300), done_at_interrupt


def test_killed_server_restarted_mid_batch_loses_and_duplicates_nothing(servers, tiny, checkpoints):
    client = make_client([servers.main.url], tiny, retries=6, retry_backoff_s=0.5)
    # Synced weights: the restarted server loads its initial checkpoint, and the client must
    # give it the synced weights back before it serves again.
    client.update_weights_from_disk(str(checkpoints.other_weights), "v1")
    try:
        expected = client.generate_batch(batch(), "kill")  # the same batch, undisturbed
        # The kill must land while responses are still owed. Under load the server can
        # finish the whole batch (one engine batch) before the kill arrives; then nothing
        # is retried and the attempt proves nothing about failover, so it is made again
        # (each attempt's results must still be exact).
        for _ in range(3):
            samples, done_at_kill = run_and_interrupt(client, "kill", 4,
                                                      lambda: servers.restart(0))
            assert done_at_kill < len(expected), "the kill landed after the batch"
            assert [s.request_id for s in samples] == [s.request_id for s in expected]
            assert len({s.request_id for s in samples}) == len(samples) == 24
            # Retried requests keep their seeds, and the restarted server got the same weights.
            for got, want in zip(samples, expected, strict=True):
                assert got.weight_version == "v1"
                assert got.response_ids == want.response_ids
                assert torch.equal(got.routes, want.routes)
            assert not client.servers.down
            if client.last_batch_stats["retries"] > 0:
                break
        assert client.last_batch_stats["retries"] > 0, "no attempt's kill landed mid-batch"
    finally:
        client.update_weights_from_disk(str(checkpoints.main), "default")


def test_server_that_stays_down_is_named_and_the_batch_continues(servers, tiny, caplog):
    main, spare = servers.main.url, servers.spare.url
    client = make_client([main, spare], tiny, retries=2, retry_backoff_s=0.2)
    with caplog.at_level(logging.ERROR, logger="megatron_rl.rollout"):
        samples, _ = run_and_interrupt(client, "down", 4, servers.spare.kill)
    assert len({s.request_id for s in samples}) == len(samples) == 24
    assert list(client.servers.down) == [spare]
    assert any(spare in r.getMessage() and "down" in r.getMessage() for r in caplog.records)
    assert {s.server_url for s in samples} <= {main, spare} and main in {
        s.server_url for s in samples
    }

    # The next batch does not wait for the dead server; under 'fail' it is refused at once.
    assert len(client.generate_batch(batch(8), "after")) == 8
    strict = make_client(
        [main, spare], tiny, retries=1, retry_backoff_s=0.1, on_server_failure="fail"
    )
    with pytest.raises(RolloutServerError, match=f"rollout server down: {spare}"):
        strict.generate_batch(batch(), "fail")  # fails while the main server still works
    with pytest.raises(RolloutServerError, match=f"rollout server down: {spare}"):
        strict.generate_batch(batch(4), "fail-again")  # and refuses the next batch at once
    with pytest.raises(RolloutServerError, match=f"all rollout servers are down: {spare}"):
        make_client([spare], tiny, retries=1, retry_backoff_s=0.1).generate_batch(batch(8), "none")
