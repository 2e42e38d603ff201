"""The CPU adaptation redirects exactly the CUDA assumptions megatron-core makes."""

import pytest
import torch

from megatron_rl import cpu_adaptation

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_only_needed_without_cuda():
    assert cpu_adaptation.needed() == (not torch.cuda.is_available())


def test_cuda_factories_land_on_cpu(adapted):
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.arange(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"


def test_megatron_type_checks_see_cuda_names(adapted):
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # Casting with an explicit type still works.
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_cpu_generator(adapted):
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("stream", 123)
    before = torch.get_rng_state()
    with tracker.fork("stream"):
        a = torch.rand(3)
    # The default stream is untouched by the fork and the forked stream advances.
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("stream"):
        b = torch.rand(3)
    assert not torch.equal(a, b)


def test_streams_are_noops(adapted):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.ones(2)
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert x.sum() == 2


def test_deactivate_restores_everything():
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    cpu_adaptation.activate()
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    cpu_adaptation.deactivate()
    assert not cpu_adaptation.is_active()
    assert filesystem_async._results_queue is None
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    cpu_adaptation.activate()
    assert cpu_adaptation.is_active()


def test_moe_router_gating_runs_without_transformer_engine(adapted):
    from megatron.core.transformer.moe import moe_utils

    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.T, atol=1e-6)


def test_suspended_device_mode_fails_loudly_and_comes_back(adapted):
    """The model's forward and the loss run with the device mode suspended: a CUDA device
    named there raises instead of landing anywhere, and the mode is back afterwards."""
    with cpu_adaptation.device_mode_suspended():
        assert torch.zeros(1).type() == "torch.FloatTensor"
        # Device queries stay answered (megatron feeds them to factories in the forward).
        assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_suspension_leaves_a_mode_entered_above_it_alone(adapted):
    """Under another function mode (e.g. ``with torch.device(...)``), suspending would pop
    the wrong mode: it does nothing."""
    with torch.device("meta"):
        with cpu_adaptation.device_mode_suspended():
            assert torch.zeros(1).device.type == "meta"
            assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert torch.zeros(1).device.type == "cpu"
