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
    with pytest.raises(ValueError, match="without dropout, softmax offset"):
        FusedCoreAttention(_config(**overrides), layer_number=1, attn_mask_type=None,
                           attention_type="self")


@pytest.mark.slow
def test_fused_attention_matches_dot_product_attention(torchrun, tmp_path):
    (result,) = torchrun(WORKERS / "fused_attention.py", 1, [], tmp_path)
    assert result["classes"] == ["DotProductAttention", "FusedCoreAttention"]
    assert result["same_keys"] and result["same_params"]
    assert result["shared_rows_padded"]
    for case in ("causal", "shared"):
        r = result[case]
        assert r["finite"] and r["same_grads"], case
        # Another summation order, same math: fp32 rounding apart, on outputs and on the
        # gradient of every parameter.
        assert r["output_rel"] < 1e-5, (case, r)
        assert r["grad_rel"] < 1e-4, (case, r)
        assert r["grads"] >= 20, case
