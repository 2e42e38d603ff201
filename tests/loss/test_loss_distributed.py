"""Two real processes (torch.multiprocessing + gloo) against one: data parallel (each
rank holds half of the responses; losses summed, gradients all-reduced) and context
parallel (each rank holds half of every response; seq_sum is a differentiable
all-reduce). Loss, parameter gradients and reduced statistics must equal the
single-process values (float64, rtol 1e-10 / atol 1e-12)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp
from loss_batches import TinyPolicy, cp_chunks, make_batch, micro_batches, to_inputs

from megatron_rl.loss import OBJECTIVES, ObjectiveConfig, compute_loss
from megatron_rl.metrics.stats import all_reduce_stats, results

LENGTHS = [3, 5, 2, 7, 4, 6]
CONFIGS = {name: ObjectiveConfig(objective=name) for name in OBJECTIVES}
CONFIGS["gspo_wide+tis@sequence"] = ObjectiveConfig(
    objective="gspo", gspo_clip_low=0.1, gspo_clip_high=0.1,
    correction="tis", correction_level="sequence", is_cap=2.0,
)
CONFIGS["minirl+mis@sequence"] = ObjectiveConfig(correction="mis", correction_level="sequence")
CONFIGS["grpo+kl_k3+entropy"] = ObjectiveConfig(objective="grpo", kl_coef=0.2, entropy_coef=0.05)
CONFIGS["cispo+kl_k2"] = ObjectiveConfig(objective="cispo", kl_coef=0.2, kl_estimator="k2")


def _setup():
    torch.manual_seed(0)
    model = TinyPolicy().double()
    with torch.no_grad():
        probe = make_batch(torch.zeros(sum(LENGTHS), dtype=torch.float64), LENGTHS, seed=5)
        current = model.logprobs(probe.prev_ids, probe.token_ids)
    return model, make_batch(current, LENGTHS, seed=5)


def _run(config: ObjectiveConfig, piece=None, seq_sum=None):
    """Loss, flat parameter gradient and stats of one piece (None: the whole batch)."""
    model, batch = _setup()
    logprobs = model.logprobs(batch.prev_ids, batch.token_ids)
    if piece is None:
        piece = micro_batches(batch, 1)[0][0]
    out = compute_loss(to_inputs(batch, piece, logprobs), config, seq_sum=seq_sum)
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out.loss.detach(), grad, out.stats


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM)


def _worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        found = {}
        for name, config in CONFIGS.items():
            _, batch = _setup()
            layouts = {
                "dp": (micro_batches(batch, world)[rank][0], None),
                "cp": (cp_chunks(batch, world)[rank], _all_reduce_sum),
            }
            for mode, (piece, seq_sum) in layouts.items():
                loss, grad, stats = _run(config, piece, seq_sum)
                dist.all_reduce(loss)
                dist.all_reduce(grad)
                found[(name, mode)] = (loss, grad, results(all_reduce_stats(stats)))
        if rank == 0:
            torch.save(found, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    path = str(tmp_path / "distributed.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    found = torch.load(path)
    for name, config in CONFIGS.items():
        ref_loss, ref_grad, ref_stats = _run(config)
        ref_stats = results(ref_stats)
        assert ref_grad.abs().sum() > 0
        for mode in ("dp", "cp"):
            loss, grad, stats = found[(name, mode)]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, msg=f"{name} {mode}")
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, msg=f"{name} {mode}")
            assert stats.keys() == ref_stats.keys()
            for key, want in ref_stats.items():
                if math.isnan(want):
                    assert math.isnan(stats[key])
                else:
                    assert stats[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (name, mode, key)
