"""Megatron-core parameter names <-> Hugging Face Qwen3-MoE tensor names, and the
per-shard tensor transforms between them.

Why not ``mbridge``: mbridge 0.15.1 builds its models with the Transformer Engine layer spec,
and its Qwen3-MoE name table only knows TE names. Probed against that release, it raises
``NotImplementedError`` for the local (CPU) spec's ``input_layernorm.weight`` and
``mlp.experts.local_experts.{i}.linear_fc1.weight``, and also for the dense layers of a
Qwen3-MoE with ``mlp_only_layers`` (``mlp.linear_fc1.weight``) even under TE. It would also
add its own model provider and gather code beside ours. The table below is small, covers
both specs, and is checked by round-trip and logits tests, so it is the mapping we use.

Both layer specs the provider builds are covered. Per layer (HF prefix
``model.layers.{L}.``; "local | TE" where the two specs name a parameter differently):

- ``input_layernorm.weight`` | ``self_attention.linear_qkv.layer_norm_weight``
  -> ``input_layernorm.weight``
- ``self_attention.linear_qkv.weight`` -> ``self_attn.{q,k,v}_proj.weight``
- ``self_attention.linear_proj.weight`` -> ``self_attn.o_proj.weight``
- ``self_attention.{q,k}_layernorm.weight`` -> ``self_attn.{q,k}_norm.weight``
- ``pre_mlp_layernorm.weight`` | ``mlp.linear_fc1.layer_norm_weight`` (dense layers; MoE
  layers keep ``pre_mlp_layernorm`` under TE) -> ``post_attention_layernorm.weight``
- dense: ``mlp.linear_fc1.weight`` -> ``mlp.{gate,up}_proj.weight``,
  ``mlp.linear_fc2.weight`` -> ``mlp.down_proj.weight``
- MoE: ``mlp.router.weight`` -> ``mlp.gate.weight``;
  ``mlp.experts.local_experts.{E}.linear_fc1.weight`` | ``mlp.experts.linear_fc1.weight{E}``
  -> ``mlp.experts.{E}.{gate,up}_proj.weight``;
  ``mlp.experts.local_experts.{E}.linear_fc2.weight`` | ``mlp.experts.linear_fc2.weight{E}``
  -> ``mlp.experts.{E}.down_proj.weight``

and ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight``,
``decoder.final_layernorm.weight`` -> ``model.norm.weight``, ``output_layer.weight`` ->
``lm_head.weight``.

Names here are *canonical*: layer ``L`` and expert ``E`` are global indices (a pipeline
stage numbers its layers from 0, an expert-parallel rank its experts from 0;
:func:`local_params` translates). Tensor-parallel shards convert one at a time, because
each shard is self-contained: a QKV shard holds whole query groups, each laid out as
``[q heads of the group; k; v]``, and a SwiGLU fc1 shard is ``[gate shard; up shard]``.
So the HF tensors are the concatenation over shards of the per-shard pieces along
:attr:`TensorMap.split_dim`, and a shard is rebuilt from the matching slices of the HF
tensors, whatever the tensor-parallel size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_rl.model.config import ModelConfig

Layout = Literal["copy", "qkv", "glu"]


class UnknownParameterError(KeyError):
    """A megatron parameter this mapping has no Hugging Face name for."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class TensorMap:
    """How one megatron parameter becomes Hugging Face tensors."""

    megatron_name: str
    """Canonical megatron name (global layer and expert indices)."""
    hf_names: tuple[str, ...]
    """The Hugging Face tensors it holds, in the order :attr:`layout` splits them."""
    layout: Layout
    """``copy``: one tensor as is; ``qkv``: grouped [q; k; v] rows; ``glu``: [gate; up] rows."""
    split_dim: int | None
    """Dimension split over tensor-parallel ranks (of the megatron tensor and of every HF
    tensor alike); None when every rank holds the whole tensor."""
    expert: bool = False
    """Split over the expert-tensor-parallel group rather than the tensor-parallel one."""
    vocab: bool = False
    """Rows are vocabulary entries (the embedding and the output layer)."""


_TOP_LEVEL = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0, True),
    "decoder.final_layernorm.weight": ("model.norm.weight", None, False),
    "output_layer.weight": ("lm_head.weight", 0, True),
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT_LOCAL = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")
_EXPERT_TE = re.compile(r"mlp\.experts\.linear_fc([12])\.weight(\d+)")
# Layer-relative megatron name -> (HF names relative to the layer, layout, split dim).
_LAYER_PARAMS: dict[str, tuple[tuple[str, ...], Layout, int | None]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
        0,
    ),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy", 1),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy", None),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy", None),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu", 0),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy", 1),
    "mlp.router.weight": (("mlp.gate.weight",), "copy", None),
}


def map_megatron_name(name: str) -> TensorMap:
    """The :class:`TensorMap` of the canonical megatron parameter ``name``."""
    if name in _TOP_LEVEL:
        hf_name, dim, vocab = _TOP_LEVEL[name]
        return TensorMap(name, (hf_name,), "copy", dim, vocab=vocab)
    match = _LAYER.fullmatch(name)
    if match is None:
        raise UnknownParameterError(_unknown(name))
    layer, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_PARAMS:
        hf, layout, dim = _LAYER_PARAMS[rest]
        return TensorMap(name, tuple(prefix + h for h in hf), layout, dim)
    expert = _EXPERT_LOCAL.fullmatch(rest)
    if expert is not None:
        index, fc = int(expert.group(1)), expert.group(2)
    elif (expert := _EXPERT_TE.fullmatch(rest)) is not None:
        fc, index = expert.group(1), int(expert.group(2))
    else:
        raise UnknownParameterError(_unknown(name))
    base = f"{prefix}mlp.experts.{index}."
    if fc == "1":
        return TensorMap(
            name, (base + "gate_proj.weight", base + "up_proj.weight"), "glu", 0, expert=True
        )
    return TensorMap(name, (base + "down_proj.weight",), "copy", 1, expert=True)


def _unknown(name: str) -> str:
    return (
        f"megatron parameter {name!r} has no Hugging Face Qwen3-MoE name (biases, shared "
        "experts, MTP layers and the legacy GroupedMLP are not part of this model)"
    )


# ---- per-shard transforms --------------------------------------------------------------


def _qkv_geometry(config: ModelConfig) -> tuple[int, int]:
    """(query heads per group, head dim)."""
    return config.num_attention_heads // config.num_query_groups, config.kv_channels


def shard_to_hf(tmap: TensorMap, shard: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """This shard's piece of each of ``tmap.hf_names`` (views where possible)."""
    if tmap.layout == "copy":
        return [shard]
    if tmap.layout == "glu":
        if shard.shape[0] % 2:
            raise ValueError(
                f"{tmap.megatron_name}: SwiGLU fc1 shard has an odd row count {shard.shape[0]}"
            )
        gate, up = shard.chunk(2, dim=0)
        return [gate, up]
    per_group, head_dim = _qkv_geometry(config)
    rows = (per_group + 2) * head_dim
    if shard.shape[0] % rows:
        raise ValueError(
            f"{tmap.megatron_name}: {shard.shape[0]} QKV rows are not whole query groups of "
            f"{rows} rows ({per_group} query heads + k + v, head dim {head_dim})"
        )
    groups = shard.shape[0] // rows
    grouped = shard.reshape(groups, per_group + 2, head_dim, shard.shape[-1])
    q = grouped[:, :per_group].reshape(groups * per_group * head_dim, -1)
    k = grouped[:, per_group].reshape(groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, -1)
    return [q, k, v]


def hf_to_shard(
    tmap: TensorMap, pieces: Sequence[torch.Tensor], config: ModelConfig
) -> torch.Tensor:
    """Inverse of :func:`shard_to_hf`: one shard from this shard's slice of each HF tensor."""
    if len(pieces) != len(tmap.hf_names):
        raise ValueError(
            f"{tmap.megatron_name}: expected {len(tmap.hf_names)} HF tensors, got {len(pieces)}"
        )
    if tmap.layout == "copy":
        return pieces[0]
    if tmap.layout == "glu":
        return torch.cat(list(pieces), dim=0)
    per_group, head_dim = _qkv_geometry(config)
    q, k, v = pieces
    groups = k.shape[0] // head_dim
    hidden = q.shape[-1]
    parts = (
        q.reshape(groups, per_group, head_dim, hidden),
        k.reshape(groups, 1, head_dim, hidden),
        v.reshape(groups, 1, head_dim, hidden),
    )
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def assemble_hf(
    tmap: TensorMap, shards: Sequence[torch.Tensor], config: ModelConfig
) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensors from all tensor-parallel shards of one parameter (shard order)."""
    per_shard = [shard_to_hf(tmap, s, config) for s in shards]
    out = []
    for i, name in enumerate(tmap.hf_names):
        pieces = [p[i] for p in per_shard]
        if len(pieces) == 1:
            out.append((name, pieces[0]))
        else:
            assert tmap.split_dim is not None, tmap
            out.append((name, torch.cat(pieces, dim=tmap.split_dim)))
    return out


# ---- the expected Hugging Face checkpoint ----------------------------------------------


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the Hugging Face checkpoint of ``config``, in the
    order of the model (embedding, layers, final norm, LM head)."""
    h, d = config.hidden_size, config.kv_channels
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer, moe in enumerate(config.moe_layer_pattern()):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (config.num_attention_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (config.num_query_groups * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (config.num_query_groups * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.num_attention_heads * d)
        shapes[p + "self_attn.q_norm.weight"] = (d,)
        shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if moe:
            shapes[p + "mlp.gate.weight"] = (config.num_experts, h)
            f = config.moe_ffn_hidden_size
            for e in range(config.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (f, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (f, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, f)
        else:
            f = config.ffn_hidden_size
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def order_key(name: str) -> tuple:
    """Sort key of canonical megatron names: embedding, layers (then experts) in order,
    final norm, output layer -- the order a checkpoint is streamed in."""
    if name.startswith("embedding."):
        return (0,)
    match = _LAYER.fullmatch(name)
    if match is not None:
        rest = match.group(2)
        expert = _EXPERT_LOCAL.fullmatch(rest)
        index = int(expert.group(1)) if expert else -1
        if expert is None and (te := _EXPERT_TE.fullmatch(rest)) is not None:
            index = int(te.group(2))
        return (1, int(match.group(1)), index, rest)
    return (3,) if name.startswith("output_layer.") else (2, name)


# ---- this rank's parameters under their canonical names --------------------------------


@dataclass
class LocalParam:
    """One parameter of this rank, named canonically, with its tensor-parallel position."""

    name: str
    tensor: torch.Tensor
    shard: int
    num_shards: int
    tmap: TensorMap


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def local_params(chunks: Sequence[torch.nn.Module]) -> list[LocalParam]:
    """This rank's parameters (every virtual pipeline chunk) with canonical names."""
    from megatron.core import parallel_state as ps

    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        for local_name, param in model.named_parameters():
            name = _canonical(local_name, layers)
            tmap = map_megatron_name(name)
            shard, count = (0, 1) if tmap.split_dim is None else (etp if tmap.expert else tp)
            declared = getattr(param, "partition_dim", None)
            if (
                count > 1
                and getattr(param, "tensor_model_parallel", False)
                and declared != tmap.split_dim
            ):
                raise ValueError(
                    f"{local_name}: megatron splits it along dim {declared}, the HF mapping "
                    f"along dim {tmap.split_dim}"
                )
            out.append(LocalParam(name, param, shard, count, tmap))
    return out


def _canonical(local_name: str, layers: Sequence[torch.nn.Module]) -> str:
    """Replace a chunk's local layer index and a rank's local expert index by global ones."""
    match = _LAYER.fullmatch(local_name)
    if match is None:
        return local_name
    index, rest = int(match.group(1)), match.group(2)
    layer = layers[index]
    # layer_number is megatron's 1-based global index (pipeline and virtual stages included).
    prefix = f"decoder.layers.{layer.layer_number - 1}."
    expert = _EXPERT_LOCAL.fullmatch(rest)
    if expert is not None:
        global_id = layer.mlp.local_expert_indices[int(expert.group(1))]
        return f"{prefix}mlp.experts.local_experts.{global_id}.linear_fc{expert.group(2)}.weight"
    te = _EXPERT_TE.fullmatch(rest)
    if te is not None:
        global_id = layer.mlp.local_expert_indices[int(te.group(2))]
        return f"{prefix}mlp.experts.linear_fc{te.group(1)}.weight{global_id}"
    return prefix + rest
