"""Helpers of the workers that compare a CPU-spec module with megatron-core's own: the tiny
model built twice from the same seeds, the module switched off by its provider predicate."""

import torch


def build_tiny_pair(predicate: str) -> tuple:
    """``(without, with)``: the tiny GPT model built with ``provider.<predicate>`` forced
    False, then as chosen; distributed state must be initialised."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_rl.distributed import ParallelConfig
    from megatron_rl.model import provider
    from megatron_rl.model.config import PRESETS

    chosen = getattr(provider, predicate)

    def build(enabled: bool):
        setattr(provider, predicate, lambda config: enabled and chosen(config))
        try:
            torch.manual_seed(0)
            model_parallel_cuda_manual_seed(0)
            return provider.build_model(PRESETS["tiny"], ParallelConfig())[0]
        finally:
            setattr(provider, predicate, chosen)

    return build(False), build(True)


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> dict:
    """Whether the two models hold the same parameter names and values."""
    sa, sb = a.state_dict(), b.state_dict()
    return {"same_keys": sorted(sa) == sorted(sb),
            "same_params": all(torch.equal(sa[k], sb[k]) for k in sa
                               if isinstance(sa[k], torch.Tensor))}
