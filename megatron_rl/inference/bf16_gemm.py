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
Batches of independent products (attention's ``q @ k^T`` and ``p @ v``: every operand has
batch dimensions, so a product's shape does not depend on how many rows the batch holds)
accumulate in fp32 instead, which keeps that promise at half the memory traffic over the
KV cache. Nothing else changes: weights, activations, norms, softmax inputs, residual adds stay
bf16, so the engine is still a bf16 engine against the fp32 trainer. The mode intercepts
only products whose floating-point operands are all bf16; anything else (fp32, mixed, an
``out=`` or ``out_dtype`` argument, a grouped layout other than the two below) runs as
called.

:func:`scope` enters the mode around the forward of the modules that compute products
(linear layers, attention, the MoE router and experts) rather than around the whole
model: a torch function mode is a Python call per torch call it sees, and the norms,
residual adds and embedding lookups between those modules are most of a decode step's
calls. Weights (parameters) are widened once per version, not at every call (the fp64
images take four times the bf16 weights' memory: 22 MB for the tiny preset). Torch
function modes are per thread, so a trainer sharing the process (a colocated server)
computes as before.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
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


def _batched(func, args: tuple) -> bool:
    """A batch of independent products (attention's ``q @ k^T`` and ``p @ v``): both
    operands have batch dimensions, so each product's shape, and the kernel's summation
    order, do not depend on how many rows the batch holds."""
    if func in (torch.bmm, torch.Tensor.bmm, torch.baddbmm):
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and \
        len(tensors) == 2 and min(t.dim() for t in tensors) >= 3


def _to_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


class _WideWeights:
    """fp64 images of bf16 parameters, made again only when a parameter changes (its
    version counter moves with every in-place update, e.g. a weight load)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[nn.Parameter, int, torch.Tensor]] = {}

    def __call__(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bfloat16:
            return value
        base = value if isinstance(value, nn.Parameter) else value._base
        if not (isinstance(base, nn.Parameter) and base.is_contiguous()
                and base.storage_offset() == 0):
            return value.double()  # an activation, or a weight made on the fly (FP8)
        hit = self._cache.get(id(base))
        if hit is None or hit[0] is not base or hit[1] != base._version:
            hit = (base, base._version, base.detach().double())
            self._cache[id(base)] = hit
        # A view of a parameter (an expert's slice, a transpose) is the same view of its
        # wide image: both are contiguous and of one shape.
        return hit[2].as_strided(value.size(), value.stride(), value.storage_offset())


def _grouped_product(wide, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor | None:
    """``torch._grouped_mm`` in fp64 for the layouts with one matrix per group of rows
    (``a [T, K]``, ``b [G, K, N]``, ``offs`` the groups' ends) or per batch entry (3D x 3D,
    no ``offs``); None for the others."""
    if bias is not None:
        return None
    if a.dim() == 3 and b.dim() == 3 and offs is None:
        return torch.bmm(wide(a), wide(b))
    if a.dim() != 2 or b.dim() != 3 or offs is None:
        return None
    a, b = wide(a), wide(b)
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end], b[group], out=out[start:end])
        start = end
    return out


class Bf16Products(TorchFunctionMode):
    """bf16 products accumulated in fp64 (fp32 for batched ones), rounded once to bf16
    (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0
        """Products computed this way since the mode was made (tests read it)."""
        self._wide = _WideWeights()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in PRODUCTS and "out" not in kwargs and kwargs.get("out_dtype") is None
                and _bf16_operands(args, kwargs)):
            if func is torch._grouped_mm:
                wide = _grouped_product(self._wide, *args, **kwargs)
            elif _batched(func, args):
                wide = func(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            else:
                wide = func(*map(self._wide, args),
                            **{k: self._wide(v) for k, v in kwargs.items()})
            if wide is not None:
                self.products += 1
                return wide.to(torch.bfloat16)
        return func(*args, **kwargs)


def _computes_products(module: nn.Module) -> bool:
    name = type(module).__name__
    return (isinstance(module, nn.Linear) or name.endswith(("Attention", "Experts", "Router"))
            or hasattr(module, "gate_up_proj"))  # experts modules of other names (FP8)


def _within(mode: Bf16Products, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with mode:
            return forward(*args, **kwargs)
    return run


def scope(model: nn.Module, mode: Bf16Products | None = None) -> Bf16Products:
    """Compute ``model``'s bf16 products with ``mode`` (a new one by default): its forward
    is entered around every module that computes them, outermost first (an attention
    module's projections are inside its scope). Returns the mode."""
    mode = mode if mode is not None else Bf16Products()
    scoped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in scoped) or not _computes_products(module):
            continue
        module.forward = _within(mode, module.forward)
        scoped.append(name)
    if not scoped:
        raise ValueError(f"{type(model).__name__} has no module that computes products")
    return mode


__all__ = ["PRODUCTS", "Bf16Products", "scope"]
