"""tools/convert_checkpoint.py, both ways, on a checkpoint written by training/checkpoint.py."""

import json

import pytest
from ws_support import assert_identical, hf_tensors, run_converter


@pytest.mark.slow
def test_training_checkpoint_to_hf(single, tmp_path):
    out = tmp_path / "hf"
    # The checkpoint holds Adam's state too (it was saved after a training step).
    printed = run_converter(["to-hf", "--load", str(single.ckpt), "--save", str(out)])
    assert "of step 1" in printed
    assert_identical(hf_tensors(single.hf), hf_tensors(out))
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 16 and config["mlp_only_layers"] == [0]


@pytest.mark.slow
def test_hf_to_megatron_and_back_at_pp2(single, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    printed = run_converter(["to-megatron", "--hf", str(single.hf), "--save", str(ckpt)])
    assert (ckpt / "iter_0000000").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert f"--load {ckpt}" in printed
    # Read back by two pipeline stages under torchrun: the checkpoint reshards.
    run_converter(["to-hf", "--load", str(ckpt), "--save", str(back),
                   "--pipeline-model-parallel-size", "2"], nproc=2)  # fmt: skip
    assert_identical(hf_tensors(single.hf), hf_tensors(back))
