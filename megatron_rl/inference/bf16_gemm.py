"""bf16 matrix products computed as a GPU computes them: fp32 accumulation, one rounding.

A bf16 GEMM on a GPU (cuBLAS, the Triton kernels of SGLang's fused MoE) multiplies bf16
operands, accumulates in fp32 and rounds the result to bf16 once. On the CPU torch sends a
bf16 matmul to oneDNN, which builds and caches a kernel for every input shape; a
generation engine meets a new shape at nearly every decode step (the KV length, the rows
still running, the tokens each expert got), so a bf16 server grew by about 1 GB over 40
rollout batches of the demo (README, "Where megatron_rl's memory goes").

:class:`Bf16Products` computes each product of bf16 operands from their fp32 images with
torch's fp32 kernels (a product of two bf16 numbers is exact in fp32, so only the
accumulation rounds, as on a GPU) and rounds the result once to bf16. The engine promises
that a row computes the same bits alone or in a batch, and a CPU's fp32 GEMM picks its
kernel, and so its summation order, by the number of rows: on the machines measured a
product of 1-3 rows (and, with two threads, of 5-7 or 9-11) sums in another order than
the same rows inside a larger one. Products of rows times a fixed matrix (linear layers,
the router, each expert) are therefore computed on at least ``MIN_ROWS`` rows, a multiple
of ``ROW_BLOCK`` (zero rows added and dropped), and in chunks of at most the checked
batch (:func:`check_rows`). That rule is a measurement, not a guarantee, so it is checked
on this machine before it is trusted: the first time a product of a new shape (and
layout, bias, thread count) is met, random bf16 rows times the real weights are compared,
bit for bit, alone and at many offsets of batches of a sample of sizes from 1 to
:func:`check_rows` (every size up to 44, then 63 ... 2,047: :func:`row_invariant`); a
shape that fails is computed in fp64 instead (exact products, sums exact to about 2^-50
relative, rounded to bf16 through fp32 with round-to-odd, so the result is the correctly
rounded bf16 product whatever order a kernel sums in), and a warning names it. Batches of
independent products (attention's ``q @ k^T`` and ``p @ v``, every operand with batch
dimensions) accumulate in fp32 as called, unchecked: their contraction is over the head
dimension or the keys, and the kernels here sum a row's keys in order, so the zero
weights of left padding change nothing (the engine's alone-versus-batched tests hold it).
Nothing else changes: weights, activations, norms, softmax inputs, residual adds
stay bf16, so the engine is still a bf16 engine against the fp32 trainer. The mode
intercepts only products whose floating-point operands are all bf16; anything else (fp32,
mixed, an ``out=`` or ``out_dtype`` argument, a grouped layout other than the two below)
runs as called.

:func:`scope` enters the mode around the forward of the modules that compute products
(linear layers, attention, the MoE router and experts) rather than around the whole
model: a torch function mode is a Python call per torch call it sees, and the norms,
residual adds and embedding lookups between those modules are most of a decode step's
calls. Weights (parameters) are widened once per version, not at every call (the fp32
images take twice the bf16 weights' memory: 11 MB for the tiny preset). Torch function
modes are per thread, so a trainer sharing the process (a colocated server) computes as
before.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

PRODUCTS = frozenset({
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
    torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm,
    torch._grouped_mm,
})  # fmt: skip
"""The products the Hugging Face Qwen3-MoE calls: linear layers and the router gate
(``F.linear``), eager attention (``torch.matmul``), the experts (``torch._grouped_mm`` in
transformers 5, ``F.linear`` per expert in its eager path), and their usual spellings."""

MIN_ROWS = 12
"""Fewest rows an fp32 product of rows times a matrix is computed on (see the docstring)."""
ROW_BLOCK = 4
"""Row counts of those products are rounded up to a multiple of this."""
CHECK_ROWS = 2048
"""The largest batch :func:`row_invariant` compares against (fewer for wide outputs)."""
CHECK_ELEMENTS = 2**24
"""Bound on the check's reference product (rows x outputs, 64 MB in fp32), so that a wide
matrix (an ``lm_head`` over a large vocabulary) is checked on fewer rows."""


def check_rows(outputs: int) -> int:
    """The largest batch checked, and the largest chunk computed, for ``outputs`` columns."""
    return max(64, min(CHECK_ROWS, CHECK_ELEMENTS // max(outputs, 1)))


def to_bf16(wide: torch.Tensor) -> torch.Tensor:
    """Round fp32 or fp64 to bf16 once. torch rounds fp64 to bf16 through fp32, twice
    (``1 + 2^-8 + 2^-30`` -> ``1.0`` instead of ``1.0078125``); rounding to fp32 to odd
    (the last bit set where that rounding was inexact) first makes the second rounding
    exact, as fp32 keeps 16 more bits than bf16."""
    if wide.dtype != torch.float64:
        return wide.to(torch.bfloat16)
    narrow = wide.float()
    inexact = (narrow.double() != wide) & torch.isfinite(narrow)
    odd = narrow.view(torch.int32) | inexact.to(torch.int32)
    return odd.view(torch.float32).to(torch.bfloat16)


def padded_rows(rows: int) -> int:
    """The rows an fp32 product of ``rows`` rows times a matrix is computed on."""
    return max(MIN_ROWS, -(-rows // ROW_BLOCK) * ROW_BLOCK)


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
    """fp32 (or fp64) images of bf16 parameters, made again only when a parameter changes
    (its version counter moves with every in-place update, e.g. a weight load)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.dtype], tuple[nn.Parameter, int, torch.Tensor]] = {}

    def __call__(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bfloat16:
            return value
        base = value if isinstance(value, nn.Parameter) else value._base
        if not (isinstance(base, nn.Parameter) and base.is_contiguous()
                and base.storage_offset() == 0):
            return value.to(dtype)  # an activation, or a weight made on the fly (FP8)
        key = (id(base), dtype)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not base or hit[1] != base._version:
            hit = (base, base._version, base.detach().to(dtype))
            self._cache[key] = hit
        # A view of a parameter (an expert's slice, a transpose) is the same view of its
        # wide image: both are contiguous and of one shape.
        return hit[2].as_strided(value.size(), value.stride(), value.storage_offset())

    def forget(self, value: torch.Tensor, dtype: torch.dtype) -> None:
        """Drop the ``dtype`` image of ``value``'s parameter (one that will not be used)."""
        base = value if isinstance(value, nn.Parameter) else value._base
        self._cache.pop((id(base), dtype), None)


def _row_product(rows: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None,
                 linear: bool) -> torch.Tensor:
    """``rows [M, K]`` (row-major) times ``right`` (``F.linear``'s ``[N, K]`` weight, or a
    ``[K, N]`` matrix), in ``rows``' dtype; fp32 on :func:`padded_rows` rows, in chunks of
    at most :func:`check_rows`."""
    m = rows.shape[0]
    if rows.dtype != torch.float32:
        return F.linear(rows, right, bias) if linear else torch.mm(rows, right)
    chunk = check_rows(right.shape[0] if linear else right.shape[1])
    if m > chunk:
        return torch.cat([_row_product(rows[i:i + chunk], right, bias, linear)
                          for i in range(0, m, chunk)])
    padded = padded_rows(m)
    if padded > m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    out = F.linear(rows, right, bias) if linear else torch.mm(rows, right)
    return out[:m] if padded > m else out


def row_invariant(right: torch.Tensor, bias: torch.Tensor | None, linear: bool) -> bool:
    """Whether fp32 rows times ``right`` (fp32) give every row the same bits alone and at
    an offset of a batch, for a sample of batch sizes up to :func:`check_rows`, on this
    machine and thread count."""
    k, n = (right.shape[-1], right.shape[0]) if linear else right.shape
    most = check_rows(n)
    rows = torch.randn(most, k, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    full = _row_product(rows, right, bias, linear)
    counts = [m for m in (*range(1, MIN_ROWS + 8 * ROW_BLOCK + 1), 63, 64, 100, 128, 255, 256,
                          511, 640, 1000, 1024, 1500, most - 1) if m < most]
    for m in counts:
        start = (7 * m) % (CHECK_ROWS - m + 1)
        if not torch.equal(_row_product(rows[start:start + m], right, bias, linear),
                           full[start:start + m]):
            return False
    return True


class Bf16Products(TorchFunctionMode):
    """bf16 products accumulated in fp32 (fp64 for a shape whose fp32 rows are not
    batch-invariant here), rounded once to bf16 (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.products = 0
        """Products computed this way since the mode was made (tests read it)."""
        self.fp64_shapes: list[tuple] = []
        """The shapes (and layouts) computed in fp64 because their fp32 rows failed
        :func:`row_invariant`."""
        self._wide = _WideWeights()
        self._dtypes: dict[tuple, torch.dtype] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in PRODUCTS and "out" not in kwargs and kwargs.get("out_dtype") is None
                and _bf16_operands(args, kwargs)):
            if func is torch._grouped_mm:
                wide = self._grouped(*args, **kwargs)
            elif _batched(func, args):
                wide = func(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            else:
                wide = self._as_rows(func, args, kwargs)
                if wide is None:  # another form (addmm, ...): exact products, fp64 sums
                    wide = func(*(self._wide(a, torch.float64) for a in args),
                                **{k: self._wide(v, torch.float64) for k, v in kwargs.items()})
            if wide is not None:
                self.products += 1
                return to_bf16(wide)
        return func(*args, **kwargs)

    def _dtype_for(self, right: torch.Tensor, bias: torch.Tensor | None, linear: bool) -> torch.dtype:
        key = (linear, tuple(right.shape), right.stride(), bias is not None, torch.get_num_threads())
        dtype = self._dtypes.get(key)
        if dtype is None:
            dtype = torch.float32
            if not row_invariant(self._wide(right, dtype), self._wide(bias, dtype), linear):
                dtype = torch.float64
                self.fp64_shapes.append(key)
                self._wide.forget(right, torch.float32)
                logger.warning(
                    "bf16 products of rows times a %s matrix (%s, bias %s, %d threads) do not "
                    "give a row the same bits alone and in a batch with this machine's fp32 "
                    "kernels: computed in fp64 (slower; the same promise)",
                    "x".join(map(str, key[1])), "linear" if linear else "mm", key[3], key[4])
            self._dtypes[key] = dtype
        return dtype

    def _rows_times(self, rows: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None,
                    linear: bool) -> torch.Tensor:
        dtype = self._dtype_for(right, bias, linear)
        # Row-major, as the check computed them (a transposed input keeps its strides).
        flat = rows.reshape(-1, rows.shape[-1]).to(dtype).contiguous()
        out = _row_product(flat, self._wide(right, dtype), self._wide(bias, dtype), linear)
        return out.reshape(*rows.shape[:-1], out.shape[-1])

    def _as_rows(self, func, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """A product of rows times one matrix (``F.linear``, ``x @ w`` with a 2-D ``w``);
        None for other forms."""
        if func is F.linear:
            named = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
            rows, right, bias = named.get("input"), named.get("weight"), named.get("bias")
            if (isinstance(rows, torch.Tensor) and isinstance(right, torch.Tensor)
                    and right.dim() == 2 and (bias is None or bias.dim() <= 1)):
                return self._rows_times(rows, right, bias, linear=True)
        elif len(args) == 2 and not kwargs:
            rows, right = args
            # torch.mm takes 2-D rows only; matmul any rows against a 2-D matrix.
            lowest = 2 if func in (torch.mm, torch.Tensor.mm) else 1
            if (isinstance(rows, torch.Tensor) and isinstance(right, torch.Tensor)
                    and right.dim() == 2 and rows.dim() >= lowest):
                return self._rows_times(rows, right, None, linear=False)
        return None

    def _grouped(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor | None:
        """``torch._grouped_mm`` for the layouts with one matrix per group of rows (``a [T, K]``,
        ``b [G, K, N]``, ``offs`` the groups' ends: each group as rows times its matrix; rows
        beyond the last group get zeros, where torch leaves them unset) or per batch entry (3D x 3D,
        no ``offs``: a batch, fp32); None for the others."""
        if bias is not None:
            return None
        if a.dim() == 3 and b.dim() == 3 and offs is None:
            return torch.bmm(a.float(), b.float())
        if a.dim() != 2 or b.dim() != 3 or offs is None:
            return None
        # Every group's matrix has one shape and layout, so one check covers them all.
        dtype = self._dtype_for(b[0], None, linear=False)
        rows, matrices = a.to(dtype).contiguous(), self._wide(b, dtype)
        out = rows.new_zeros(a.shape[0], b.shape[-1])
        start = 0
        for group, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = _row_product(rows[start:end], matrices[group], None, linear=False)
            start = end
        return out


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


__all__ = ["CHECK_ELEMENTS", "CHECK_ROWS", "MIN_ROWS", "PRODUCTS", "ROW_BLOCK", "Bf16Products", "check_rows", "padded_rows", "row_invariant", "scope", "to_bf16"]
