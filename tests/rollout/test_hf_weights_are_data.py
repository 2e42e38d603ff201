"""The embedded server loads Hugging Face weights as safetensors only: a directory that
holds a pickled pytorch_model.bin (which could run code when unpickled) is refused, and
the pickle is never opened."""

from __future__ import annotations

import json
import pickle

import pytest

from megatron_rl.inference.hf_model import WeightUpdateError, load_model


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_unopened(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "moe_intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
        "num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [],
        "decoder_sparse_step": 1}))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    # The payload is live: an unrestricted unpickle would run it.
    with open(tmp_path / "pytorch_model.bin", "rb") as f:
        pickle.load(f).close()
    assert marker.exists()
    marker.unlink()
    import torch

    with pytest.raises(WeightUpdateError, match="cannot load the weights"):
        load_model(str(tmp_path), torch.float32)
    assert not marker.exists()
