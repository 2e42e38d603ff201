"""Client and embedded server together over real HTTP on localhost."""

from __future__ import annotations

import json

import httpx
import psutil
import pytest
import torch
from rollout_env import API_KEY

from megatron_rl.rollout.client import RolloutClient, RolloutRequest
from megatron_rl.rollout.config import API_KEY_ENV, RolloutConfig
from megatron_rl.rollout.protocol import RolloutServerError
from megatron_rl.weight_sync.hf_config import ModelShape

AUTH = {"Authorization": f"Bearer {API_KEY}"}

pytestmark = pytest.mark.slow  # talks to server processes


def make_client(url: str, model_config, *, routes: bool = True, **fields) -> RolloutClient:
    """A client of ``url``; ``fields`` of its RolloutConfig."""
    fields.setdefault("api_key", API_KEY)
    config = RolloutConfig(urls=(url,), max_new_tokens=8, retry_backoff_s=0.1, progress=False,
                           **fields)
    return RolloutClient(config, ModelShape.from_model_config(model_config),
                         return_routed_experts=routes)


def batch(num_prompts: int = 4, group: int = 2) -> list[RolloutRequest]:
    g = torch.Generator().manual_seed(11)
    out = []
    for p in range(num_prompts):
        ids = torch.randint(4, 128, (3 + 2 * p,), generator=g).tolist()
        out += [
            RolloutRequest(prompt_index=p, sample_index=s, prompt_ids=ids) for s in range(group)
        ]
    return out


def post(url: str, body, headers=AUTH) -> httpx.Response:
    # json.dumps writes NaN and Infinity as Python's json.loads (and so the server) reads them.
    return httpx.post(f"{url}/generate", content=json.dumps(body),
                      headers={**headers, "Content-Type": "application/json"}, timeout=60)  # fmt: skip


def error_message(response: httpx.Response) -> str:
    """The message of either of SGLang's error bodies: ``ErrorResponse`` for a request that
    does not validate, ``{"error": {"message": ...}}`` for the others."""
    body = response.json()
    if body.get("object") == "error":
        assert body["code"] == response.status_code and body["type"] == "Bad Request", body
        return body["message"]
    assert set(body) == {"error"} and set(body["error"]) == {"message"}, body
    return body["error"]["message"]


def test_start_up_checks(servers, tiny):
    url = servers.main.url
    info = make_client(url, tiny).connect()
    assert info[url]["model_shape"]["moe_layers"] == [1, 2, 3]
    for other, field in ((tiny.replace(num_experts=8), "num_experts: 8 vs 16"),
                         (tiny.replace(vocab_size=256), "vocab_size: 256 vs 128"),
                         (tiny.replace(moe_router_topk=2), "num_experts_per_tok: 2 vs 4")):  # fmt: skip
        with pytest.raises(
            RolloutServerError, match=f"{url}: served model does not match.*{field}"
        ):
            make_client(url, other, routes=False).connect()


def test_rollout_logprobs_and_routes_are_the_models(servers, tiny, reference):
    client = make_client(servers.main.url, tiny)
    samples = client.generate_batch(batch(), "step1")
    version = httpx.get(f"{servers.main.url}/get_model_info", headers=AUTH).json()["weight_version"]
    assert len(samples) == 8 and len({s.request_id for s in samples}) == 8
    for s in samples:
        assert s.server_url == servers.main.url and s.weight_version == version
        assert s.completion_tokens == len(s.response_ids) > 0 and s.prompt_tokens == len(
            s.prompt_ids
        )
        ids = s.prompt_ids + s.response_ids
        logits, routes = reference(ids[:-1])
        p = len(s.prompt_ids)
        expected = torch.log_softmax(logits[p - 1 :], -1).gather(
            -1, torch.tensor(s.response_ids)[:, None]
        )[:, 0]
        torch.testing.assert_close(s.rollout_logprobs, expected, atol=1e-5, rtol=0)
        assert s.routes.dtype == torch.uint8 and s.routes.shape == (len(ids) - 1, 3, 4)
        assert torch.equal(s.routes.long(), routes.long())
    # The two samples of a prompt have their own seeds.
    assert samples[0].response_ids != samples[1].response_ids


def test_seeds_reproduce_across_runs(servers, tiny):
    client = make_client(servers.main.url, tiny)
    first = client.generate_batch(batch(2), "step7")
    again = client.generate_batch(batch(2), "step7")
    later = client.generate_batch(batch(2), "step8")
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert [s.response_ids for s in first] != [s.response_ids for s in later]


def test_http_batch_and_n_equal_single_requests(servers):
    url = servers.main.url
    prompts = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [20]]
    params = {"max_new_tokens": 6, "sampling_seed": 42}
    common = {"return_logprob": True, "return_routed_experts": True}
    joint = post(
        url, {"input_ids": prompts, "rid": ["a", "b", "c"], "sampling_params": params, **common}
    ).json()
    assert [r["meta_info"]["id"] for r in joint] == ["a", "b", "c"]
    for prompt, together in zip(prompts, joint, strict=True):
        alone = post(url, {"input_ids": prompt, "sampling_params": params, **common}).json()
        assert together["output_ids"] == alone["output_ids"]
        assert (
            together["meta_info"]["output_token_logprobs"]
            == alone["meta_info"]["output_token_logprobs"]
        )
        assert together["meta_info"]["routed_experts"] == alone["meta_info"]["routed_experts"]
    copies = post(
        url, {"input_ids": prompts[0], "rid": "n", "sampling_params": {**params, "n": 2}}
    ).json()
    assert [c["meta_info"]["id"] for c in copies] == ["n-0", "n-1"]
    assert copies[0]["output_ids"] == joint[0]["output_ids"] != copies[1]["output_ids"]
    text = post(url, {"text": "1+1=", "sampling_params": {"max_new_tokens": 2}}).json()
    assert text["meta_info"]["prompt_tokens"] == 4 and isinstance(text["text"], str)


BAD_REQUESTS = {
    "token id out of vocabulary": ({"input_ids": [1, 2, 500]}, "outside the vocabulary"),
    "negative token id": ({"input_ids": [-1]}, "outside the vocabulary"),
    "input_ids of strings": ({"input_ids": ["a", "b"]}, "input_ids"),
    "input_ids of floats": ({"input_ids": [1.5, 2]}, "input_ids"),
    "empty input_ids": ({"input_ids": []}, "empty"),
    "over-long prompt": ({"input_ids": [5] * 5000}, "context length"),
    "negative max_new_tokens": (
        {"input_ids": [5], "sampling_params": {"max_new_tokens": -3}},
        "max_new_tokens",
    ),
    "max_new_tokens as a string": (
        {"input_ids": [5], "sampling_params": {"max_new_tokens": "8"}},
        "max_new_tokens",
    ),
    "boolean temperature": (
        {"input_ids": [5], "sampling_params": {"temperature": True}},
        "temperature",
    ),
    "negative temperature": (
        {"input_ids": [5], "sampling_params": {"temperature": -1.0}},
        "temperature",
    ),
    "top_k zero": ({"input_ids": [5], "sampling_params": {"top_k": 0}}, "top_k"),
    "top_p above one": ({"input_ids": [5], "sampling_params": {"top_p": 1.5}}, "top_p"),
    "unknown sampling parameter": (
        {"input_ids": [5], "sampling_params": {"temprature": 1.0}},
        "temprature",
    ),
    "unsupported penalty": (
        {"input_ids": [5], "sampling_params": {"repetition_penalty": 1.3}},
        "repetition_penalty",
    ),
    "n of zero": ({"input_ids": [5], "sampling_params": {"n": 0}}, ".n: Input should be greater"),
    "n of a million": (
        {"input_ids": [5], "sampling_params": {"n": 10**6}},
        "asks for 1000000 sequences",
    ),
    "a thousand prompts times n": (
        {"input_ids": [[5]] * 1000, "sampling_params": {"n": 8}},
        "--max-queued-requests",
    ),
    "temperature NaN": (
        {"input_ids": [5], "sampling_params": {"temperature": float("nan")}},
        "temperature",
    ),
    "temperature infinite": (
        {"input_ids": [5], "sampling_params": {"temperature": float("inf")}},
        "temperature",
    ),
    "top_p NaN": ({"input_ids": [5], "sampling_params": {"top_p": float("nan")}}, "top_p"),
    "top_k 2**63": ({"input_ids": [5], "sampling_params": {"top_k": 2**63}}, "top_k"),
    "max_new_tokens 2**70": (
        {"input_ids": [5], "sampling_params": {"max_new_tokens": 2**70}},
        "max_new_tokens",
    ),
    "sampling_seed 2**80": (
        {"input_ids": [5], "sampling_params": {"sampling_seed": 2**80}},
        "sampling_seed",
    ),
    "logprob_start_len huge": ({"input_ids": [5], "logprob_start_len": 2**63}, "logprob_start_len"),
    "rid list of wrong length": (
        {"input_ids": [[5], [6]], "rid": ["x"]},
        "rid has 1 entries for 2 prompts",
    ),
    "both text and input_ids": ({"input_ids": [5], "text": "a"}, "exactly one"),
    "neither text nor input_ids": ({"sampling_params": {}}, "exactly one"),
    "streaming": ({"input_ids": [5], "stream": True}, "stream"),
    "return_routed_experts as a string": (
        {"input_ids": [5], "return_routed_experts": "yes"},
        "return_routed_experts",
    ),
    "body not an object": ([1, 2, 3], "invalid request"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_400_json(servers, case):
    body, phrase = BAD_REQUESTS[case]
    response = post(servers.main.url, body)
    assert response.status_code == 400, response.text
    assert phrase in error_message(response)


def test_malformed_json_and_server_survives(servers):
    url = servers.main.url
    response = httpx.post(f"{url}/generate", content=b'{"input_ids": [1, 2', headers=AUTH)
    assert response.status_code == 400 and error_message(response)
    assert httpx.get(f"{url}/health", headers=AUTH).status_code == 200
    assert (
        post(url, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}).status_code
        == 200
    )


def test_api_key_is_required_everywhere(servers, tiny, tmp_path, monkeypatch):
    url = servers.main.url
    calls = [("GET", "/health"), ("GET", "/get_model_info"), ("GET", "/get_server_info"),
             ("POST", "/generate"), ("POST", "/flush_cache"), ("POST", "/update_weights_from_disk"),
             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no-such-path")]  # fmt: skip
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in calls:
            response = httpx.request(
                method, f"{url}{path}", headers=headers, json={"input_ids": [5]}
            )
            assert response.status_code == 401, (headers, path)
            assert "API key" in error_message(response)
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).json()["paths"]["/generate"]
    # The launcher passes the key through the environment, never on the command line.
    assert API_KEY not in " ".join(psutil.Process(servers.main.pid).cmdline())
    assert httpx.get(f"{url}/get_server_info", headers=AUTH).json()["api_key_required"] is True
    with pytest.raises(RolloutServerError, match="401"):
        make_client(url, tiny, routes=False, api_key="wrong").connect()
    # The trainer's key without a command line: from the environment, or from a file
    # (which comes before the environment).
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    make_client(url, tiny, routes=False, api_key=None).connect()
    key_file = tmp_path / "rollout.key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv(API_KEY_ENV, "wrong")
    make_client(url, tiny, routes=False, api_key=None, api_key_file=str(key_file)).connect()
    with pytest.raises(RolloutServerError, match="401"):
        make_client(url, tiny, routes=False, api_key=None).connect()


def test_weight_update_from_disk(servers, tiny, checkpoints):
    url = servers.main.url
    client = make_client(url, tiny)
    before = client.generate_batch(batch(2), "w")
    try:
        client.update_weights_from_disk(str(checkpoints.other_weights), "v1")
        assert httpx.get(f"{url}/get_model_info", headers=AUTH).json()["weight_version"] == "v1"
        after = client.generate_batch(batch(2), "w")
        assert all(s.weight_version == "v1" for s in after)
        assert [s.response_ids for s in after] != [s.response_ids for s in before]
        assert not any(
            torch.equal(a.rollout_logprobs[:1], b.rollout_logprobs[:1])
            for a, b in zip(after, before, strict=True)
        )

        refusals = ((checkpoints.main.parent / "missing", "no config.json"),
                    (checkpoints.other_shape, "another shape: num_experts: 8 \\(served: 16\\)"))  # fmt: skip
        for path, phrase in refusals:
            with pytest.raises(RolloutServerError, match=f"failed on: {url} \\(HTTP 400.*{phrase}"):
                client.update_weights_from_disk(str(path), "v2")
            assert client.servers.weight_version == "v1"
            still = client.generate_batch(batch(2), "w")  # the v1 weights keep serving
            assert [s.response_ids for s in still] == [s.response_ids for s in after]
            assert {s.weight_version for s in still} == {"v1"}
        assert httpx.post(f"{url}/flush_cache", headers=AUTH).json()["success"] is True
    finally:
        client.update_weights_from_disk(str(checkpoints.main), "restored")
    assert [s.response_ids for s in client.generate_batch(batch(2), "w")] == [
        s.response_ids for s in before
    ]
