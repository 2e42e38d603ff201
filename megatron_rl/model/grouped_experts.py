"""Routed experts for the CPU: SequentialMLP's parameters, computed with grouped GEMMs.

megatron-core computes experts without Transformer Engine with ``SequentialMLP``: one
``MLP`` module per local expert, called one after the other, each projection a
``LinearWithGradAccumulationAndAsyncCommunication`` autograd function. At the sizes that
fit a CPU that loop is the cost -- per expert, per layer, per micro-batch, forward and
backward, several Python-level module and autograd calls around a GEMM of a few hundred
rows -- and it was the largest single item of the trainer's step (issue 18's profile:
4,704 expert MLP calls in 8 RL steps of the demo workload).

:class:`GroupedExperts` keeps SequentialMLP's modules, parameters, checkpoint keys and
expert-parallel attributes (so checkpoints, weight export and the distributed optimizer
see exactly what they saw before), and replaces only its forward: the local experts'
weights are stacked and each projection is one ``torch._grouped_mm`` over the tokens
grouped by expert. Each expert's rows are multiplied by that expert's weight alone, as
in the loop, so the result does not depend on how experts are grouped (EP shards) and
autograd's backward is one grouped GEMM per projection too.

It is chosen at model-build time (:func:`supports_grouped_experts`), only where its
forward computes what SequentialMLP's does: no FP8/FP4 padding, no bias, no fused or TE
activation, no probabilities applied on the input, no recomputation of the expert
activation, no delayed weight-gradient computation. Anything else builds SequentialMLP.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig


def supports_grouped_experts(config: TransformerConfig) -> bool:
    """Whether :class:`GroupedExperts` computes exactly what SequentialMLP computes under
    ``config`` (else the model is built with SequentialMLP). CPU only: CUDA's grouped GEMM
    has dtype and architecture limits of its own, and GPUs have Transformer Engine's."""
    if not hasattr(torch, "_grouped_mm") or torch.cuda.is_available():
        return False
    recompute_modules = getattr(config, "recompute_modules", None) or ()
    return not (
        config.fp8
        or getattr(config, "fp4", None)
        or config.add_bias_linear
        or config.bias_activation_fusion
        or getattr(config, "use_te_activation_func", False)
        or config.moe_apply_probs_on_input
        or getattr(config, "delay_wgrad_compute", False)
        or "moe_act" in recompute_modules
        or getattr(config, "moe_latent_size", None)
    )


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient: the CPU grouped GEMM's backward
    rejects a broadcast (stride-0) one, such as a sum's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if 0 in grad.stride():
            return grad.clone(memory_format=torch.contiguous_format)
        return grad.contiguous()


class GroupedExperts(SequentialMLP):
    """SequentialMLP with all local experts computed in one grouped GEMM per projection."""

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        hidden = permuted_local_hidden_states
        if hidden.shape[0] == 0:
            # No token for this rank's experts (expert parallelism): the grouped GEMM's
            # backward cannot take empty groups only; SequentialMLP's loop can.
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        counts = torch.as_tensor(tokens_per_expert, device=hidden.device)
        if counts.numel() != self.num_local_experts or int(counts.sum()) != hidden.shape[0]:
            raise ValueError(
                f"GroupedExperts: {hidden.shape[0]} dispatched tokens but tokens_per_expert "
                f"{counts.tolist()} for {self.num_local_experts} local experts")
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        # [E, in, out] views of the experts' [out, in] weights: x @ W.T per group, the
        # product megatron's linear layers compute.
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        intermediate = _DenseGrad.apply(torch._grouped_mm(hidden, fc1, offs=offsets))
        intermediate = self._activation(intermediate)
        original_dtype = intermediate.dtype
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(original_dtype)
        return _DenseGrad.apply(torch._grouped_mm(intermediate, fc2, offs=offsets)), None

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        """MLP's unfused activation (megatron.core.transformer.mlp.MLP.forward)."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        clamp = getattr(config, "activation_func_clamp_value", None)
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + getattr(config, "glu_linear_offset", 0.0))


class GroupedExpertsSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with :class:`GroupedExperts` for the routed experts."""

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, *legacy: bool):
        # megatron-core <= 0.16 takes (grouped, legacy) and returns (module, submodules);
        # 0.17+ takes (grouped,) and returns a builder, partial(SequentialMLP, ...).
        built = super().grouped_mlp_modules(False, *(False for _ in legacy))
        if isinstance(built, tuple) and built[0] is SequentialMLP:
            return GroupedExperts, built[1]
        if isinstance(built, functools.partial) and built.func is SequentialMLP:
            return functools.partial(GroupedExperts, *built.args, **built.keywords)
        raise TypeError(f"megatron-core's local experts are {built!r}, not SequentialMLP: "
                        "GroupedExperts cannot stand in for them")
