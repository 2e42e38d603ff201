"""FP8 rollouts (``--quantization fp8``): the quantizer's error bounds and scales, which
modules stay bf16, weight updates into FP8, FP8 disagreeing with fp32 more than bf16, and
one real server generating with routes."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from megatron_rl.inference import fp8
from megatron_rl.inference.engine import GenerationEngine, GenerationRequest
from megatron_rl.inference.hf_model import WeightUpdateError, load_model
from megatron_rl.inference.launcher import start_server_process
from megatron_rl.inference.weight_update import DistributedUpdates
from megatron_rl.rollout.protocol import decode_routed_experts
from megatron_rl.weight_sync.hf_config import ModelShape

E4M3_HALF_ULP = 2.0**-4
"""Round to nearest with 3 mantissa bits: relative error at most 2^-4 for normal values."""
E4M3_MIN_NORMAL = 2.0**-6


def _random_weight(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, as trained weights have: per-tensor scales lose them.
    rows = torch.logspace(-3, 1, shape[-2])[:, None]
    return torch.randn(*shape, generator=g) * rows


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_round_trip_error_is_e4m3_rounding_after_scaling(granularity):
    w = _random_weight(3, 260, 200)  # not whole 128-blocks: the edge blocks are partial
    codes, scale = fp8.quantize(w, granularity, (128, 128))
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    expected_scale_shape = {"tensor": (3, 1, 1), "channel": (3, 260, 1), "block": (3, 3, 2)}
    assert tuple(scale.shape) == expected_scale_shape[granularity]
    full = fp8.expand_scale(scale, w.shape, granularity, (128, 128))
    back = fp8.dequantize(codes, scale, granularity, (128, 128), torch.float32)
    scaled = (w / full).abs()
    bound = torch.where(scaled >= E4M3_MIN_NORMAL, E4M3_HALF_ULP * scaled,
                        torch.full_like(scaled, 2.0**-10))  # subnormal spacing 2^-9, halved
    assert ((back - w).abs() / full <= bound * (1 + 1e-6)).all()
    assert ((back - w).abs() <= 2.0**-3 * w.abs() + 2.0**-10 * full).all()  # the bound
    # Deterministic, and each group's largest magnitude is exactly 448 x its scale.
    again = fp8.quantize(w, granularity, (128, 128))
    assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(again[1], scale)
    amax = fp8.group_amax(w.abs(), granularity, (128, 128))
    assert torch.equal(scale, amax / 448.0)
    assert torch.equal(fp8.group_amax(codes.float().abs(), granularity, (128, 128)),
                       torch.full_like(scale, 448.0))
    # Served weights loaded again (bf16, as the server holds them) keep every bit.
    w16 = w.bfloat16()
    codes, scale = fp8.quantize(w16, granularity, (128, 128))
    view = fp8.dequantize(codes, scale, granularity, (128, 128), torch.bfloat16)
    again = fp8.quantize(view, granularity, (128, 128))
    assert torch.equal(again[0].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(again[1], scale)


def test_block_scales_are_those_of_each_block():
    w = _random_weight(256, 256, seed=1)
    w[:128, 128:] *= 1000  # one block far larger: only its own scale may move
    _, scale = fp8.quantize(w, "block", (128, 128))
    for i in range(2):
        for j in range(2):
            block = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            assert scale[i, j] == block.abs().max() / 448.0
    zeros = fp8.quantize(torch.zeros(4, 4), "channel")
    assert torch.equal(zeros[0].float(), torch.zeros(4, 4)) and (zeros[1] > 0).all()


def test_per_token_activations_depend_on_their_own_row_only():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    alone = fp8.fake_quantize_tokens(x[2:3])
    x[0] *= 1e4
    assert torch.equal(fp8.fake_quantize_tokens(x)[2:3], alone)
    assert not torch.equal(alone, x[2:3])


@pytest.fixture(scope="module")
def models(checkpoints):
    """The same random checkpoint as fp32, bf16 and FP8 (bf16 compute)."""
    fp32 = load_model(str(checkpoints.main), torch.float32)
    bf16 = load_model(str(checkpoints.main), torch.bfloat16)
    quantized = load_model(str(checkpoints.main), torch.bfloat16)
    names = fp8.quantize_model(quantized, fp8.SCHEMES["fp8"])
    return fp32, bf16, quantized, names


def test_router_gates_embeddings_lm_head_and_norms_stay_bf16(models, tiny):
    fp32, bf16, quantized, names = models
    layers = tiny.num_layers
    expected = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkvo"}
    moe = ModelShape.from_hf_config(quantized.config).moe_layers
    expected |= {f"model.layers.{i}.mlp.experts" for i in moe}
    expected |= {f"model.layers.{i}.mlp.{p}_proj" for i in range(layers) if i not in moe
                 for p in ("gate", "up", "down")}  # dense layers: SGLang's linear layers
    assert set(names) == expected
    for name, module in quantized.named_modules():
        if name.endswith(("embed_tokens", "lm_head", "mlp.gate", "norm")):
            assert not isinstance(module, fp8._Fp8Weights), name
            assert all(p.dtype == torch.bfloat16 for p in module.parameters()), name
    assert isinstance(quantized.model.layers[moe[0]].mlp.experts, fp8.Fp8Experts)
    assert quantized.model.layers[moe[0]].mlp.experts.gate_up_proj_fp8.element_size() == 1
    # The HF state-dict interface is unchanged: same names, shapes, served dtype.
    ours, theirs = quantized.state_dict(), bf16.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
               for k in ours)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(ours[q], theirs[q])  # really rounded to FP8
    assert torch.equal(ours["model.layers.1.mlp.gate.weight"],
                       theirs["model.layers.1.mlp.gate.weight"])


def _token_logprobs(model: Qwen3MoeForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_fp8_disagrees_with_fp32_more_than_bf16(models):
    fp32, bf16, quantized, _ = models
    ids = torch.randint(4, fp32.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(3))
    reference = _token_logprobs(fp32, ids)
    gap_bf16 = (_token_logprobs(bf16, ids) - reference).abs().mean().item()
    gap_fp8 = (_token_logprobs(quantized, ids) - reference).abs().mean().item()
    assert 0 < gap_bf16 < gap_fp8, (gap_bf16, gap_fp8)


def _requests(n: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(rid=f"q{i}", input_ids=[5, 9, 11 + i, 7], max_new_tokens=6,
                              sampling_seed=40 + i, return_logprob=True,
                              return_routed_experts=True) for i in range(n)]  # fmt: skip


def test_weight_updates_load_into_fp8(checkpoints):
    engine = GenerationEngine(checkpoints.main, quantization="fp8", seed=0)
    fresh = GenerationEngine(checkpoints.other_weights, quantization="fp8", seed=0)
    try:
        checksum = DistributedUpdates(engine).checksum
        first, before = checksum()["sha256"], engine.generate(_requests())
        # Loading the served weights again, or a partial update of nothing, changes no bit.
        engine.update_weights_from_disk(str(checkpoints.main), "same")
        engine.update_weights_from_tensors({}, "empty")
        assert checksum()["sha256"] == first
        # New weights are quantized exactly as a server started on them quantizes.
        engine.update_weights_from_disk(str(checkpoints.other_weights), "other")
        assert checksum()["sha256"] == DistributedUpdates(fresh).checksum()["sha256"] != first
        after = engine.generate(_requests())
        assert [r.output_logprobs for r in after] == [
            r.output_logprobs for r in fresh.generate(_requests())]
        assert [r.output_logprobs for r in after] != [r.output_logprobs for r in before]
        # A partial update re-quantizes only the tensor it names.
        name = "model.layers.1.self_attn.o_proj.weight"
        state = engine.model.state_dict()
        engine.update_weights_from_tensors({name: state[name] * 2}, "partial")
        changed = {k for k, v in engine.model.state_dict().items() if not torch.equal(v, state[k])}
        assert changed == {name}
        # Non-finite weights would poison a whole scale group: refused, nothing changes.
        bad = state[name].clone()
        bad[0, 0] = math.nan
        held = checksum()["sha256"]
        with pytest.raises(WeightUpdateError, match=f"{name} holds 1 non-finite"):
            engine.update_weights_from_tensors({name: bad}, "nan")
        assert checksum() == {"weight_version": "partial", "sha256": held}
    finally:
        engine.close()
        fresh.close()


def test_server_generates_with_fp8_and_returns_routes(checkpoints):
    """One real launch: --quantization fp8 reaches the server through the launcher; it
    generates what the in-process FP8 engine generates, with routes."""
    engine = GenerationEngine(checkpoints.main, quantization="fp8", seed=0)
    try:
        expected = engine.generate(_requests(1))[0]
        shape = engine.shape
    finally:
        engine.close()
    with start_server_process(checkpoints.main, quantization="fp8", max_batch_size=4,
                              startup_timeout_s=240) as server:  # fmt: skip
        info = httpx.get(f"{server.url}/server_info", timeout=30).json()
        assert (info["quantization"], info["dtype"]) == ("fp8", "bfloat16")
        body = {"input_ids": [5, 9, 11, 7], "return_logprob": True, "return_routed_experts": True,
                "sampling_params": {"max_new_tokens": 6, "sampling_seed": 40}}  # fmt: skip
        out = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    assert out["output_ids"] == expected.output_ids
    assert [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]] == expected.output_logprobs
    tokens = 4 + len(out["output_ids"]) - 1
    routes = decode_routed_experts(out["meta_info"]["routed_experts"], num_tokens=tokens,
                                   shape=shape)
    assert routes.shape == (tokens, len(shape.moe_layers), shape.num_experts_per_tok)
    assert torch.equal(routes.long(), expected.routed_experts[:, list(shape.moe_layers)].long())
