"""FP8 weights for the embedded server: SGLang's ``--quantization fp8`` / ``w8a8_fp8``.

What SGLang 0.5.23 does with a bf16 checkpoint and ``--quantization fp8`` (online
quantization, ``layers/quantization/fp8.py``), on a GPU with FP8 kernels (H100):

- every ``LinearBase`` (q/k/v/o projections, dense MLPs) is stored as float8 e4m3 with one
  fp32 scale per output channel (``per_token_group_quant_fp8(weight, in_features)``);
- every fused MoE layer is stored as float8 with one scale per expert and matrix
  (``scaled_fp8_quant`` of each expert's fused gate/up matrix and of its down matrix);
- left in the checkpoint's precision: the router gate (Qwen3-MoE builds ``mlp.gate`` with
  ``quant_config=None``), the embeddings and ``lm_head`` (not linear layers for the FP8
  config) and the norms. Qwen's own FP8 checkpoints (Qwen3-30B-A3B-FP8) keep the same
  modules in bf16 and store the rest block-wise, one scale per 128 x 128 block
  (``weight_block_size: [128, 128]``, ``activation_scheme: dynamic``).

On FP8 hardware SGLang also quantizes activations dynamically (per token for the linear
layers; per tensor over the batch for the online MoE path, per token with
``w8a8_fp8``, which also scales experts per channel). Its weight-only path (Marlin, GPUs
without FP8) keeps bf16 activations. Here:

- ``fp8``: SGLang's weight layout above, computed with bf16 activations (weight-only, as
  the paper's "FP8 inference" differs from bf16 first of all by its weights);
- ``w8a8_fp8``: per-channel weights everywhere and activations quantized per token before
  each quantized matmul -- SGLang's W8A8 numerics. Per token rather than per tensor for
  the experts too: a per-tensor activation scale would make a token's result depend on the
  other rows of its batch, which the embedded server guarantees it does not;
- :data:`BLOCK_FP8` (from Python only): the 128 x 128 block layout of Qwen's checkpoints.

The CPU has no FP8 matmul: weights are stored as ``torch.float8_e4m3fn`` codes with fp32
scales (the memory saving is real: 1 byte per weight) and each layer dequantizes its
weight to the compute dtype in its forward; the numerics are FP8 weights with bf16
compute. Quantization is deterministic (``scale = amax / 448``, round to nearest).

Weight updates load through the modules: :class:`Fp8Linear` and :class:`Fp8Experts`
keep the Hugging Face state-dict names and shapes (``state_dict()`` returns the
dequantized weights in the compute dtype; ``load_state_dict`` quantizes what it is
given), so ``/update_weights_from_disk`` and the distributed update quantize whatever they
load in this one place, after casting to the compute dtype (so both paths serve the same
bits). Quantizing the dequantized weights gives the same codes and scales back (each
group's largest value is 448 x its scale, and a code times its scale rounds to a value
within 2^-9 of it in bf16, far inside half an FP8 step), so re-loading the served weights,
or the untouched part of a partial update, changes no bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_FLOOR = 1e-12
"""Least amax a scale is computed from (an all-zero group gets codes 0, not a NaN)."""

Granularity = Literal["tensor", "channel", "block"]


@dataclass(frozen=True, kw_only=True)
class Fp8Scheme:
    """How the weights are scaled and whether activations are quantized."""

    linear: Granularity
    """Scales of the linear layers: one per matrix, per output channel, or per block."""
    experts: Granularity
    """Scales of each expert's matrices (always separate per expert)."""
    block: tuple[int, int] = (128, 128)
    """Block shape (output rows, input columns) for ``block`` granularity."""
    activations: Literal["bf16", "per_token"] = "bf16"
    """``per_token``: each token's input to a quantized matmul is rounded to FP8 with its
    own dynamic scale (SGLang's W8A8); ``bf16``: activations stay in the compute dtype."""


SCHEMES: dict[str, Fp8Scheme] = {
    "fp8": Fp8Scheme(linear="channel", experts="tensor"),
    "w8a8_fp8": Fp8Scheme(linear="channel", experts="channel", activations="per_token"),
}
"""The server's ``--quantization`` methods (SGLang's names)."""
BLOCK_FP8 = Fp8Scheme(linear="block", experts="block")
"""Qwen3 FP8 checkpoints' layout: 128 x 128 blocks, weight-only here."""

KEPT_MODULES = ("embed_tokens", "lm_head", "mlp.gate (router)", "norms")
"""What stays in the compute dtype, as in SGLang and Qwen's FP8 checkpoints."""


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[..., N, K]`` zero-padded to whole blocks, viewed ``[..., nb, bn, kb, bk]``."""
    bn, bk = block
    n, k = x.shape[-2:]
    pad_n, pad_k = -n % bn, -k % bk
    if pad_n or pad_k:
        x = F.pad(x, (0, pad_k, 0, pad_n))
    return x.reshape(*x.shape[:-2], (n + pad_n) // bn, bn, (k + pad_k) // bk, bk)


def group_amax(x: torch.Tensor, granularity: Granularity, block: tuple[int, int]) -> torch.Tensor:
    """The largest value of each scale group of a ``[..., N, K]`` tensor, in the scale's
    shape (``[..., 1, 1]``, ``[..., N, 1]`` or ``[..., ceil(N/bn), ceil(K/bk)]``)."""
    if granularity == "tensor":
        return torch.amax(x, dim=(-2, -1), keepdim=True)
    if granularity == "channel":
        return torch.amax(x, dim=-1, keepdim=True)
    return torch.amax(_blocks(x, block), dim=(-3, -1))


def expand_scale(scale: torch.Tensor, shape: torch.Size, granularity: Granularity,
                 block: tuple[int, int]) -> torch.Tensor:
    """A per-group tensor broadcast to every element of a ``shape`` weight."""
    if granularity != "block":
        return scale.expand(shape)
    n, k = shape[-2:]
    bn, bk = block
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def quantize(weight: torch.Tensor, granularity: Granularity,
             block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: float8 e4m3 codes of ``weight [..., N, K]`` and the fp32 scales
    of its groups (``[..., 1, 1]`` per tensor, ``[..., N, 1]`` per channel, ``[..., N/bn,
    K/bk]`` per block, rounded up), so that ``codes * scale`` approximates ``weight``. The
    largest magnitude of each group maps to 448 exactly."""
    x = weight.detach().float()
    scale = group_amax(x.abs(), granularity, block).clamp(min=SCALE_FLOOR) / FP8_MAX
    full = expand_scale(scale, x.shape, granularity, block)
    codes = (x / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, granularity: Granularity,
               block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * expand_scale(scale, codes.shape, granularity, block)).to(dtype)


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Each row (token) of ``x`` rounded to FP8 with its own dynamic scale, back in
    ``x``'s dtype: what the matmul sees under SGLang's per-token activation quantization."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR) / FP8_MAX
    return ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale).to(x.dtype)


class _Fp8Weights(nn.Module):
    """Quantized weights stored as codes and scales under their Hugging Face names."""

    granularity: Granularity
    names: tuple[str, ...]

    def __init__(self, scheme: Fp8Scheme, granularity: Granularity, dtype: torch.dtype):
        super().__init__()
        self.scheme, self.granularity, self.dtype = scheme, granularity, dtype

    def _store(self, name: str, weight: torch.Tensor) -> None:
        codes, scale = quantize(weight.to(self.dtype), self.granularity, self.scheme.block)
        self.register_buffer(f"{name}_fp8", codes, persistent=False)
        self.register_buffer(f"{name}_scale", scale, persistent=False)

    def weight(self, name: str, index=()) -> torch.Tensor:
        """The dequantized weight (or the slice ``index`` of its leading dims)."""
        codes, scale = getattr(self, f"{name}_fp8")[index], getattr(self, f"{name}_scale")[index]
        return dequantize(codes, scale, self.granularity, self.scheme.block, self.dtype)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_tokens(x) if self.scheme.activations == "per_token" else x

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # a bias, if any
        for name in self.names:
            destination[prefix + name] = self.weight(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        own = {prefix + name for name in self.names}
        before = len(unexpected_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        unexpected_keys[before:] = [k for k in unexpected_keys[before:] if k not in own]
        for name in self.names:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            codes = getattr(self, f"{name}_fp8")
            incoming = state_dict[key]
            if incoming.shape != codes.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(incoming.shape)}, the served model has "
                                  f"{tuple(codes.shape)}")
                continue
            self._load(name, incoming)

    @torch.no_grad()
    def _load(self, name: str, weight: torch.Tensor) -> None:
        codes, scale = quantize(weight.to(self.dtype), self.granularity, self.scheme.block)
        getattr(self, f"{name}_fp8").copy_(codes)
        getattr(self, f"{name}_scale").copy_(scale)


class Fp8Linear(_Fp8Weights):
    """``nn.Linear`` with an FP8 weight (state-dict names ``weight``, ``bias``)."""

    names = ("weight",)

    def __init__(self, linear: nn.Linear, scheme: Fp8Scheme):
        super().__init__(scheme, scheme.linear, linear.weight.dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store("weight", linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._act(x), self.weight("weight"), self.bias)


class Fp8Experts(_Fp8Weights):
    """transformers' fused Qwen3-MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj
    [E, H, I]``) with FP8 weights, scaled per expert; computes each hit expert like the
    eager implementation, dequantizing only that expert's matrices."""

    names = ("gate_up_proj", "down_proj")

    def __init__(self, experts: nn.Module, scheme: Fp8Scheme):
        super().__init__(scheme, scheme.experts, experts.gate_up_proj.dtype)
        self.num_experts, self.act_fn = experts.num_experts, experts.act_fn
        for name in self.names:
            self._store(name, getattr(experts, name))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # transformers' marker of a dropped slot
                continue
            token, slot = torch.where(top_k_index == expert)
            x = self._act(hidden_states[token])
            gate, up = F.linear(x, self.weight("gate_up_proj", expert)).chunk(2, dim=-1)
            h = self._act(self.act_fn(gate) * up)
            h = F.linear(h, self.weight("down_proj", expert)) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    return all(getattr(getattr(module, n, None), "dim", lambda: 0)() == 3
               for n in ("gate_up_proj", "down_proj"))


def quantize_model(model: nn.Module, scheme: Fp8Scheme) -> list[str]:
    """Replace, in place, every linear layer but ``lm_head`` and every fused experts
    module by its FP8 version; return their names. The router gates, embeddings and norms
    are not linear layers and stay as they are."""
    replaced = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] == "lm_head":
            continue
        if isinstance(module, nn.Linear):
            new: nn.Module = Fp8Linear(module, scheme)
        elif _is_fused_experts(module):
            new = Fp8Experts(module, scheme)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced.append(name)
    return replaced


def check_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the tensor if a weight to be quantized is not finite (one
    NaN would make its whole group's scale NaN); nothing is changed."""
    for name, module in model.named_modules():
        if isinstance(module, _Fp8Weights):
            for weight in module.names:
                key = f"{name}.{weight}"
                tensor = state.get(key)
                if tensor is not None and not torch.isfinite(tensor).all():
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(f"{key} holds {bad} non-finite values; FP8 scales need "
                                     "finite weights")


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by quantized codes + scales and by everything else."""
    fp8 = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
              if n.endswith(("_fp8", "_scale")))
    rest = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"fp8": fp8, "other": rest}
