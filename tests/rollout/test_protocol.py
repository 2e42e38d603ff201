"""SGLang wire format: requests built right, responses decoded, malformed ones refused
with an error naming the request and the server."""

from __future__ import annotations

import base64
import copy
import math

import pytest
import torch
from fake_sglang import sglang_response

from megatron_rl.model.config import preset
from megatron_rl.rollout.protocol import (
    RolloutAbortedError,
    RolloutProtocolError,
    SamplingParams,
    build_generate_request,
    decode_generate_response,
    decode_routed_experts,
    encode_routed_experts,
)
from megatron_rl.weight_sync.hf_config import ModelShape

URL = "http://10.1.2.3:30000"
SHAPE = ModelShape.from_model_config(preset("tiny"))  # 4 layers, layer 0 dense, 16 experts, top-4


def request(return_routed_experts: bool = True, prompt_len: int = 5, new: int = 4) -> dict:
    return build_generate_request(
        rid="step3/p1/s2",
        input_ids=list(range(10, 10 + prompt_len)),
        sampling=SamplingParams(
            temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=new, stop_token_ids=(3,)
        ),
        sampling_seed=77,
        return_routed_experts=return_routed_experts,
    )


def test_request_uses_sglang_field_names():
    body = request()
    assert body["rid"] == "step3/p1/s2"
    assert body["input_ids"] == [10, 11, 12, 13, 14]
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1
    assert body["return_routed_experts"] is True
    params = body["sampling_params"]
    assert params == {
        "temperature": 0.8, "top_p": 0.9, "top_k": 20, "max_new_tokens": 4, "ignore_eos": False,
        "n": 1, "stop_token_ids": [3], "sampling_seed": 77,
    }  # fmt: skip
    assert "return_routed_experts" not in request(return_routed_experts=False)


@pytest.mark.parametrize("routes_format", ["base64", "json"])
def test_decode_keeps_moe_layers_in_compact_dtype(routes_format):
    body = request()
    payload, all_routes = sglang_response(
        body, SHAPE, routes_format=routes_format, weight_version="v7"
    )
    decoded = decode_generate_response(payload, request=body, shape=SHAPE, server_url=URL)
    assert decoded.output_ids == payload["output_ids"]
    expected_lp = torch.tensor([e[0] for e in payload["meta_info"]["output_token_logprobs"]])
    assert decoded.logprobs.dtype == torch.float32
    torch.testing.assert_close(decoded.logprobs, expected_lp)
    assert decoded.routes.shape == (5 + 4 - 1, 3, 4)
    assert decoded.routes.dtype == torch.uint8
    assert torch.equal(decoded.routes.long(), all_routes[:, [1, 2, 3]].long())
    assert decoded.weight_version == "v7" and decoded.finish_reason == "length"
    assert (decoded.prompt_tokens, decoded.completion_tokens) == (5, 4)


def test_base64_is_little_endian_int32_in_c_order():
    routes = torch.arange(2 * 3 * 2, dtype=torch.int32).view(2, 3, 2) + 256
    raw = base64.b64decode(encode_routed_experts(routes))
    assert raw[:8] == bytes([0, 1, 0, 0, 1, 1, 0, 0])  # 256, 257 little-endian
    assert len(raw) == routes.numel() * 4


def test_response_without_routes_when_not_requested():
    body = request(return_routed_experts=False)
    payload, _ = sglang_response(body, SHAPE)
    assert (
        decode_generate_response(payload, request=body, shape=SHAPE, server_url=URL).routes is None
    )


def test_prefill_only_response_routes_cover_prompt_minus_one():
    body = request(new=0)
    payload, routes = sglang_response(body, SHAPE)
    decoded = decode_generate_response(payload, request=body, shape=SHAPE, server_url=URL)
    assert decoded.output_ids == [] and decoded.routes.shape == (4, 3, 4)


def _set_route(payload, token, layer, slot, value):
    routes = torch.tensor(
        list(memoryview(base64.b64decode(payload["meta_info"]["routed_experts"])).cast("i"))
    ).view(-1, SHAPE.num_hidden_layers, SHAPE.num_experts_per_tok)
    routes[token, layer, slot] = value
    payload["meta_info"]["routed_experts"] = encode_routed_experts(routes)


def _mutations():
    def meta(p):
        return p["meta_info"]

    return {
        "truncated base64": (lambda p: meta(p).update(routed_experts=meta(p)["routed_experts"][:-7]), "base64"),
        "payload short by four values": (
            lambda p: meta(p).update(routed_experts=base64.b64encode(
                base64.b64decode(meta(p)["routed_experts"])[:-16]).decode()), "124 int32 values, expected 128"),
        "base64 of one token too many": (
            lambda p: meta(p).update(routed_experts=encode_routed_experts(torch.zeros(9, 4, 4, dtype=torch.int32))),
            "expected 128"),
        "bytes not a multiple of 4": (
            lambda p: meta(p).update(routed_experts=base64.b64encode(b"\x01\x02\x03").decode()), "whole number"),
        "expert id out of range": (lambda p: _set_route(p, 2, 1, 0, 16), "out of range"),
        "negative expert id": (lambda p: _set_route(p, 0, 3, 3, -1), "out of range"),
        "dense layer not zero": (lambda p: _set_route(p, 0, 0, 0, 5), "dense layer 0"),
        "duplicate expert ids": (lambda p: [_set_route(p, 1, 2, s, 7) for s in (0, 1)], "duplicate"),
        "routed experts missing": (lambda p: meta(p).pop("routed_experts"), "enable-return-routed-experts"),
        "routed experts of wrong type": (lambda p: meta(p).update(routed_experts=12), "base64 string"),
        "json lists of wrong shape": (lambda p: meta(p).update(routed_experts=[[[1, 2, 3, 4]] * 4] * 7), "shape"),
        "ragged json lists": (lambda p: meta(p).update(routed_experts=[[[1, 2]], [[1, 2, 3]]]), "routed_experts"),
        "json lists of floats": (
            lambda p: meta(p).update(routed_experts=[[[0.5] * 4] * 4] * 8), "not integer"),
        "meta_info missing": (lambda p: p.pop("meta_info"), "missing field meta_info"),
        "output_ids missing": (lambda p: p.pop("output_ids"), "missing field output_ids"),
        "logprobs missing": (lambda p: meta(p).pop("output_token_logprobs"), "output_token_logprobs"),
        "logprobs shorter than output": (
            lambda p: meta(p)["output_token_logprobs"].pop(), "3 output_token_logprobs for 4 output_ids"),
        "logprob for another token": (
            lambda p: meta(p)["output_token_logprobs"][1].__setitem__(1, -1), "is for token"),
        "nan logprob": (lambda p: meta(p)["output_token_logprobs"][0].__setitem__(0, math.nan), "finite"),
        "positive logprob": (lambda p: meta(p)["output_token_logprobs"][0].__setitem__(0, 0.5), "positive"),
        "output id out of vocab": (lambda p: p["output_ids"].__setitem__(0, 128), "vocabulary"),
        "more tokens than max_new_tokens": (
            lambda p: (p["output_ids"].append(5), meta(p)["output_token_logprobs"].append([-1.0, 5, None])),
            "exceed max_new_tokens"),
        "unknown finish reason": (lambda p: meta(p).update(finish_reason={"type": "done"}), "finish_reason"),
        "answer to another request": (lambda p: meta(p).update(id="step3/p0/s0"), "another request"),
        "completion_tokens mismatch": (lambda p: meta(p).update(completion_tokens=9), "completion_tokens"),
        "prompt_tokens mismatch": (lambda p: meta(p).update(prompt_tokens=2), "prompt_tokens"),
        "not an object": (lambda p: p.clear(), "missing field"),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_malformed_response_names_request_and_server(case):
    mutate, phrase = _mutations()[case]
    body = request()
    payload, _ = sglang_response(body, SHAPE)
    payload = copy.deepcopy(payload)
    mutate(payload)
    with pytest.raises(RolloutProtocolError) as info:
        decode_generate_response(payload, request=body, shape=SHAPE, server_url=URL)
    message = str(info.value)
    assert "'step3/p1/s2'" in message and URL in message, message
    assert phrase in message, message
    assert info.value.rid == "step3/p1/s2" and info.value.server_url == URL


def test_aborted_request_is_a_retryable_error():
    body = request()
    payload, _ = sglang_response(body, SHAPE)
    payload["meta_info"]["finish_reason"] = {"type": "abort", "message": "server shutting down"}
    with pytest.raises(RolloutAbortedError, match="server shutting down"):
        decode_generate_response(payload, request=body, shape=SHAPE, server_url=URL)


def test_layer_layout_must_match_all_hidden_layers():
    # A server that counted only the MoE layers would send 3 layers instead of 4.
    routes = torch.stack([torch.randperm(16)[:4] for _ in range(8 * 3)]).view(8, 3, 4).int()
    with pytest.raises(RolloutProtocolError, match="expected 128"):
        decode_routed_experts(
            encode_routed_experts(routes), num_tokens=8, shape=SHAPE, rid="r", server_url=URL
        )
