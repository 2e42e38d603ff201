"""Helpers of the weight-sync workers: the tiny model at a layout, its logits, norm noise."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

# Fixed token batch: 2 micro-batches of 2 sequences of 16 tokens (16 divides by TP=2 for SP).
BATCH, MICRO, SEQ = 4, 2, 16


def fixed_tokens(vocab: int, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (BATCH, SEQ), generator=gen)


def build_engine(
    tp: int,
    pp: int,
    ep: int,
    vpp_layers: int | None,
    *,
    optimizer: bool = False,
    model=None,
    seed: int = 1234,
):
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine

    model = model or PRESETS["tiny"]
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
        num_layers_per_virtual_pipeline_stage=vpp_layers,
    )
    init_distributed(parallel, model.num_layers, seed=seed)
    training = TrainingConfig(
        micro_batch_size=MICRO,
        global_batch_size=8,
        lr=1e-2,
        lr_decay_style="constant",
        clip_grad=1e6,
        train_iters=10,
    )
    return MegatronEngine(model, parallel, training, build_optimizer=optimizer)


def perturb_norms(engine, scale: float = 0.3) -> None:
    """Norm weights start at 1: give each its own values (identical on every rank holding
    it), so a swapped or misplaced norm changes the logits."""
    from megatron_rl.weight_sync.hf_mapping import local_params

    for param in local_params(engine.chunks):
        if param.tensor.dim() == 1:
            seed = int(hashlib.sha256(param.name.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(param.tensor.shape, generator=gen) * scale
            param.tensor.data.copy_(1.0 + noise)


def megatron_logits(engine, tokens: torch.Tensor, micro: int = MICRO) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] of ``tokens`` (B a multiple of ``micro``) on the
    last pipeline stage (None on other stages). Collective."""
    from megatron.core import parallel_state as ps

    seq = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(seq).unsqueeze(0).expand(batch.shape[0], -1)
        output = model(batch, positions, mask)

        def loss_func(out):
            return out.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": out.detach()}

        return output, loss_func

    outputs = engine.forward_only(
        forward_step, list(tokens.split(micro)), seq_length=seq, micro_batch_size=micro
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = torch.cat([o["logits"] for o in outputs])
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def is_writer() -> bool:
    """The one rank that writes results: last pipeline stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )
