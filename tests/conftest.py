"""Shared test fixtures: launching real multi-process jobs, GPU/SGLang markers."""

from __future__ import annotations

import pytest
import torch
from torchrun_launch import ROOT, WORKERS, free_port, run_torchrun  # noqa: F401


@pytest.fixture
def torchrun():
    return run_torchrun


@pytest.fixture
def adapted():
    """megatron-core's CPU adaptation applied for the test (undone after it, unless it was
    active before)."""
    from megatron_rl import cpu_adaptation

    was_active = cpu_adaptation.is_active()
    cpu_adaptation.activate()
    yield
    if not was_active:
        cpu_adaptation.deactivate()


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import sglang  # noqa: F401
        has_sglang = has_cuda
    except ImportError:
        has_sglang = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "sglang" in item.keywords and not has_sglang:
            item.add_marker(pytest.mark.skip(reason="needs SGLang and a CUDA device"))
