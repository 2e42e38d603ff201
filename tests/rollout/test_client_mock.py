"""RolloutClient against SGLang stand-ins (httpx MockTransport): retries, spreading,
server failure policies, start-up checks, control calls, API key."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

import httpx
import pytest
import torch
from fake_sglang import answer, fake_sglang, sample_id, sglang_response, split_batch

from megatron_rl.model.config import preset
from megatron_rl.rollout.client import RolloutClient, RolloutRequest
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.rollout.generation import sample_seed
from megatron_rl.rollout.protocol import RolloutProtocolError, RolloutServerError
from megatron_rl.rollout.transport import HttpTransport
from megatron_rl.weight_sync.hf_config import ModelShape, save_random_checkpoint

TINY = preset("tiny")
SHAPE = ModelShape.from_model_config(TINY)
A, B = "http://10.0.0.1:30000", "http://10.0.0.2:30000"


def routed(handlers: dict[str, object]) -> httpx.MockTransport:
    """One transport for several fake servers, dispatching on host:port."""
    return httpx.MockTransport(lambda r: handlers[f"http://{r.url.host}:{r.url.port}"](r))


def client(urls, network, *, routes: bool = True, **fields) -> RolloutClient:
    """A client of ``urls`` over ``network``; ``fields`` of its RolloutConfig."""
    fields.setdefault("retries", 2)
    fields.setdefault("retry_backoff_s", 0.01)
    fields.setdefault("group_requests", False)  # one request per sample unless a test groups
    fields.setdefault("max_new_tokens", 3)
    fields.setdefault("progress", False)
    config = RolloutConfig(urls=tuple(urls), **fields)
    return RolloutClient(config, SHAPE, return_routed_experts=routes, network=network)


def requests(n: int, group: int = 4) -> list[RolloutRequest]:
    return [
        RolloutRequest(prompt_index=i // group, sample_index=i % group, prompt_ids=[5, 6, i % 100])
        for i in range(n)
    ]


def test_samples_carry_everything_and_keep_request_order():
    seen = []

    def generate(request):
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json=sglang_response(body, SHAPE, weight_version="w3")[0])

    batch = requests(10)
    samples = client([A], routed({A: fake_sglang(SHAPE, generate=generate)})).generate_batch(
        batch, "step5"
    )
    assert [(s.prompt_index, s.sample_index) for s in samples] == [
        (r.prompt_index, r.sample_index) for r in batch
    ]
    sample = samples[7]
    assert sample.request_id == "step5/p1/s3" and sample.server_url == A
    assert sample.weight_version == "w3" and sample.finish_reason == "length"
    assert (sample.prompt_tokens, sample.completion_tokens) == (3, 3) and sample.latency_s > 0
    assert sample.routes.shape == (3 + 3 - 1, 3, 4) and sample.rollout_logprobs.shape == (3,)
    by_rid = {b["rid"]: b for b in seen}
    assert by_rid["step5/p1/s3"]["sampling_params"]["sampling_seed"] == sample_seed(
        1234, "step5/p1/s3"
    )
    assert len({b["sampling_params"]["sampling_seed"] for b in seen}) == 10


def test_requests_spread_over_servers_each_sample_once():
    counts = Counter()

    def counting(url):
        def generate(request):
            counts[url] += 1
            return httpx.Response(200, json=sglang_response(json.loads(request.content), SHAPE)[0])

        return fake_sglang(SHAPE, generate=generate)

    samples = client(
        [A, B], routed({A: counting(A), B: counting(B)}), concurrency=8
    ).generate_batch(requests(40), "s")
    assert counts[A] > 5 and counts[B] > 5 and counts[A] + counts[B] == 40
    assert len({s.request_id for s in samples}) == 40


def test_5xx_and_abort_are_retried():
    answers = Counter()

    def flaky(request):
        body = json.loads(request.content)
        rid = sample_id(body["rid"])
        answers[rid] += 1
        if answers[rid] == 1:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        if answers[rid] == 2:
            payload = sglang_response(body, SHAPE)[0]
            payload["meta_info"]["finish_reason"] = {"type": "abort", "message": "retracted"}
            return httpx.Response(200, json=payload)
        return httpx.Response(200, json=sglang_response(body, SHAPE)[0])

    c = client([A], routed({A: fake_sglang(SHAPE, generate=flaky)}), retries=3)
    assert len(c.generate_batch(requests(4), "s")) == 4
    assert c.last_batch_stats["retries"] == 8


def test_retries_are_bounded():
    failing = fake_sglang(SHAPE, generate=lambda r: httpx.Response(500, text="boom"))
    with pytest.raises(RolloutServerError, match="gave up after 3 attempts.*HTTP 500"):
        client([A], routed({A: failing}), retries=2).generate_batch(requests(2), "s")


def test_4xx_fails_at_once_naming_request_and_server():
    calls = Counter()

    def refuse(request):
        calls["n"] += 1
        return httpx.Response(
            400, json={"error": {"message": "token ids [999] are outside the vocabulary"}}
        )

    with pytest.raises(
        RolloutProtocolError, match=r"request 'b/p0/s0', server http://10.0.0.1:30000: HTTP 400"
    ):
        client([A], routed({A: fake_sglang(SHAPE, generate=refuse)})).generate_batch(
            requests(1), "b"
        )
    assert calls["n"] == 1


def test_malformed_response_fails_the_batch_with_names():
    def no_routes(request):
        payload = sglang_response(json.loads(request.content), SHAPE)[0]
        del payload["meta_info"]["routed_experts"]  # e.g. a gateway dropped return_routed_experts
        return httpx.Response(200, json=payload)

    with pytest.raises(RolloutProtocolError, match=r"'b/p0/s0'.*10\.0\.0\.1.*routed_experts"):
        client([A], routed({A: fake_sglang(SHAPE, generate=no_routes)})).generate_batch(
            requests(1), "b"
        )


def unreachable(request):
    raise httpx.ConnectError("connection refused", request=request)


def test_server_that_stays_down_is_reported_and_batch_continues(caplog):
    c = client([A, B], routed({A: fake_sglang(SHAPE), B: unreachable}), retries=2)
    with caplog.at_level(logging.ERROR):
        samples = c.generate_batch(requests(12), "s")
    assert len({s.request_id for s in samples}) == 12 and {s.server_url for s in samples} == {A}
    assert list(c.servers.down) == [B] and "ConnectError" in c.servers.down[B]
    assert c.last_batch_stats["servers_down"] == [B]
    assert any(B in r.getMessage() and "down" in r.getMessage() for r in caplog.records)


def slow_sglang(delay_s: float):
    fast = fake_sglang(SHAPE)

    async def handle(request):
        await asyncio.sleep(delay_s)
        return fast(request)

    return handle


def test_fail_policy_fails_the_batch_naming_the_server():
    # A answers slowly, so B is declared down (after its probes) while the batch runs.
    c = client(
        [A, B],
        routed({A: slow_sglang(0.05), B: unreachable}),
        on_server_failure="fail",
        concurrency=2,
    )
    with pytest.raises(RolloutServerError, match="rollout server down: http://10.0.0.2:30000"):
        c.generate_batch(requests(12), "s")


def test_no_server_left_fails_cleanly():
    with pytest.raises(
        RolloutServerError,
        match=r"all rollout servers are down: http://10.0.0.1:30000 \(ConnectError",
    ):
        client([A], routed({A: unreachable})).generate_batch(requests(3), "s")


def test_api_key_sent_as_bearer_token():
    headers = []

    def generate(request):
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json=sglang_response(json.loads(request.content), SHAPE)[0])

    client(
        [A], routed({A: fake_sglang(SHAPE, generate=generate)}), api_key="s3cret"
    ).generate_batch(requests(2), "s")
    assert headers == ["Bearer s3cret"] * 2


def test_start_up_check_reads_sglang_model_path(tmp_path):
    # Real SGLang reports only paths: the client reads config.json of the served directory.
    good = save_random_checkpoint(TINY, tmp_path / "good")
    bad = save_random_checkpoint(TINY.replace(moe_layer_freq="[0,0,1,1]"), tmp_path / "bad")
    info = client([A], routed({A: fake_sglang(SHAPE, model_path=str(good))})).connect()
    assert info[A]["model_path"] == str(good)
    with pytest.raises(
        RolloutServerError, match=r"10\.0\.0\.1.*moe_layers: \(1, 2, 3\) vs \(2, 3\)"
    ):
        client([A], routed({A: fake_sglang(SHAPE, model_path=str(bad))}), routes=False).connect()
    with pytest.raises(RolloutServerError, match="cannot verify the served model"):
        client([A], routed({A: fake_sglang(SHAPE, model_path="Qwen/Qwen3-30B-A3B")}),
               routes=False).connect()


def test_r3_refuses_a_server_without_routed_experts(tmp_path):
    path = str(save_random_checkpoint(TINY, tmp_path / "ckpt"))

    def no_routes(request):
        body = json.loads(request.content)
        body.pop("return_routed_experts")  # an SGLang that ignores the field
        return httpx.Response(200, json=sglang_response(body, SHAPE)[0])

    silent = fake_sglang(SHAPE, model_path=path, generate=no_routes)
    with pytest.raises(
        RolloutServerError, match=r"10\.0\.0\.1:30000: returns no usable routed experts"
    ):
        client([A], routed({A: silent})).connect()
    client([A], routed({A: silent}), routes=False).connect()  # fine without r3
    flagless = fake_sglang(SHAPE, model_path=path, enable_return_routed_experts=False)
    with pytest.raises(RolloutServerError, match="--enable-return-routed-experts"):
        client([A], routed({A: flagless})).connect()


def test_weight_update_reports_which_servers_failed():
    bodies = []

    def update_ok(request):
        if request.url.path == "/update_weights_from_disk":
            bodies.append(json.loads(request.content))
        return fake_sglang(SHAPE)(request)

    def update_refused(request):
        if request.url.path == "/update_weights_from_disk":
            return httpx.Response(
                400, json={"success": False, "message": "model_path does not exist"}
            )
        return fake_sglang(SHAPE)(request)

    c = client([A, B], routed({A: update_ok, B: update_refused}))
    with pytest.raises(
        RolloutServerError,
        match=r"failed on: http://10.0.0.2:30000 \(HTTP 400.*does not exist.*succeeded on: \['http://10.0.0.1:30000'\]",
    ):
        c.update_weights_from_disk("/ckpt/step4", "4")
    assert bodies == [{"model_path": "/ckpt/step4", "weight_version": "4", "flush_cache": True}]
    assert c.servers.weight_version is None
    c = client([A, B], routed({A: update_ok, B: update_ok}))
    c.update_weights_from_disk("/ckpt/step4", "4")
    assert c.servers.weight_version == "4"
    c.flush_cache()
    assert c.health() == {A: True, B: True}
    assert client([A], routed({A: unreachable})).health() == {A: False}


def test_samples_of_stale_weights_are_refused():
    stale = fake_sglang(SHAPE)  # answers with weight_version "default" whatever it was told
    c = client([A], routed({A: stale}))
    c.update_weights_from_disk("/ckpt/step9", "9")
    with pytest.raises(RolloutProtocolError, match=r"weight version 'default'.*updated to '9'"):
        c.generate_batch(requests(2), "s")


class RestartingServer:
    """Refuses connections once (a crash), then comes back with its initial weights."""

    def __init__(self):
        self.version, self.crashed, self.updates = "default", False, []

    def __call__(self, request):
        if not self.crashed:
            self.crashed = True
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path in ("/model_info", "/get_model_info"):
            return httpx.Response(200, json={"model_path": "/ckpt", "weight_version": self.version})
        if path == "/update_weights_from_disk":
            body = json.loads(request.content)
            self.updates.append(body["model_path"])
            self.version = body["weight_version"]
            return httpx.Response(200, json={"success": True})
        if path == "/generate":
            body = json.loads(request.content)
            return httpx.Response(
                200, json=sglang_response(body, SHAPE, weight_version=self.version)[0]
            )
        return fake_sglang(SHAPE)(request)


def test_restarted_server_gets_the_synced_weights_back():
    server = RestartingServer()
    c = client([A], routed({A: server}), retries=3)
    c.servers.note_weights("7", "/ckpt/step7")
    samples = c.generate_batch(requests(4), "s")
    assert server.updates == ["/ckpt/step7"] and {s.weight_version for s in samples} == {"7"}


def test_restarted_server_without_a_checkpoint_to_reload_is_kept_out():
    server = RestartingServer()

    def current(request):  # B holds the broadcast weights
        body = json.loads(request.content)
        return httpx.Response(200, json=sglang_response(body, SHAPE, weight_version="9")[0])

    c = client([A, B], routed({A: server, B: fake_sglang(SHAPE, generate=current)}), retries=2)
    c.servers.note_weights("9")  # pushed by NCCL broadcast: no checkpoint to reload
    samples = c.generate_batch(requests(6), "s")
    assert {s.server_url for s in samples} == {B} and server.updates == []
    assert list(c.servers.down) == [A]


def test_high_concurrency_spreads_over_small_pools_without_limiting_it(monkeypatch):
    in_flight, peak = 0, 0

    async def generate(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=sglang_response(json.loads(request.content), SHAPE)[0])

    created = []
    original = HttpTransport.client

    def counting_client(self, in_flight=None):
        created.append(in_flight)
        return original(self, in_flight)

    monkeypatch.setattr(HttpTransport, "client", counting_client)
    other = fake_sglang(SHAPE)

    async def handle(request):
        return await generate(request) if request.url.path == "/generate" else other(request)

    batch = requests(100)
    samples = client([A], httpx.MockTransport(handle), concurrency=64).generate_batch(
        batch, "wide")
    assert [s.request_id for s in samples] == [f"wide/p{i // 4}/s{i % 4}" for i in range(100)]
    # 64 in flight over 4 pools of 16 (each with room for twice its share); the
    # concurrency itself is kept.
    assert created == [32, 32, 32, 32]
    assert 16 < peak <= 64


def test_group_goes_as_one_batched_request_with_a_seed_per_sample():
    bodies = []

    def generate(request):
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=answer(body, SHAPE))

    batch = requests(12, group=4)
    c = client([A], routed({A: fake_sglang(SHAPE, generate=generate)}), group_requests=True)
    samples = c.generate_batch(batch, "g")
    assert len(bodies) == 3, "one /generate per prompt"
    assert bodies[1]["rid"] == [f"g/p1/s{j}" for j in range(4)]
    assert bodies[1]["input_ids"] == [batch[4 + j].prompt_ids for j in range(4)]
    assert [p["sampling_seed"] for p in bodies[1]["sampling_params"]] == [
        sample_seed(1234, f"g/p1/s{j}") for j in range(4)
    ]
    assert bodies[1]["return_routed_experts"] is True and bodies[1]["return_logprob"] is True
    # The same samples as one request per sample: the grouping changes nothing downstream.
    single = client([A], routed({A: fake_sglang(SHAPE)})).generate_batch(batch, "g")
    for grouped, alone in zip(samples, single, strict=True):
        assert grouped.request_id == alone.request_id
        assert grouped.response_ids == alone.response_ids
        assert torch.equal(grouped.rollout_logprobs, alone.rollout_logprobs)
        assert torch.equal(grouped.routes, alone.routes)


def test_group_is_retried_whole_and_each_sample_kept_once():
    calls = Counter()

    def flaky(request):
        body = json.loads(request.content)
        calls[sample_id(body["rid"][0])] += 1
        payload = answer(body, SHAPE)
        if body["rid"][0] == "g/p0/s0" and calls["g/p0/s0"] == 1:
            payload[2]["meta_info"]["finish_reason"] = {"type": "abort", "message": "retracted"}
        return httpx.Response(200, json=payload)

    c = client([A], routed({A: fake_sglang(SHAPE, generate=flaky)}), group_requests=True)
    samples = c.generate_batch(requests(8, group=4), "g")
    assert sorted(s.request_id for s in samples) == sorted(
        f"g/p{i}/s{j}" for i in range(2) for j in range(4)
    )
    assert calls == {"g/p0/s0": 2, "g/p1/s0": 1} and c.last_batch_stats["retries"] == 1


def test_batch_answer_of_the_wrong_length_names_the_group():
    def short(request):
        return httpx.Response(200, json=answer(json.loads(request.content), SHAPE)[:3])

    c = client([A], routed({A: fake_sglang(SHAPE, generate=short)}), group_requests=True)
    with pytest.raises(
        RolloutProtocolError,
        match=r"'b/p0/s0 \(and 3 more of its group\)'.*batched /generate of 4 sequences was "
              r"answered with a list of 3",
    ):
        c.generate_batch(requests(4, group=4), "b")


def test_concurrency_counts_samples_not_requests():
    in_flight, peak = 0, 0

    async def generate(request):
        nonlocal in_flight, peak
        parts = split_batch(json.loads(request.content))
        in_flight += len(parts)
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= len(parts)
        return httpx.Response(200, json=answer(json.loads(request.content), SHAPE))

    other = fake_sglang(SHAPE)

    async def handle(request):
        return await generate(request) if request.url.path == "/generate" else other(request)

    c = client([A], httpx.MockTransport(handle), concurrency=8, group_requests=True)
    assert len(c.generate_batch(requests(40, group=4), "c")) == 40
    assert peak == 8, "two groups of 4 at a time"
    # A group larger than the concurrency still goes, alone.
    c = client([A], httpx.MockTransport(handle), concurrency=3, group_requests=True)
    peak = 0
    assert len(c.generate_batch(requests(8, group=4), "d")) == 8
    assert peak == 4


def test_retry_after_a_timeout_gets_a_fresh_rid_and_keeps_the_seed():
    seen = []

    def generate(request):
        body = json.loads(request.content)
        seen.append((body["rid"], body["sampling_params"]["sampling_seed"]))
        if len(seen) == 1:  # the client gives up; SGLang keeps the rid registered
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json=sglang_response(body, SHAPE)[0])

    server = fake_sglang(SHAPE, generate=generate)
    samples = client([A], routed({A: server})).generate_batch(requests(1), "t")
    seed = sample_seed(1234, "t/p0/s0")
    assert seen == [("t/p0/s0", seed), ("t/p0/s0#retry1", seed)]
    assert samples[0].request_id == "t/p0/s0" and server.in_flight == {"t/p0/s0"}
    # What the old client did -- the same rid again -- is what SGLang refuses.
    again = httpx.Request("POST", f"{A}/generate", json={"rid": "t/p0/s0", "input_ids": [1]})
    refused = server(again)
    assert refused.status_code == 400 and "Duplicate request ID" in refused.text


def test_timeout_is_sized_for_long_responses():
    from megatron_rl.rollout.config import RolloutConfig

    assert RolloutConfig(timeout_s=600, max_new_tokens=256).generate_timeout_s == 600
    assert RolloutConfig(timeout_s=600, max_new_tokens=32768).generate_timeout_s == pytest.approx(
        0.05 * 32768)
    made = RolloutClient(RolloutConfig(urls=(A,), max_new_tokens=32768), SHAPE)
    assert made.core.transport.client().timeout.read == pytest.approx(1638.4)


R = "http://10.0.0.9:30000"


def fake_router(workers: dict[str, object]):
    """sglang-router 0.3.2 as probed: /workers lists the workers; /generate (one sequence,
    without return_routed_experts), /health, /get_model_info, /get_server_info and
    /flush_cache are forwarded or answered; weight updates and /model_info are 404."""
    turn = Counter()

    def handle(request):
        path = request.url.path
        urls = list(workers)
        if path == "/workers":
            return httpx.Response(200, json={"workers": [
                {"url": u, "is_healthy": True, "model_id": "m"} for u in urls]})
        if path == "/get_server_info":
            return httpx.Response(200, json={"router_manager": True, "workers_count": len(urls)})
        if path in ("/health", "/get_model_info", "/generate"):
            if path == "/generate":
                body = json.loads(request.content)
                if isinstance(body.get("rid"), list):
                    return httpx.Response(422, text="rid: invalid type: sequence")
                body.pop("return_routed_experts", None)
                request = httpx.Request("POST", request.url, json=body)
            turn["n"] += 1
            return workers[urls[turn["n"] % len(urls)]](request)
        return httpx.Response(404)

    return handle


def test_router_without_workers_is_refused_naming_the_workers_it_lists(tmp_path):
    path = str(save_random_checkpoint(TINY, tmp_path / "ckpt"))
    fakes = {A: fake_sglang(SHAPE, model_path=path), B: fake_sglang(SHAPE, model_path=path)}
    handlers = {R: fake_router(fakes), **fakes}
    with pytest.raises(RolloutServerError,
                       match=rf"{R} is an sglang-router.*add --rl-rollout-worker-urls.*"
                             rf"routes to {A} {B}"):
        client([R], routed(handlers), routes=False).connect()
    # r3 through the router: the router drops return_routed_experts, and the error says so.
    with pytest.raises(RolloutServerError, match="sglang-router, which drops the request's "
                                                 "return_routed_experts"):
        client([R], routed(handlers), worker_urls=(A, B)).connect()


def test_router_gets_generate_and_workers_get_control_calls(tmp_path):
    path = str(save_random_checkpoint(TINY, tmp_path / "ckpt"))
    calls = Counter()

    def worker(url):
        fake = fake_sglang(SHAPE, model_path=path)

        def handle(request):
            calls[(url, request.url.path)] += 1
            return fake(request)

        handle.fake = fake
        return handle

    workers = {A: worker(A), B: worker(B)}
    c = RolloutClient(RolloutConfig(urls=(R,), worker_urls=(A, B), max_new_tokens=3, progress=False),
                      SHAPE, network=routed({R: fake_router(workers), **workers}))
    info = c.connect()
    assert c.servers.routers == [R] and sorted(info) == [A, B, R]
    samples = c.generate_batch(requests(8), "r")  # grouped by default; one per sample here
    assert len({s.request_id for s in samples}) == 8
    assert calls[(A, "/generate")] + calls[(B, "/generate")] == 8
    c.update_weights_from_disk("/ckpt/v1", "1")
    c.flush_cache()
    for url in (A, B):
        assert calls[(url, "/update_weights_from_disk")] == calls[(url, "/flush_cache")] == 1
    # The workers are asked by the current names; only the router, which knows the old
    # name alone, passes one /get_model_info on to a worker.
    assert workers[A].fake.deprecated_calls + workers[B].fake.deprecated_calls == [
        "/get_model_info"]


def test_worker_that_a_control_call_cannot_reach_is_declared_down_per_policy(caplog):
    def dies(request):
        if request.url.path == "/update_weights_from_disk" or request.url.path == "/health":
            raise httpx.ConnectError("connection refused", request=request)
        return fake_sglang(SHAPE)(request)

    handlers = {R: fake_router({A: fake_sglang(SHAPE)}), A: fake_sglang(SHAPE), B: dies}
    c = client([R], routed(handlers), worker_urls=(A, B))
    with caplog.at_level(logging.ERROR):
        c.update_weights_from_disk("/ckpt/v2", "2")
    assert list(c.servers.down) == [B] and c.servers.weight_version == "2"
    assert any(B in r.getMessage() and "down" in r.getMessage() for r in caplog.records)
    c.update_weights_from_disk("/ckpt/v3", "3")  # skips B at once
    strict = client([R], routed(handlers), worker_urls=(A, B), on_server_failure="fail")
    with pytest.raises(RolloutServerError, match=rf"failed on: {B} \(ConnectError.*succeeded on: "
                                                 rf"\['{A}'\]"):
        strict.update_weights_from_disk("/ckpt/v2", "2")


def test_servers_are_awaited_until_ready_and_those_never_ready_are_named():
    health_calls = Counter()

    def late(request):
        if request.url.path == "/health":
            health_calls["late"] += 1
            if health_calls["late"] < 3:
                raise httpx.ConnectError("connection refused", request=request)
        return fake_sglang(SHAPE, model_path="/x")(request)

    def never(request):
        raise httpx.ConnectError("connection refused", request=request)

    model_shape = {"model_shape": SHAPE.to_dict()}

    def with_shape(handler):
        def handle(request):
            if request.url.path == "/model_info":
                return httpx.Response(200, json={"is_generation": True, **model_shape})
            return handler(request)
        return handle

    c = client([A], routed({A: with_shape(late)}), routes=False, startup_timeout_s=10)
    c.connect()
    assert health_calls["late"] == 3
    c = client([A, B], routed({A: with_shape(fake_sglang(SHAPE)), B: never}), routes=False,
               startup_timeout_s=1)
    with pytest.raises(RolloutServerError, match=rf"not ready after 1 s.*{B} \(ConnectError") as err:
        c.connect()
    assert A not in str(err.value)


def test_older_servers_answer_the_deprecated_info_endpoints(tmp_path):
    path = str(save_random_checkpoint(TINY, tmp_path / "ckpt"))
    fake = fake_sglang(SHAPE, model_path=path)

    def old(request):
        if request.url.path in ("/model_info", "/server_info"):
            return httpx.Response(404)
        return fake(request)

    info = client([A], routed({A: old})).connect()
    assert info[A]["model_path"] == path
    assert fake.deprecated_calls == ["/get_model_info", "/get_server_info"]


def test_logprob_temperature_is_checked_where_the_server_tells(tmp_path, caplog):
    path = str(save_random_checkpoint(TINY, tmp_path / "ckpt"))

    def at(temperature, **info):
        return RolloutClient(RolloutConfig(urls=(A,), temperature=temperature), SHAPE,
                             network=routed({A: fake_sglang(SHAPE, model_path=path, **info)}))

    with pytest.raises(RolloutServerError, match=r"temperature 1 \(return_original_logprob\).*"
                                                 r"--rl-temperature 0.7"):
        at(0.7, return_original_logprob=True).connect()
    at(1.0, return_original_logprob=True).connect()  # the same distribution
    at(0.7, return_original_logprob=False).connect()
    with caplog.at_level(logging.WARNING):
        at(0.7).connect()  # SGLang: /server_info cannot tell
    assert any("SGLANG_RETURN_ORIGINAL_LOGPROB" in r.getMessage() and A in r.getMessage()
               for r in caplog.records)
