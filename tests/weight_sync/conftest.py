"""Fixtures of the weight-sync tests: the single-process reference run (a trained tiny
model, its distributed checkpoint, its HF export and logits), two embedded rollout servers
shared by the sync tests, and process launchers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torchrun_launch import run_torchrun as _launch
from ws_support import SERVER_API_KEY, WORKERS


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


@pytest.fixture(scope="session")
def rollout_servers(tmp_path_factory) -> SimpleNamespace:
    """Two embedded servers (fp32, API key) on a random tiny checkpoint, started together
    (a start costs ~15 s of a loaded 2-core machine). Tests leave them serving some
    version of the tiny model; each test pushes its own weights first."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_rl.inference.launcher import start_server_process
    from megatron_rl.model.config import PRESETS
    from megatron_rl.weight_sync.hf_config import save_random_checkpoint

    initial = save_random_checkpoint(PRESETS["tiny"], tmp_path_factory.mktemp("served"), seed=0)

    def start(_):
        # fp32, so that served logprobs can be compared with the trainer's exactly.
        return start_server_process(
            initial, dtype="fp32", api_key=SERVER_API_KEY, threads=1, startup_timeout_s=240,
            weight_version="start",
        )  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, i) for i in range(2)]
        handles = [f.result() for f in futures if f.exception() is None]
    try:
        if len(handles) < 2:
            raise RuntimeError(f"a rollout server did not start: {[f.exception() for f in futures]}")
        yield SimpleNamespace(handles=handles, urls=[h.url for h in handles], initial=initial)
    finally:
        for handle in handles:
            handle.stop()
