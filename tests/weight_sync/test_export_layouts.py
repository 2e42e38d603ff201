"""Megatron -> Hugging Face export and HF -> megatron load, at several parallel layouts.

Every layout runs in real processes (gloo): it exports its own randomly initialised model
(norms perturbed so that every tensor is distinct) and the HF model loaded from that
export must give the megatron model's logits; it then loads the single-process model's HF
export, must give the single-process logits, and re-exports it bit for bit.
"""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from ws_support import WORKERS, assert_identical, hf_logits, hf_tensors

# fp32 on CPU, different kernels (megatron vs transformers) and reduction orders: observed
# differences are ~5e-7 on logits of magnitude ~1.
HF_VS_MEGATRON_ATOL = 1e-4
LAYOUT_VS_LAYOUT_ATOL = 1e-5

LAYOUTS = {
    "ep2": ["--ep", "2"],
    "pp2_vpp2": ["--pp", "2", "--vpp-layers", "1"],
    "tp2_sp": ["--tp", "2"],
}


@pytest.mark.slow
def test_single_process_export_gives_same_logits(single, tmp_path):
    ref = torch.load(single.logits)
    logits = hf_logits(single.hf, ref["tokens"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max() < HF_VS_MEGATRON_ATOL
    assert ref["logits"].abs().max() > 0.1  # not a degenerate model
    # Negative control: the same weights with two norms swapped must be told apart.
    swapped = tmp_path / "swapped"
    shutil.copytree(single.hf, swapped)
    tensors = hf_tensors(single.hf)
    q, k = "model.layers.2.self_attn.q_norm.weight", "model.layers.2.self_attn.k_norm.weight"
    tensors[q], tensors[k] = tensors[k], tensors[q]
    for path in swapped.glob("*.safetensors*"):
        path.unlink()
    save_file(tensors, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    assert (hf_logits(swapped, ref["tokens"]) - ref["logits"]).abs().max() > 1e-3


@pytest.mark.slow
def test_export_writes_sharded_files_with_index(single):
    files = sorted(p.name for p in single.hf.glob("*.safetensors"))
    # The worker caps files at 3 MB: the 10.8 MB model is split, with an index.
    assert len(files) > 1 and (single.hf / "model.safetensors.index.json").is_file()
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in single.hf.glob("*.safetensors"))
    assert (single.hf / "tokenizer.json").is_file() and (single.hf / "config.json").is_file()
    assert not single.hf.with_name("hf.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_export_and_load(layout, single, run_torchrun, tmp_path):
    own, reloaded = tmp_path / "own", tmp_path / "reloaded"
    run_torchrun(
        WORKERS / "hf_export_worker.py",
        2,
        [
            *LAYOUTS[layout],
            "--seed",
            "99",
            "--export",
            str(own),
            "--logits",
            str(tmp_path / "own.pt"),
            "--load-hf",
            str(single.hf),
            "--loaded-logits",
            str(tmp_path / "loaded.pt"),
            "--reexport",
            str(reloaded),
        ],
        tmp_path / "out",
    )
    # Exported collectively from the sharded ranks: HF reproduces this model's logits.
    mine = torch.load(tmp_path / "own.pt")
    assert (hf_logits(own, mine["tokens"]) - mine["logits"]).abs().max() < HF_VS_MEGATRON_ATOL
    # The single-process model loaded at this layout: the single-process logits ...
    ref = torch.load(single.logits)
    loaded = torch.load(tmp_path / "loaded.pt")["logits"]
    assert (loaded - ref["logits"]).abs().max() < LAYOUT_VS_LAYOUT_ATOL
    # ... which a different random model does not give (the load did something).
    assert (mine["logits"] - ref["logits"]).abs().max() > 1e-2
    # HF -> megatron (this layout) -> HF is the identity, bit for bit.
    assert_identical(hf_tensors(single.hf), hf_tensors(reloaded))
