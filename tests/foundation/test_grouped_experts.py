"""GroupedExperts: megatron-core's SequentialMLP computed with grouped GEMMs."""

from types import SimpleNamespace

import pytest
import torch
from torchrun_launch import WORKERS

from megatron_rl.model.grouped_experts import supports_grouped_experts

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"),
    reason="GroupedExperts is the CPU path (torch._grouped_mm on CPU)")


def _config(**overrides):
    base = dict(fp8=None, fp4=None, add_bias_linear=False, bias_activation_fusion=False,
                use_te_activation_func=False, moe_apply_probs_on_input=False,
                delay_wgrad_compute=False, recompute_modules=None, moe_latent_size=None)
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [
    {"fp8": "hybrid"}, {"add_bias_linear": True}, {"bias_activation_fusion": True},
    {"use_te_activation_func": True}, {"moe_apply_probs_on_input": True},
    {"delay_wgrad_compute": True}, {"recompute_modules": ["moe_act"]},
])
def test_settings_it_does_not_compute_keep_sequential_mlp(overrides):
    assert supports_grouped_experts(_config())
    assert not supports_grouped_experts(_config(**overrides))


@pytest.mark.slow
def test_grouped_experts_equal_sequential_mlp_bit_for_bit(torchrun, tmp_path):
    (result,) = torchrun(WORKERS / "grouped_experts.py", 1, [], tmp_path)
    assert result["classes"] == ["SequentialMLP", "GroupedExperts"]
    assert result["same_keys"] and result["same_params"]
    for case in ("batch", "few_tokens"):
        assert result[case]["output_equal"], case
        assert result[case]["grads_equal"], case
    # Gradients reached the experts (a model whose experts got none would pass trivially).
    assert result["batch"]["expert_grads"] >= 16
    # No token for the local experts, and a broadcast gradient: SequentialMLP's results.
    assert result["no_tokens"]["shape"] == [0, 128]
    assert result["broadcast_grad"]["shape"] == [40, 128]
    for case in ("no_tokens", "broadcast_grad"):
        assert result[case]["output_equal"] and result[case]["grads_equal"], case
