"""ModelConfig <-> Hugging Face Qwen3-MoE config, and the random checkpoint helper."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from megatron_rl.model.config import preset
from megatron_rl.weight_sync.hf_config import (
    ModelShape,
    read_model_shape,
    save_random_checkpoint,
    to_hf_config,
)


@pytest.mark.parametrize(
    "freq, moe",
    [("[0,1,1,1]", [1, 2, 3]), ("1", [0, 1, 2, 3]), ("2", [0, 2]), ("[1,0,0,1]", [0, 3])],
)
def test_moe_layers_are_the_trainers(freq, moe):
    config = preset("tiny").replace(moe_layer_freq=freq)
    assert config.moe_layer_indices() == moe
    hf = to_hf_config(config)
    model = Qwen3MoeForCausalLM(hf)
    built = [
        i
        for i, layer in enumerate(model.model.layers)
        if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)
    ]
    assert built == moe
    assert ModelShape.from_hf_config(hf) == ModelShape.from_model_config(config)


def test_fields_of_the_30b_preset():
    config = preset("qwen3-30b-a3b")
    hf = to_hf_config(config)
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers) == (151936, 2048, 48)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        32,
        4,
        128,
    )  # head_dim != 2048 / 32
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (128, 8, 768)
    assert (
        hf.norm_topk_prob is True and hf.tie_word_embeddings is False and hf.attention_bias is False
    )
    assert hf.mlp_only_layers == [] and hf.intermediate_size == 6144
    assert hf.rope_parameters["rope_theta"] == 1_000_000.0 and hf.rms_norm_eps == 1e-6
    assert hf.max_position_embeddings == 40960


def test_random_checkpoint_is_reproducible_and_readable_by_old_readers(tmp_path):
    config = preset("tiny")
    a = save_random_checkpoint(config, tmp_path / "a", seed=3)
    b = save_random_checkpoint(config, tmp_path / "b", seed=3)
    c = save_random_checkpoint(config, tmp_path / "c", seed=4)
    raw = json.loads((a / "config.json").read_text())
    # transformers 4.x (SGLang) reads num_experts and rope_theta, 5.x the new names.
    assert raw["num_experts"] == raw["num_local_experts"] == 16 and raw["rope_theta"] == 1_000_000.0
    assert read_model_shape(a) == ModelShape.from_model_config(config)
    assert AutoConfig.from_pretrained(a).num_experts == 16
    weights = [Qwen3MoeForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c)]
    key = "model.layers.1.mlp.gate.weight"
    assert torch.equal(weights[0][key], weights[1][key]) and not torch.equal(
        weights[0][key], weights[2][key]
    )
    assert (a / "tokenizer.json").is_file()


def test_shape_differences_are_named():
    tiny = ModelShape.from_model_config(preset("tiny"))
    other = ModelShape.from_model_config(preset("tiny").replace(num_experts=8, vocab_size=256))
    assert tiny.differences(other) == ["vocab_size: 128 vs 256", "num_experts: 16 vs 8"]
    assert ModelShape.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="malformed model shape"):
        ModelShape.from_dict({"vocab_size": 1})
