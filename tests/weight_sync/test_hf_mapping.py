"""Names and per-shard transforms of the megatron <-> Hugging Face mapping (no processes)."""

import pytest
import torch
from safetensors import safe_open

from megatron_rl.model.config import PRESETS
from megatron_rl.weight_sync.hf_config import save_random_checkpoint
from megatron_rl.weight_sync.hf_mapping import (
    UnknownParameterError,
    assemble_hf,
    hf_tensor_shapes,
    hf_to_shard,
    map_megatron_name,
    order_key,
)

TINY = PRESETS["tiny"]


@pytest.mark.parametrize(
    "local,te",
    [
        (
            "decoder.layers.3.input_layernorm.weight",
            "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        ),
        (
            "decoder.layers.0.pre_mlp_layernorm.weight",  # dense layer: TE fuses it into fc1
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        ),
        (
            "decoder.layers.2.mlp.experts.local_experts.11.linear_fc1.weight",
            "decoder.layers.2.mlp.experts.linear_fc1.weight11",
        ),
        (
            "decoder.layers.2.mlp.experts.local_experts.11.linear_fc2.weight",
            "decoder.layers.2.mlp.experts.linear_fc2.weight11",
        ),
    ],
)
def test_local_and_te_names_map_alike(local, te):
    a, b = map_megatron_name(local), map_megatron_name(te)
    assert (a.hf_names, a.layout, a.split_dim, a.expert) == (
        b.hf_names,
        b.layout,
        b.split_dim,
        b.expert,
    )


def test_names_and_splits():
    qkv = map_megatron_name("decoder.layers.1.self_attention.linear_qkv.weight")
    assert qkv.hf_names == tuple(f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    assert (qkv.layout, qkv.split_dim) == ("qkv", 0)
    fc1 = map_megatron_name("decoder.layers.2.mlp.experts.local_experts.11.linear_fc1.weight")
    assert fc1.hf_names == (
        "model.layers.2.mlp.experts.11.gate_proj.weight",
        "model.layers.2.mlp.experts.11.up_proj.weight",
    )
    assert (fc1.layout, fc1.split_dim, fc1.expert) == ("glu", 0, True)
    assert map_megatron_name("decoder.layers.1.self_attention.linear_proj.weight").split_dim == 1
    assert map_megatron_name("decoder.layers.1.mlp.router.weight").hf_names == (
        "model.layers.1.mlp.gate.weight",
    )
    head = map_megatron_name("output_layer.weight")
    assert (head.hf_names, head.split_dim, head.vocab) == (("lm_head.weight",), 0, True)
    with pytest.raises(UnknownParameterError, match="linear_qkv.bias"):
        map_megatron_name("decoder.layers.1.self_attention.linear_qkv.bias")
    with pytest.raises(UnknownParameterError, match="shared_experts"):
        map_megatron_name("decoder.layers.1.mlp.shared_experts.linear_fc1.weight")


@pytest.mark.parametrize("shards", [1, 2])
def test_qkv_matches_megatron_attention_layout(shards):
    """Megatron's attention reads query group g as rows [g*(r+2)*d, (g+1)*(r+2)*d): its r
    query heads, then k, then v. Build HF q/k/v whose rows encode (kind, head, row) and
    check the shards put every row where megatron reads it."""
    heads, groups, d, hidden = 8, 4, 3, 5
    config = TINY.replace(
        num_attention_heads=heads, num_query_groups=groups, kv_channels=d, hidden_size=hidden
    )
    tmap = map_megatron_name("decoder.layers.0.self_attention.linear_qkv.weight")

    def rows(kind, count):
        return torch.tensor(
            [[kind * 1000 + h * 10 + r] * hidden for h in range(count) for r in range(d)],
            dtype=torch.float32,
        )

    q, k, v = rows(1, heads), rows(2, groups), rows(3, groups)
    pieces = [[t.chunk(shards)[i] for t in (q, k, v)] for i in range(shards)]
    megatron = torch.cat([hf_to_shard(tmap, p, config) for p in pieces])
    per_group = heads // groups
    for g in range(groups):
        block = megatron[g * (per_group + 2) * d : (g + 1) * (per_group + 2) * d, 0].tolist()
        want = [1000 + (g * per_group + h) * 10 + r for h in range(per_group) for r in range(d)]
        want += [2000 + g * 10 + r for r in range(d)] + [3000 + g * 10 + r for r in range(d)]
        assert block == want
    rebuilt = dict(assemble_hf(tmap, megatron.chunk(shards), config))
    assert torch.equal(rebuilt[tmap.hf_names[0]], q) and torch.equal(rebuilt[tmap.hf_names[2]], v)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_glu_shards_are_gate_then_up(shards):
    tmap = map_megatron_name("decoder.layers.0.mlp.linear_fc1.weight")
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    megatron_shards = [
        hf_to_shard(tmap, [gate.chunk(shards)[i], up.chunk(shards)[i]], TINY) for i in range(shards)
    ]
    for i, shard in enumerate(megatron_shards):  # each TP shard: [gate slice; up slice]
        assert torch.equal(shard[: 8 // shards], gate.chunk(shards)[i])
    out = dict(assemble_hf(tmap, megatron_shards, TINY))
    assert torch.equal(out[tmap.hf_names[0]], gate) and torch.equal(out[tmap.hf_names[1]], up)


def test_expected_shapes_are_the_hf_checkpoint(tmp_path):
    """hf_tensor_shapes lists exactly what transformers writes for this config."""
    path = save_random_checkpoint(TINY, tmp_path, seed=0)
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        written = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert written == hf_tensor_shapes(TINY)


def test_order_is_embedding_layers_experts_head():
    names = [
        "output_layer.weight",
        "decoder.final_layernorm.weight",
        "decoder.layers.10.mlp.router.weight",
        "decoder.layers.2.mlp.experts.local_experts.10.linear_fc1.weight",
        "decoder.layers.2.mlp.experts.local_experts.9.linear_fc1.weight",
        "embedding.word_embeddings.weight",
    ]
    assert sorted(names, key=order_key) == [
        names[5],
        names[4],
        names[3],
        names[2],
        names[1],
        names[0],
    ]
