"""Per-token log-probabilities and entropies from (vocab-parallel) logits.

Under tensor parallelism each rank holds a slice of the vocabulary; both functions
reduce over the tensor-parallel group so every rank gets the full-vocabulary values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) for each position; differentiable. ``logits`` [..., V/TP] is not
    modified (megatron's cross-entropy works in place, so it gets a scaled copy)."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float().clone()
    return -vocab_parallel_cross_entropy(scaled, labels)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, *,
                  with_grad: bool = False) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: statistics only, or
    ``with_grad`` differentiable (the entropy bonus; the graph then holds a few
    [..., V/TP] float32 tensors until backward)."""
    if with_grad:
        return _entropy(logits, temperature, with_grad=True)
    with torch.no_grad():
        return _entropy(logits, temperature, with_grad=False)


def _entropy(logits: torch.Tensor, temperature: float, *, with_grad: bool) -> torch.Tensor:
    scaled = logits.float() / temperature
    group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    # The entropy does not depend on the shift, so the max needs no gradient.
    local_max = scaled.detach().max(dim=-1).values
    if tp > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - local_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    weighted = (exp * shifted).sum(dim=-1)
    if tp > 1:
        if with_grad:
            from torch.distributed.nn.functional import all_reduce

            sum_exp = all_reduce(sum_exp, group=group)
            weighted = all_reduce(weighted, group=group)
        else:
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(weighted, group=group)
    return sum_exp.log() - weighted / sum_exp


@torch.no_grad()
def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the full vocabulary of vocab-parallel logits [..., V/TP]."""
    group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    values, index = logits.float().max(dim=-1)
    if tp == 1:
        return index
    rank = dist.get_rank(group)
    index = index + rank * logits.shape[-1]
    gathered_v = [torch.empty_like(values) for _ in range(tp)]
    gathered_i = [torch.empty_like(index) for _ in range(tp)]
    dist.all_gather(gathered_v, values.contiguous(), group=group)
    dist.all_gather(gathered_i, index.contiguous(), group=group)
    stacked_v = torch.stack(gathered_v, dim=-1)
    stacked_i = torch.stack(gathered_i, dim=-1)
    # Ties resolve to the lowest vocabulary id, as a single-rank argmax does.
    best = stacked_v.argmax(dim=-1, keepdim=True)
    return stacked_i.gather(-1, best).squeeze(-1)
