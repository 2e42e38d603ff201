"""Load a Hugging Face Qwen3-MoE checkpoint into a sharded megatron model.

Every rank reads only its own slices (safetensors reads a slice without loading the
tensor), so no rank holds the whole model and no communication is needed. Before reading,
every rank checks the checkpoint against the model: its ``config.json`` (architecture
fields) and the name and shape of every tensor, so a wrong checkpoint fails on all ranks
with the tensor and both shapes named.

A checkpoint whose vocabulary is smaller than the model's (a table padded for tensor
parallelism) is accepted: the extra rows are zero.

:func:`model_config_from_hf` goes the other way for the converter: the
:class:`ModelConfig` of a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_rl.model.config import ModelConfig
from megatron_rl.weight_sync.hf_config import to_hf_config
from megatron_rl.weight_sync.hf_mapping import (
    LocalParam,
    hf_tensor_shapes,
    hf_to_shard,
    local_params,
)

logger = logging.getLogger(__name__)

# config.json fields that must equal the model's for the weights to mean the same thing.
_CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
    "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "hidden_act",
)  # fmt: skip


def _read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{hf_dir} is not a Hugging Face checkpoint (no config.json)"
        ) from None
    # transformers 5 writes these under new names; older files use the legacy ones.
    if "num_experts" not in data and "num_local_experts" in data:
        data["num_experts"] = data["num_local_experts"]
    if "rope_theta" not in data and "rope_theta" in (data.get("rope_parameters") or {}):
        data["rope_theta"] = data["rope_parameters"]["rope_theta"]
    return data


def _moe_pattern(data: dict[str, Any]) -> list[int]:
    dense = {int(i) for i in data.get("mlp_only_layers") or []}
    step = int(data.get("decoder_sparse_step", 1) or 1)
    experts = int(data.get("num_experts", 0) or 0)
    return [
        int(experts > 0 and i not in dense and (i + 1) % step == 0)
        for i in range(int(data["num_hidden_layers"]))
    ]


def check_hf_config(hf_dir: str | os.PathLike, config: ModelConfig) -> None:
    """Refuse a checkpoint whose architecture differs from ``config`` (names every field)."""
    data = _read_config(hf_dir)
    if data.get("model_type") not in (None, "qwen3_moe"):
        raise ValueError(f"{hf_dir}: model_type {data.get('model_type')!r} is not qwen3_moe")
    expected = to_hf_config(config).to_dict()
    expected["num_experts"] = config.num_experts
    expected["rope_theta"] = config.rotary_base
    diffs = []
    for name in _CONFIG_FIELDS:
        have, want = data.get(name), expected.get(name)
        same = (
            abs(float(have) - float(want)) <= 1e-12 * abs(float(want))
            if isinstance(want, float) and isinstance(have, (int, float))
            else have == want
        )
        if not same:
            diffs.append(f"{name}: checkpoint {have!r}, model {want!r}")
    if _moe_pattern(data) != config.moe_layer_pattern():
        diffs.append(
            f"MoE layers: checkpoint {_moe_pattern(data)}, model {config.moe_layer_pattern()}"
        )
    if int(data.get("vocab_size", 0)) > config.vocab_size:
        diffs.append(
            f"vocab_size: checkpoint {data.get('vocab_size')} exceeds the model's "
            f"{config.vocab_size}"
        )
    if diffs:
        raise ValueError(
            f"{hf_dir} holds another model than the one configured:\n  " + "\n  ".join(diffs)
        )


def model_config_from_hf(
    hf_dir: str | os.PathLike, *, base: ModelConfig | None = None, **overrides: Any
) -> ModelConfig:
    """The :class:`ModelConfig` of the checkpoint in ``hf_dir``, with its tokenizer when the
    directory has one. Fields the HF config does not hold (sequence length, dispatcher,
    recomputation, ...) and the tokenizer otherwise come from ``base``."""
    data = _read_config(hf_dir)
    base = base or ModelConfig()
    has_tokenizer = any(
        (Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    pattern = _moe_pattern(data)
    config = base.replace(
        preset_name="custom",
        num_layers=int(data["num_hidden_layers"]),
        hidden_size=int(data["hidden_size"]),
        ffn_hidden_size=int(data["intermediate_size"]),
        num_attention_heads=int(data["num_attention_heads"]),
        num_query_groups=int(data.get("num_key_value_heads", data["num_attention_heads"])),
        kv_channels=int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]),
        num_experts=int(data["num_experts"]),
        moe_router_topk=int(data["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(data["moe_intermediate_size"]),
        moe_layer_freq="1" if all(pattern) else json.dumps(pattern).replace(" ", ""),
        max_position_embeddings=int(data.get("max_position_embeddings", 4096)),
        vocab_size=int(data["vocab_size"]),
        rotary_base=float(data.get("rope_theta", 1_000_000.0)),
        norm_epsilon=float(data.get("rms_norm_eps", 1e-6)),
        init_method_std=float(data.get("initializer_range", 0.02)),
        moe_aux_loss_coeff=float(data.get("router_aux_loss_coef", 0.0) or 0.0),
        tokenizer=str(hf_dir) if has_tokenizer else base.tokenizer,
    ).replace(**overrides)
    if not data.get("norm_topk_prob", False):
        raise ValueError(
            f"{hf_dir}: norm_topk_prob=false routing (no renormalisation of the "
            "top-k gates) has no megatron-core equivalent here"
        )
    config.check()
    return config


class HFCheckpoint:
    """Lazy access to the tensors of a safetensors checkpoint directory (one file, or
    several with or without ``model.safetensors.index.json``)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.directory = Path(hf_dir)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {hf_dir}")
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        for path in files:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"{hf_dir}: tensor {name} is in two files")
                self._where[name] = handle

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(h.get_slice(n).get_shape()) for n, h in self._where.items()}

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """The tensor, or its rows/columns ``start:stop`` along ``dim`` (read lazily)."""
        piece = self._where[name].get_slice(name)
        if dim is None:
            return piece[:]
        index = (slice(None),) * dim + (slice(start, stop),)
        return piece[index]


def check_hf_tensors(checkpoint: HFCheckpoint, config: ModelConfig) -> None:
    """Every expected tensor present with its shape, nothing else (names both shapes)."""
    expected = hf_tensor_shapes(config)
    found = checkpoint.shapes()
    problems = [f"{n} is missing" for n in expected if n not in found]
    problems += [
        f"{n} {list(s)} is not part of the configured model"
        for n, s in found.items()
        if n not in expected
    ]
    for name, shape in found.items():
        want = expected.get(name)
        if want is None or shape == want:
            continue
        padded_vocab = (
            name in ("model.embed_tokens.weight", "lm_head.weight")
            and shape[1:] == want[1:]
            and shape[0] < want[0]
        )
        if not padded_vocab:
            problems.append(
                f"{name} has shape {list(shape)} in the checkpoint, the model expects {list(want)}"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{checkpoint.directory} does not fit the model:\n  {shown}{more}")


def _read_shard(
    checkpoint: HFCheckpoint,
    param: LocalParam,
    hf_name: str,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
) -> torch.Tensor:
    """This rank's slice of one HF tensor: part ``shard`` of ``num_shards`` equal parts
    along the split dimension. Vocabulary rows past the checkpoint's are zero."""
    dim = param.tmap.split_dim
    if dim is None:
        return checkpoint.read(hf_name)
    size = expected[hf_name][dim] // param.num_shards
    start, stop = param.shard * size, (param.shard + 1) * size
    available = found[hf_name][dim]
    if stop <= available:
        return checkpoint.read(hf_name, dim, start, stop)
    if not param.tmap.vocab or dim != 0:  # check_hf_tensors lets only vocab rows be short
        raise ValueError(f"{hf_name}: {available} entries along dim {dim}, {stop} needed")
    rows = checkpoint.read(hf_name, dim, min(start, available), available)
    padding = torch.zeros((stop - start - rows.shape[0], *rows.shape[1:]), dtype=rows.dtype)
    return torch.cat([rows, padding])


@torch.no_grad()
def load_hf_weights(
    chunks: Sequence[torch.nn.Module], config: ModelConfig, hf_dir: str | os.PathLike
) -> int:
    """Copy the checkpoint in ``hf_dir`` into this rank's parameters; returns how many
    parameters were loaded. Call on every rank (no communication)."""
    check_hf_config(hf_dir, config)
    with HFCheckpoint(hf_dir) as checkpoint:
        check_hf_tensors(checkpoint, config)
        expected, found = hf_tensor_shapes(config), checkpoint.shapes()
        count = 0
        for param in local_params(chunks):
            pieces = [
                _read_shard(checkpoint, param, n, expected, found) for n in param.tmap.hf_names
            ]
            shard = hf_to_shard(param.tmap, pieces, config)
            if tuple(shard.shape) != tuple(param.tensor.shape):
                raise ValueError(
                    f"{param.name}: the slice built from {', '.join(param.tmap.hf_names)} has "
                    f"shape {list(shard.shape)}, this rank's parameter {list(param.tensor.shape)}"
                )
            param.tensor.data.copy_(shard)
            count += 1
    logger.info("loaded %d parameters from %s", count, hf_dir)
    return count

