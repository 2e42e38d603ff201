"""FusedCoreAttention: megatron-core's DotProductAttention computed by torch's fused kernel."""

from types import SimpleNamespace

import pytest
from torchrun_launch import WORKERS

from megatron_rl.model.sdpa_attention import FusedCoreAttention, computes


def _config(**overrides):
    base = dict(attention_dropout=0.0, window_size=None, softmax_type="vanilla",
                apply_query_key_layer_scaling=False, context_parallel_size=1)
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [
    {"attention_dropout": 0.1}, {"window_size": (64, 0)}, {"softmax_type": "learnable"},
    {"apply_query_key_layer_scaling": True}, {"context_parallel_size": 2},
])
def test_settings_it_does_not_compute_keep_dot_product_attention(overrides):
    assert computes(_config())
    assert not computes(_config(**overrides))
    with pytest.raises(ValueError, match="without dropout, softmax offset.*context_parallel_size"):
        FusedCoreAttention(_config(**overrides), layer_number=1, attn_mask_type=None,
                           attention_type="self")


@pytest.mark.slow
def test_fused_attention_matches_dot_product_attention(torchrun, tmp_path):
    (result,) = torchrun(WORKERS / "fused_attention.py", 1, [], tmp_path)
    assert result["classes"] == ["DotProductAttention", "FusedCoreAttention"]
    assert result["same_keys"] and result["same_params"]
    assert result["shared_rows_padded"]
    for case in ("causal", "shared", "no_mask"):
        r = result[case]
        assert r["finite"] and r["same_grads"], case
        # Another summation order, same math: fp32 rounding apart, on outputs and on the
        # gradient of every parameter.
        assert r["output_rel"] < 1e-5, (case, r)
        assert r["grad_rel"] < 1e-4, (case, r)
        assert r["grads"] >= 20, case


def test_without_a_mask_one_query_sees_every_key_and_unequal_lengths_are_refused():
    """The parent's softmax without a mask: causal over sq == sk, nothing for a single
    query (a decode step); SDPA's own causal mask would let that query see key 0 only."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, attention_dropout=0.0, hidden_dropout=0.0)
    tp = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    attention = FusedCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                   attention_type="self", pg_collection=tp)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 16, generator=gen)  # [sq, b, heads, head dim]
    k, v = torch.randn(5, 2, 2, 16, generator=gen), torch.randn(5, 2, 2, 16, generator=gen)
    out = attention(q, k, v, None)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) / 4.0
    expected = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), vv).reshape(1, 2, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 queries and 5 keys"):
        attention(torch.randn(3, 2, 4, 16), k, v, None)
    with pytest.raises(ValueError, match="no attention dropout, asked for p=0.1"):
        FusedCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                           attention_type="self", attention_dropout=0.1, pg_collection=tp)
