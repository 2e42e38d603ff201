"""Helpers of the weight-sync tests: paths, the converter CLI, reading checkpoints back.

(A uniquely named module: every conftest.py is a module named "conftest", so
``from conftest import ...`` can find another directory's.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
WORKERS = TESTS / "workers"
CONVERTER = ROOT / "tools" / "convert_checkpoint.py"
SERVER_API_KEY = "weight-sync-test"


def run_converter(args: list[str], nproc: int = 1, timeout: int = 300) -> str:
    """Run tools/convert_checkpoint.py (under torchrun when nproc > 1); its stdout."""
    from megatron_rl.inference.launcher import free_port

    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
        ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [*launcher, str(CONVERTER), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"convert_checkpoint.py {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        part = load_file(str(path))
        assert not part.keys() & out.keys(), f"{path} repeats tensors"
        out.update(part)
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def hf_logits(directory: Path, tokens: torch.Tensor, state_dict=None) -> torch.Tensor:
    """fp32 logits of the Hugging Face model in ``directory`` (optionally with other
    weights, for negative controls)."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(tokens).logits
