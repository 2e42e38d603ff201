"""Checks before loading an HF checkpoint, and the model config read from one (no
processes: these fail before any rank touches a parameter)."""

import json

import pytest
from safetensors.torch import load_file, save_file

from megatron_rl.model.config import PRESETS
from megatron_rl.weight_sync.hf_config import save_random_checkpoint, to_hf_config
from megatron_rl.weight_sync.load_hf import (
    HFCheckpoint,
    check_hf_config,
    check_hf_tensors,
    model_config_from_hf,
)

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_random_checkpoint(TINY, tmp_path_factory.mktemp("tiny"), seed=0)


def test_tensor_of_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = save_random_checkpoint(TINY.replace(moe_ffn_hidden_size=64), tmp_path, seed=0)
    with HFCheckpoint(path) as checkpoint, pytest.raises(ValueError) as info:
        check_hf_tensors(checkpoint, TINY)
    assert (
        "model.layers.1.mlp.experts.0.gate_proj.weight has shape [64, 128] in the "
        "checkpoint, the model expects [128, 128]"
    ) in str(info.value)
    with pytest.raises(ValueError, match="moe_intermediate_size: checkpoint 64, model 128"):
        check_hf_config(path, TINY)


def test_missing_and_extra_tensors_are_named(tiny_hf, tmp_path):
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    tensors.pop("model.layers.2.self_attn.k_norm.weight")
    tensors["model.layers.9.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with HFCheckpoint(tmp_path) as checkpoint, pytest.raises(ValueError) as info:
        check_hf_tensors(checkpoint, TINY)
    assert "model.layers.2.self_attn.k_norm.weight is missing" in str(info.value)
    assert "model.layers.9.mlp.gate.weight [16, 128] is not part" in str(info.value)


def test_smaller_vocabulary_is_accepted_as_padding(tiny_hf, tmp_path):
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:100].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with HFCheckpoint(tmp_path) as checkpoint:
        check_hf_tensors(checkpoint, TINY)  # rows 100..127 will be zero


def test_config_of_another_model_is_refused(tiny_hf):
    check_hf_config(tiny_hf, TINY)
    with pytest.raises(ValueError) as info:
        check_hf_config(tiny_hf, TINY.replace(moe_router_topk=2, moe_layer_freq="1"))
    assert "num_experts_per_tok: checkpoint 4, model 2" in str(info.value)
    assert "MoE layers: checkpoint [0, 1, 1, 1], model [1, 1, 1, 1]" in str(info.value)


def test_model_config_round_trips_through_hf(tiny_hf, tmp_path):
    read = model_config_from_hf(tiny_hf)
    assert read.replace(tokenizer="char", preset_name="tiny") == TINY
    assert read.tokenizer == str(tiny_hf)  # the checkpoint's own tokenizer
    big = PRESETS["qwen3-30b-a3b"]
    to_hf_config(big).save_pretrained(tmp_path)
    read = model_config_from_hf(tmp_path, base=big)
    assert read.replace(preset_name=big.preset_name) == big


def test_unrenormalised_topk_is_refused(tiny_hf, tmp_path):
    data = json.loads((tiny_hf / "config.json").read_text())
    data["norm_topk_prob"] = False
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        model_config_from_hf(tmp_path)
