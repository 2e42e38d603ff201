"""bf16 matrix products computed as a GPU computes them: wide accumulation, one rounding.

A bf16 GEMM on a GPU (cuBLAS, the Triton kernels of SGLang's fused MoE) multiplies bf16
operands, accumulates in fp32 and rounds the result to bf16 once. On the CPU torch sends a
bf16 matmul to oneDNN, which builds and caches a kernel for every input shape; a
generation engine meets a new shape at nearly every decode step (the KV length, the rows
still running, the tokens each expert got), so a bf16 server grew by about 1 GB over 40
rollout batches of the demo (README, "Where megatron_rl's memory goes").

:class:`Bf16Products` computes each product of bf16 operands in fp64 with torch's
kernels and rounds it once to bf16. A product of two bf16 numbers is exact in fp64 and a
sum of them is exact to about 2^-50 relative, so the rounded result is the correctly
rounded bf16 product whatever order a kernel sums in. That keeps the engine's promise that
a row computes the same bits alone or in a batch (torch's fp32 kernels sum in an order that
depends on the number of rows; oneDNN's bf16 kernels did not), and it differs from a GPU's
fp32 accumulation only where the GPU's rounding error crosses a bf16 rounding boundary.
Nothing else changes: weights, activations, norms, softmax inputs, residual adds stay
bf16, so the engine is still a bf16 engine against the fp32 trainer. The mode intercepts
only products whose floating-point operands are all bf16; anything else (fp32, mixed, an
``out=`` or ``out_dtype`` argument, a grouped layout other than the two below) runs as
called.

The mode is entered around the served model's forward passes on the engine's worker
thread. Torch function modes are per thread, so a trainer sharing the process (a colocated
server) computes as before.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

PRODUCTS = frozenset({
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
    torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm,
    torch._grouped_mm,
})  # fmt: skip
"""The products the Hugging Face Qwen3-MoE calls: linear layers and the router gate
(``F.linear``), eager attention (``torch.matmul``), the experts (``torch._grouped_mm`` in
transformers 5, ``F.linear`` per expert in its eager path), and their usual spellings."""


def _bf16_operands(args: tuple, kwargs: dict) -> bool:
    """Every floating-point tensor operand is bf16 (integer ones, e.g. group offsets, aside)."""
    floats = [a for a in (*args, *kwargs.values())
              if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return bool(floats) and all(t.dtype == torch.bfloat16 for t in floats)


def _widen(value):
    return value.double() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


def _grouped_product(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor | None:
    """``torch._grouped_mm`` in fp64 for the layouts with one matrix per group of rows
    (``a [T, K]``, ``b [G, K, N]``, ``offs`` the groups' ends) or per batch entry (3D x 3D,
    no ``offs``); None for the others."""
    if bias is not None:
        return None
    if a.dim() == 3 and b.dim() == 3 and offs is None:
        return torch.bmm(a.double(), b.double())
    if a.dim() != 2 or b.dim() != 3 or offs is None:
        return None
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end].double() @ b[group].double()
        start = end
    return out


class Bf16Products(TorchFunctionMode):
    """bf16 products in fp32, rounded once to bf16 (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0
        """Products computed this way since the mode was made (tests read it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in PRODUCTS and "out" not in kwargs and kwargs.get("out_dtype") is None
                and _bf16_operands(args, kwargs)):
            if func is torch._grouped_mm:
                wide = _grouped_product(*args, **kwargs)
            else:
                wide = func(*map(_widen, args), **{k: _widen(v) for k, v in kwargs.items()})
            if wide is not None:
                self.products += 1
                return wide.to(torch.bfloat16)
        return func(*args, **kwargs)


__all__ = ["PRODUCTS", "Bf16Products"]
