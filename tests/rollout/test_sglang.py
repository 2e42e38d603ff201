"""Against a real SGLang server (needs sglang and a CUDA device; skipped otherwise).

Starts SGLang with --enable-return-routed-experts on a random tiny checkpoint, then checks
the wire format end to end: start-up checks, routed experts against a Hugging Face forward
pass (SGLang's kernels differ from transformers', so a few near-tie routes may flip), and
a weight update from disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_rl.inference.launcher import ServerHandle, free_port, wait_healthy
from megatron_rl.rollout.client import RolloutClient, RolloutRequest
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.weight_sync.hf_config import ModelShape, save_random_checkpoint

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def sglang_server(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("sglang")
    model = save_random_checkpoint(tiny, root / "model", dtype=torch.bfloat16)
    port = free_port()
    log = root / "sglang.log"
    args = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--enable-return-routed-experts", "--skip-tokenizer-init",
        "--mem-fraction-static", "0.2", "--disable-cuda-graph", "--dtype", "bfloat16",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    handle = ServerHandle(process, f"http://127.0.0.1:{port}", log, args)
    try:
        wait_healthy(handle.url, api_key=None, timeout_s=600, process=process)
    except Exception:
        handle.kill()
        pytest.fail(f"SGLang did not start:\n{handle.log_tail(60)}")
    yield handle, model, root
    handle.stop()


def test_sglang_routes_logprobs_and_weight_update(sglang_server, tiny, reference_for):
    handle, model, root = sglang_server
    client = RolloutClient(
        RolloutConfig(urls=(handle.url,), max_new_tokens=8, progress=False),
        ModelShape.from_model_config(tiny),
        return_routed_experts=True,
    )
    client.connect()
    requests = [
        RolloutRequest(prompt_index=i, sample_index=0, prompt_ids=[5 + i, 6, 7, 8])
        for i in range(4)
    ]
    samples = client.generate_batch(requests, "sglang")
    forward = reference_for(model)
    agree = []
    for s in samples:
        ids = s.prompt_ids + s.response_ids
        logits, routes = forward(ids[:-1])
        assert s.routes.shape == routes.shape
        agree.append(
            (s.routes.long().sort(-1).values == routes.sort(-1).values).all(-1).float().mean()
        )
        expected = torch.log_softmax(logits[len(s.prompt_ids) - 1 :], -1)
        expected = expected.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(s.rollout_logprobs, expected, atol=0.05, rtol=0)
    assert torch.stack(agree).mean() > 0.9

    update = save_random_checkpoint(tiny, root / "update", seed=1, dtype=torch.bfloat16)
    client.update_weights_from_disk(str(update), "v1")
    assert {s.weight_version for s in client.generate_batch(requests, "sglang-v1")} == {"v1"}
