"""Model shape: a Qwen3-MoE-like transformer described once, for megatron and Hugging Face.

The same :class:`ModelConfig` builds the trainer's megatron-core ``GPTModel``, the
Hugging Face ``Qwen3MoeConfig`` served by the rollout engine, and the expectations the
rollout client checks servers against (vocabulary, layers, experts, top-k).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.run_view import RunView


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """Shape of the policy. Flag names follow Megatron-LM's."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Hidden size."""
    ffn_hidden_size: int = 256
    """FFN hidden size of the dense (non-MoE) layers."""
    num_attention_heads: int = 4
    """Number of attention heads."""
    num_query_groups: int = 2
    """Number of key/value heads (grouped-query attention)."""
    kv_channels: int = 32
    """Head dimension."""
    num_experts: int = 16
    """Number of routed experts in each MoE layer."""
    moe_router_topk: int = 4
    """Experts per token."""
    moe_ffn_hidden_size: int = 128
    """FFN hidden size of each expert."""
    moe_layer_freq: str = "[0,1,1,1]"
    """MoE layer pattern: an integer N (every N-th layer is MoE, N=1 all) or a list such as
    "[0,1,1,1]" (first layer dense)."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "allgather"
    """Token dispatcher of megatron-core's MoE layer."""
    moe_router_dtype: Literal["fp32", "fp64", "none"] = "fp32"
    """Precision of the router's softmax/top-k."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss coefficient (0 disables it; RL usually does)."""
    moe_router_fusion: bool = False
    """Transformer Engine's fused router. Incompatible with routing replay."""
    seq_length: int = 256
    """Maximum sequence length (prompt + response) the trainer packs into one row."""
    max_position_embeddings: int = 4096
    """Longest position the rotary embedding is built for."""
    vocab_size: int = 128
    """Vocabulary size (rows of the embedding); the tokenizer may use fewer."""
    rotary_base: float = 10_000.0
    """RoPE base (theta); Qwen3 uses 1e6 (the presets set it)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon; Qwen3 uses 1e-6 (the presets set it)."""
    init_method_std: float = 0.02
    """Standard deviation of weight initialization."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (unset: none)."""
    recompute_method: Literal["uniform", "block"] | None = None
    """How layers are grouped for full recomputation (needed with
    --recompute-granularity full)."""
    recompute_num_layers: int | None = None
    """Layers per recomputation group (uniform) or recomputed layers per stage (block);
    needed with --recompute-granularity full."""
    tokenizer: str = "char"
    """'char' for the built-in character tokenizer, or a local Hugging Face tokenizer
    directory."""
    preset_name: str = field(default="custom", metadata={"flag": False})

    def moe_layer_pattern(self) -> list[int]:
        """1 for a MoE layer, 0 for a dense one, per layer."""
        text = str(self.moe_layer_freq).strip()
        if text.startswith("["):
            try:
                pattern = [int(v) for v in json.loads(text)]
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--moe-layer-freq {text!r} is not a list of 0/1") from exc
            if len(pattern) != self.num_layers or any(v not in (0, 1) for v in pattern):
                raise ConfigError(
                    f"--moe-layer-freq {text!r} must list {self.num_layers} values of 0 or 1 "
                    f"(one per layer, --num-layers {self.num_layers})"
                )
            return pattern
        try:
            every = int(text)
        except ValueError as exc:
            raise ConfigError(f"--moe-layer-freq {text!r} is neither an integer nor a list") from exc
        if every < 1:
            raise ConfigError(f"--moe-layer-freq must be >= 1, got {every}")
        return [1 if i % every == 0 else 0 for i in range(self.num_layers)]

    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the MoE layers among all hidden layers."""
        return [i for i, v in enumerate(self.moe_layer_pattern()) if v]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices())

    def validate(self, run: RunView) -> None:
        self.check()

    def check(self) -> None:
        """The shape's own consistency (no other component needed)."""
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not a multiple of "
                f"--num-query-groups {self.num_query_groups}"
            )
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and "
                f"--num-experts {self.num_experts}"
            )
        if self.num_experts > 32767:
            raise ConfigError(f"--num-experts {self.num_experts} exceeds 32767")
        if self.recompute_granularity == "full" and (
            self.recompute_method is None or self.recompute_num_layers is None
        ):
            raise ConfigError(
                "--recompute-granularity full needs --recompute-method (uniform or block) and "
                "--recompute-num-layers"
            )
        if self.recompute_granularity != "full" and self.recompute_method is not None:
            raise ConfigError(
                f"--recompute-method {self.recompute_method} applies only to "
                f"--recompute-granularity full"
            )
        self.moe_layer_pattern()

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: trains in minutes on 2 CPU cores.
    "tiny": ModelConfig(preset_name="tiny", rotary_base=1_000_000.0, norm_epsilon=1e-6),
    # Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B-Base).
    "qwen3-30b-a3b": ModelConfig(
        preset_name="qwen3-30b-a3b",
        num_layers=48,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
        num_experts=128,
        moe_router_topk=8,
        moe_ffn_hidden_size=768,
        moe_layer_freq="1",
        moe_token_dispatcher_type="alltoall",
        seq_length=32768 + 1024,
        max_position_embeddings=40960,
        vocab_size=151936,
        rotary_base=1_000_000.0,
        norm_epsilon=1e-6,
        tokenizer="Qwen/Qwen3-30B-A3B-Base",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"--model-preset {name!r} is unknown; choose from {sorted(PRESETS)}") from None


@dataclass(kw_only=True, frozen=True)
class ArchitectureFlags:
    """Megatron-LM's architecture switches, as a Megatron script passes them. megatron_rl
    builds one architecture, Qwen3-MoE: grouped-query attention (--num-query-groups),
    SwiGLU, RMSNorm, QK-layernorm, no biases, untied embeddings, RoPE. Values that describe
    it are accepted (leaving a switch out does not turn the feature off); others are
    refused, saying why."""

    group_query_attention: bool = field(default=False, metadata={"store_true": True})
    """Accepted: attention always uses --num-query-groups key/value heads."""
    swiglu: bool = field(default=False, metadata={"store_true": True})
    """Accepted: dense and expert MLPs are always SwiGLU."""
    qk_layernorm: bool = field(default=False, metadata={"store_true": True})
    """Accepted: queries and keys are always RMS-normalised per head."""
    disable_bias_linear: bool = field(default=False, metadata={"store_true": True})
    """Accepted: linear layers never have biases."""
    untie_embeddings_and_output_weights: bool = field(default=False, metadata={"store_true": True})
    """Accepted: the output layer is always separate from the input embedding."""
    moe_grouped_gemm: bool = field(default=False, metadata={"store_true": True})
    """Accepted: experts use grouped GEMM whenever Transformer Engine is used (GPU)."""
    normalization: Literal["LayerNorm", "RMSNorm"] | None = None
    """RMSNorm (the only one built); LayerNorm is refused."""
    position_embedding_type: Literal["learned_absolute", "rope", "yarn", "mrope", "relative",
                                     "none"] | None = None
    """rope (the only one built); other values are refused."""
    attention_backend: Literal["flash", "fused", "unfused", "local", "auto"] | None = None
    """auto (Transformer Engine's attention on GPU, megatron-core's local one on CPU);
    other values are refused."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss",
                                            "sinkhorn", "none"] | None = None
    """aux_loss (weighted by --moe-aux-loss-coeff; 0 turns it off) or none (needs
    --moe-aux-loss-coeff 0); the others are refused."""
    tokenizer_type: str | None = None
    """HuggingFaceTokenizer (with --tokenizer-model); megatron_rl loads no other kind."""
    tokenizer_model: str | None = None
    """Hugging Face tokenizer name or directory: the same as --tokenizer."""
    data_path: tuple[str, ...] = ()
    """Refused: RL prompts come from --rl-task (a reasoning-gym task or a JSONL file), not
    Megatron's indexed pretraining datasets."""

    def validate(self, run: RunView) -> None:
        refusals = [
            (self.normalization == "LayerNorm",
             "--normalization LayerNorm: megatron_rl builds Qwen3-MoE, which uses RMSNorm"),
            (self.position_embedding_type not in (None, "rope"),
             f"--position-embedding-type {self.position_embedding_type}: megatron_rl builds "
             "Qwen3-MoE, which uses rope"),
            (self.attention_backend not in (None, "auto"),
             f"--attention-backend {self.attention_backend}: megatron_rl picks the attention "
             "itself (Transformer Engine on GPU, megatron-core's local attention on CPU); "
             "use auto"),
            (self.moe_router_load_balancing_type in ("seq_aux_loss", "global_aux_loss",
                                                     "sinkhorn"),
             f"--moe-router-load-balancing-type {self.moe_router_load_balancing_type}: "
             "megatron_rl supports aux_loss and none"),
            (self.moe_router_load_balancing_type == "none" and run.model.moe_aux_loss_coeff > 0,
             f"--moe-router-load-balancing-type none contradicts --moe-aux-loss-coeff "
             f"{run.model.moe_aux_loss_coeff}"),
            (self.tokenizer_type not in (None, "HuggingFaceTokenizer"),
             f"--tokenizer-type {self.tokenizer_type}: megatron_rl loads Hugging Face "
             "tokenizers (HuggingFaceTokenizer with --tokenizer-model) or its own 'char' "
             "tokenizer (--tokenizer char)"),
            (self.tokenizer_type == "HuggingFaceTokenizer" and not self.tokenizer_model,
             "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
            (self.tokenizer_model is not None and run.model.tokenizer != self.tokenizer_model,
             f"--tokenizer-model {self.tokenizer_model} and --tokenizer {run.model.tokenizer} "
             "name different tokenizers"),
            (bool(self.data_path),
             "--data-path: megatron_rl reads RL prompts from --rl-task (a reasoning-gym task "
             "or a JSONL file), not from Megatron's indexed datasets"),
        ]
        for refused, message in refusals:
            if refused:
                raise ConfigError(message)
