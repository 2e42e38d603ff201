"""The served Hugging Face Qwen3-MoE: loading a checkpoint safely, capturing its routes.

Loading refuses, with :class:`WeightUpdateError`, a directory without ``config.json``, a
config of another architecture than the served one, and weights that leave parameters
missing, unexpected or of another shape (``from_pretrained`` would otherwise initialise
missing ones randomly with only a warning).

Attention runs in transformers' eager implementation: with it a row's results do not depend
on the other rows of the batch or on their padding, bit for bit in bf16 on CPU, which SDPA
did not give (its kernel choice depends on masks and lengths).

:class:`RouteCapture` hooks every MoE block's ``gate`` (``Qwen3MoeTopKRouter`` returns
``(router_logits, routing_weights, selected_experts)``), so the routes it records are the
experts the block then dispatched to.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Config fields two checkpoints must share for one's weights to replace the other's.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
    "num_experts_per_tok", "mlp_only_layers", "decoder_sparse_step", "norm_topk_prob",
    "tie_word_embeddings",
)  # fmt: skip


class WeightUpdateError(ValueError):
    """A checkpoint that cannot replace the served weights; nothing was changed."""


def load_model(
    path: str, dtype: torch.dtype, reference: Qwen3MoeConfig | None = None
) -> Qwen3MoeForCausalLM:
    """The checkpoint in ``path`` in eval mode; with ``reference``, it must have that shape."""
    if not Path(path, "config.json").is_file():
        raise WeightUpdateError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        config = Qwen3MoeConfig.from_pretrained(path)
    except Exception as exc:
        raise WeightUpdateError(f"{path}/config.json cannot be read as Qwen3-MoE: {exc}") from exc
    if reference is not None:
        diffs = [
            f"{name}: {getattr(config, name, None)} (served: {getattr(reference, name, None)})"
            for name in ARCHITECTURE_FIELDS
            if getattr(config, name, None) != getattr(reference, name, None)
        ]
        if diffs:
            raise WeightUpdateError(f"{path} holds a model of another shape: " + "; ".join(diffs))
    try:
        # use_safetensors: a pickled pytorch_model.bin in a handed-over directory would
        # otherwise be unpickled (code); safetensors holds tensors only.
        model, info = Qwen3MoeForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, attn_implementation="eager",
            use_safetensors=True,
        )
    except Exception as exc:
        raise WeightUpdateError(f"cannot load the weights in {path}: {exc}") from exc
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise WeightUpdateError(f"weights in {path} do not fit the model: {problems}")
    return model.eval()


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None (then only ``input_ids`` requests work)."""
    if not any(Path(path, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        logger.warning("no tokenizer in %s: text prompts are refused, responses have no text", path)
        return None
    return AutoTokenizer.from_pretrained(path)


class RouteCapture:
    """Forward hooks on each MoE gate; collect ``selected_experts`` only while recording."""

    def __init__(self, model: Qwen3MoeForCausalLM):
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self._sink: list[torch.Tensor] | None = None
        for gate in self.gates:
            gate.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self._sink is not None:
            self._sink.append(output[2])

    def record(self, enabled: bool) -> None:
        """Record the next forward pass (or not)."""
        self._sink = [] if enabled else None

    def take(self, num_tokens: int) -> torch.Tensor | None:
        """Routes of the recorded forward pass, ``[num_tokens, moe_layers, k]``."""
        sink, self._sink = self._sink, None
        if sink is None:
            return None
        if len(sink) != len(self.gates):
            raise RuntimeError(
                f"captured {len(sink)} router outputs for {len(self.gates)} MoE layers"
            )
        return torch.stack([s.reshape(num_tokens, -1) for s in sink], dim=1)
