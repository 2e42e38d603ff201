"""The trainer's :class:`ModelConfig` as a Hugging Face ``Qwen3MoeConfig``, and back.

The rollout side (SGLang, or the embedded server) serves Hugging Face checkpoints; the
trainer describes its model with :class:`ModelConfig`. This module is the one place that
translates between the two, so the served model and the trained model have the same shape:

- dense layers are listed explicitly in ``mlp_only_layers`` (with ``decoder_sparse_step=1``):
  Megatron's integer ``--moe-layer-freq N`` marks layers ``i % N == 0`` as MoE while HF's
  ``decoder_sparse_step`` counts ``(i + 1) % N == 0``, so the step cannot be passed through;
- ``norm_topk_prob=True``: Qwen3's router (softmax over all experts, top-k, renormalise)
  then gives the same gate weights as megatron-core's default (top-k on the logits, softmax
  over the k);
- no biases, untied embeddings, explicit ``head_dim`` (``kv_channels`` may differ from
  ``hidden_size / heads``, as in Qwen3-30B-A3B).

:class:`ModelShape` is what a rollout client checks a server against: the numbers that
must agree for token ids, logprobs and routed experts to mean the same thing on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from megatron_rl.model.config import ModelConfig
from megatron_rl.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The parts of a model's shape that rollouts depend on."""

    vocab_size: int
    num_hidden_layers: int
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    """0-based indices of the MoE layers among all hidden layers."""

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> ModelShape:
        return cls(
            vocab_size=config.vocab_size,
            num_hidden_layers=config.num_layers,
            num_experts=config.num_experts,
            num_experts_per_tok=config.moe_router_topk,
            moe_layers=tuple(config.moe_layer_indices()),
        )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Qwen3MoeConfig) -> ModelShape:
        """Read a Qwen3-MoE ``config.json`` (a dict) or a ``Qwen3MoeConfig``."""
        data = config.to_dict() if isinstance(config, Qwen3MoeConfig) else dict(config)
        missing = [k for k in ("vocab_size", "num_hidden_layers") if k not in data]
        if missing:
            raise ValueError(f"Hugging Face config lacks {missing}")
        layers = int(data["num_hidden_layers"])
        experts = int(data.get("num_experts", data.get("num_local_experts", 0)) or 0)
        dense = {int(i) for i in data.get("mlp_only_layers") or []}
        step = int(data.get("decoder_sparse_step", 1) or 1)
        # The same rule Qwen3MoeDecoderLayer applies when it builds each layer.
        moe = tuple(
            i for i in range(layers) if experts > 0 and i not in dense and (i + 1) % step == 0
        )
        return cls(
            vocab_size=int(data["vocab_size"]),
            num_hidden_layers=layers,
            num_experts=experts,
            num_experts_per_tok=int(data.get("num_experts_per_tok", 0) or 0),
            moe_layers=moe,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelShape:
        """Inverse of :meth:`to_dict` (the ``model_shape`` the embedded server reports)."""
        try:
            return cls(
                vocab_size=int(data["vocab_size"]),
                num_hidden_layers=int(data["num_hidden_layers"]),
                num_experts=int(data["num_experts"]),
                num_experts_per_tok=int(data["num_experts_per_tok"]),
                moe_layers=tuple(int(i) for i in data["moe_layers"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed model shape {dict(data)!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["moe_layers"] = list(self.moe_layers)
        return out

    def differences(self, other: ModelShape) -> list[str]:
        """Human-readable ``name: self vs other`` for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def to_hf_config(
    model_config: ModelConfig,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Qwen3MoeConfig:
    """The Hugging Face config of the model the trainer builds from ``model_config``."""
    model_config.check()
    pattern = model_config.moe_layer_pattern()
    return Qwen3MoeConfig(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.hidden_size,
        intermediate_size=model_config.ffn_hidden_size,
        num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_attention_heads,
        num_key_value_heads=model_config.num_query_groups,
        head_dim=model_config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=model_config.max_position_embeddings,
        initializer_range=model_config.init_method_std,
        rms_norm_eps=model_config.norm_epsilon,
        rope_theta=model_config.rotary_base,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
        moe_intermediate_size=model_config.moe_ffn_hidden_size,
        num_experts=model_config.num_experts,
        num_experts_per_tok=model_config.moe_router_topk,
        norm_topk_prob=True,
        router_aux_loss_coef=model_config.moe_aux_loss_coeff,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def save_random_checkpoint(
    model_config: ModelConfig,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a randomly initialised Qwen3-MoE checkpoint and its tokenizer to ``directory``.

    The result (``config.json``, ``model.safetensors``, tokenizer files) is what the
    embedded rollout server and SGLang load before the first weight sync. The same ``seed``
    gives the same weights."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_config.tokenizer, model_config.vocab_size)
    hf_config = to_hf_config(
        model_config,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Initialise on a private generator state so callers' RNG streams are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(hf_config)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    add_legacy_config_keys(path)
    tokenizer.save_pretrained(path)
    logger.info("saved a random Qwen3-MoE checkpoint (seed %d) to %s", seed, path)
    return path


def add_legacy_config_keys(model_dir: str | os.PathLike) -> None:
    """Also write ``num_experts`` and ``rope_theta`` into ``model_dir/config.json``.

    transformers 5 saves them as ``num_local_experts`` and ``rope_parameters``; SGLang
    builds its configs with transformers 4.x, which does not know those names and would
    silently fall back to its defaults (128 experts, RoPE base 10000). transformers 5 reads
    the legacy names too, so writing both serves every reader."""
    config_file = Path(model_dir) / "config.json"
    data = json.loads(config_file.read_text())
    if "num_local_experts" in data:
        data.setdefault("num_experts", data["num_local_experts"])
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_model_shape(model_dir: str | os.PathLike) -> ModelShape:
    """Shape of the Hugging Face checkpoint in ``model_dir`` (from its ``config.json``)."""
    config_file = Path(model_dir) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {model_dir}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    return ModelShape.from_hf_config(data)
