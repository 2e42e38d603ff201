"""Fixtures of the weight-sync tests: the single-process reference run (a trained tiny
model, its distributed checkpoint, its HF export and logits) and process launchers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torchrun_launch import run_torchrun as _launch
from ws_support import WORKERS


@pytest.fixture(scope="session")
def run_torchrun():
    """The shared torchrun launcher (tests/torchrun_launch.py)."""
    return _launch


@pytest.fixture(scope="session")
def single(tmp_path_factory, run_torchrun) -> SimpleNamespace:
    """One process: one SFT step, a training checkpoint, an HF export, the logits."""
    base = tmp_path_factory.mktemp("single")
    out = SimpleNamespace(hf=base / "hf", ckpt=base / "ckpt", logits=base / "logits.pt")
    run_torchrun(
        WORKERS / "hf_export_worker.py",
        1,
        [
            "--train-step",
            "--save-ckpt",
            str(out.ckpt),
            "--export",
            str(out.hf),
            "--logits",
            str(out.logits),
        ],
        base / "out",
    )
    return out
