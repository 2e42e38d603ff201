"""Fixtures of the rollout tests: tiny checkpoints and embedded servers (subprocesses).

Two servers start once per session, side by side (each start imports torch and transformers:
10-20 s on 2 cores). Tests that kill a server restart it on the same port or leave it dead
on purpose; the fixture stops whatever processes it holds at the end, and only those.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rollout_env import API_KEY, SERVER_BATCH
from transformers import Qwen3MoeForCausalLM

from megatron_rl.inference.bf16_gemm import Bf16Products
from megatron_rl.inference.embedded import start_embedded_servers
from megatron_rl.inference.launcher import ServerHandle, start_server_process
from megatron_rl.model.config import preset
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.weight_sync.hf_config import save_random_checkpoint


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Servers and the test process share 2 cores: one thread each avoids thrashing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    return preset("tiny")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tiny) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("rollout-checkpoints")
    return SimpleNamespace(
        main=save_random_checkpoint(tiny, root / "main", seed=0),
        other_weights=save_random_checkpoint(tiny, root / "other-weights", seed=1),
        other_shape=save_random_checkpoint(
            tiny.replace(num_experts=8), root / "other-shape", seed=0
        ),
    )


class Servers:
    """Handles of the session's servers; ``restart`` replaces one on the same port."""

    def __init__(self, model: Path):
        self.model = model
        # The trainer's own path: both spawned before either is waited for, distinct ports,
        # both stopped if one fails to start.
        config = RolloutConfig(num_servers=2, api_key=API_KEY, max_batch_size=SERVER_BATCH,
                               startup_timeout_s=240)
        self.handles: list[ServerHandle] = start_embedded_servers(model, config)
        self.retired: list[ServerHandle] = []

    @property
    def main(self) -> ServerHandle:
        return self.handles[0]

    @property
    def spare(self) -> ServerHandle:
        return self.handles[1]

    def restart(self, index: int) -> ServerHandle:
        old = self.handles[index]
        old.kill()
        self.retired.append(old)
        port = int(old.url.rsplit(":", 1)[1])
        self.handles[index] = start_server_process(self.model, port=port, api_key=API_KEY,
                                                   max_batch_size=SERVER_BATCH,
                                                   startup_timeout_s=240)
        return self.handles[index]

    def stop_all(self) -> None:
        for handle in self.handles + self.retired:
            handle.stop()


@pytest.fixture(scope="session")
def servers(checkpoints):
    group = Servers(checkpoints.main)
    yield group
    group.stop_all()


def hf_reference(model_dir, tiny):
    """``forward(ids) -> (logits [T, V] float32, routes [T, moe_layers, k])`` of the
    checkpoint in plain transformers (bf16, eager attention, the engine's bf16 products:
    ``inference.bf16_gemm``), routes from gate hooks."""
    model = Qwen3MoeForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    seen: list[torch.Tensor] = []
    for i in tiny.moe_layer_indices():
        model.model.layers[i].mlp.gate.register_forward_hook(
            lambda m, args, out: seen.append(out[2])
        )

    @torch.no_grad()
    def forward(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        with Bf16Products():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        return logits, torch.stack(seen, dim=1)  # [T, V], [T, moe_layers, k]

    return forward


@pytest.fixture(scope="session")
def reference(checkpoints, tiny):
    """:func:`hf_reference` of the servers' checkpoint."""
    return hf_reference(checkpoints.main, tiny)


@pytest.fixture(scope="session")
def reference_for(tiny):
    return lambda model_dir: hf_reference(model_dir, tiny)
