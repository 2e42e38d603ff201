"""One bad request cannot hurt the others (in process): a request that fails inside the
batched step fails alone, an aborted request leaves its batch, batches and the queue keep
to their limits, and the HTTP layer answers each request on its own."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from transformers.utils import logging as hf_logging

from megatron_rl.inference.engine import GenerationEngine, GenerationRequest, QueueFull
from megatron_rl.inference.server import create_app

hf_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = GenerationEngine(checkpoints.main, dtype="bf16", max_batch_size=16, seed=0)
    yield engine
    engine.close()


def good(i: int, **kw) -> GenerationRequest:
    kw.setdefault("max_new_tokens", 6)
    return GenerationRequest(rid=f"good{i}", input_ids=[5 + i, 9, 11 + i], sampling_seed=i,
                             return_logprob=True, return_routed_experts=True, **kw)  # fmt: skip


def poison_step(engine, monkeypatch, rid: str = "poison") -> None:
    """Make the batched sampling step raise whenever ``rid`` is in the batch."""
    original = engine._sample

    def sample(rows, active, logits):
        if any(rows[b].request.rid == rid for b in active):
            raise RuntimeError(f"injected failure for {rid}")
        return original(rows, active, logits)

    monkeypatch.setattr(engine, "_sample", sample)


def test_a_request_that_fails_in_the_batch_fails_alone(engine, monkeypatch):
    expected = engine.generate([good(i) for i in range(8)])
    poison_step(engine, monkeypatch)
    batch = [good(i) for i in range(4)] + [good(99).__class__(rid="poison", input_ids=[7, 8])]
    batch += [good(i) for i in range(4, 8)]
    futures = engine.submit_all(batch)
    with pytest.raises(RuntimeError, match="injected failure for poison"):
        futures[4].result(timeout=60)
    served = [f.result(timeout=60) for i, f in enumerate(futures) if i != 4]
    for want, got in zip(expected, served, strict=True):
        assert got.output_ids == want.output_ids and got.output_logprobs == want.output_logprobs
        assert (got.routed_experts == want.routed_experts).all()


def test_http_requests_batched_with_a_failing_one_are_served(engine, monkeypatch):
    poison_step(engine, monkeypatch, rid="bad")
    app = create_app(engine)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            bodies = [{"input_ids": [5 + i, 6], "rid": f"ok{i}",
                       "sampling_params": {"max_new_tokens": 4}} for i in range(8)]  # fmt: skip
            bodies.insert(3, {"input_ids": [5, 6], "rid": "bad"})
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert codes == [200] * 3 + [500] + [200] * 5, codes
    assert "injected failure for bad" in responses[3].json()["error"]["message"]
    assert all(len(r.json()["output_ids"]) == 4 for i, r in enumerate(responses) if i != 3)


def test_aborted_requests_leave_their_batch(engine):
    long = good(0, max_new_tokens=3000, ignore_eos=True)
    short = good(1, max_new_tokens=5)
    futures = engine.submit_all([long, short])
    time.sleep(0.3)
    futures[0].abort()
    start = time.monotonic()
    result = futures[0].result(timeout=30)
    assert result.finish_reason["type"] == "abort" and len(result.output_ids) < 3000
    assert time.monotonic() - start < 5
    assert len(futures[1].result(timeout=30).output_ids) == 5
    # Aborted while still queued: cancelled, never run.
    blocker = engine.submit(good(2, max_new_tokens=300, ignore_eos=True))
    queued = engine.submit(good(3))
    queued.abort()
    blocker.abort()
    assert queued.cancelled()


def test_batches_and_queue_keep_their_limits(checkpoints):
    engine = GenerationEngine(checkpoints.main, max_batch_size=8, max_total_tokens=40,
                              max_queued_requests=6, seed=0)  # fmt: skip
    try:
        sizes, gate = [], threading.Event()
        original = engine._run_batch

        def held(rows):  # the first batch waits at the gate while the queue fills
            sizes.append(len(rows))
            gate.wait(30)
            return original(rows)

        engine._run_batch = held
        first = engine.submit(good(0, max_new_tokens=1))
        while not sizes:
            time.sleep(0.01)
        with pytest.raises(ValueError, match="exceeds max_total_tokens 40"):
            engine.submit(good(1, max_new_tokens=38))
        # Each row may grow to 3 + 10 = 13 tokens: 3 fit in 40, whatever the batch size.
        futures = engine.submit_all([good(i, max_new_tokens=10) for i in range(6)])
        with pytest.raises(QueueFull, match="6 sequences waiting, max_queued_requests 6"):
            engine.submit(good(9, max_new_tokens=10))
        with pytest.raises(ValueError, match="7 sequences in one request exceed"):
            engine.submit_all([good(i) for i in range(7)])
        gate.set()
        for f in [first, *futures]:
            f.result(timeout=60)
        assert sizes == [1, 3, 3], sizes
    finally:
        engine.close()
