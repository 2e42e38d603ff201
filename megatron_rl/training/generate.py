"""Greedy decoding with the trainer's own megatron model (held-out evaluation).

Each decoding step is one forward-only pass of megatron's pipeline schedule over the
sequences so far (no KV cache: evaluation prompts are short); the last pipeline stage
picks the argmax over the full vocabulary and broadcasts it to the other stages.
Data-parallel ranks decode disjoint shares of the prompts and gather the results.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.data.packing import MicroBatch, Sample, split_microbatches
from megatron_rl.training.engine import MegatronEngine
from megatron_rl.training.forward_step import make_forward_step
from megatron_rl.training.token_logprobs import greedy_tokens


def _next_token_loss(batch: MicroBatch, logits: torch.Tensor):
    # Position of the last real input token of each row (rows hold one sample here).
    last = (batch.sample_ids >= 0).sum(dim=1).clamp(min=1) - 1
    picked = logits[torch.arange(logits.shape[0]), last]
    tokens = greedy_tokens(picked)
    return logits.sum() * 0.0, {"next_tokens": tokens}


def greedy_generate(
    engine: MegatronEngine,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    micro_batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (collective: every rank calls it with the same
    prompts). Returns, on every rank, the generated ids of every prompt (eos excluded)."""
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(prompts), dp_size))
    # Every DP rank runs the same number of steps and micro-batches (collectives inside).
    per_rank = -(-len(prompts) // dp_size)
    seqs = [list(prompts[i]) for i in mine] + [[eos_id]] * (per_rank - len(mine))
    done = [False] * len(seqs)
    generated: list[list[int]] = [[] for _ in seqs]
    forward_step = make_forward_step(_next_token_loss)
    for _ in range(max_new_tokens):
        if _all_ranks_done(all(done)):
            break
        # A dummy last token makes the sample's input exactly the sequence so far.
        samples = [Sample(tokens=s + [eos_id], prompt_len=len(s), index=i) for i, s in enumerate(seqs)]
        batches, length = split_microbatches(samples, micro_batch_size, pad_multiple=8,
                                             min_length=_longest_everywhere(seqs))
        outputs = engine.forward_only(forward_step, batches, seq_length=length,
                                      micro_batch_size=micro_batch_size)
        next_tokens = _from_last_stage(outputs, len(batches) * micro_batch_size)
        for i in range(len(seqs)):
            if done[i]:
                continue
            token = int(next_tokens[i])
            if token == eos_id:
                done[i] = True
            else:
                seqs[i].append(token)
                generated[i].append(token)
    results: list[list[int]] = [[] for _ in prompts]
    gathered: list = [None] * dp_size
    local = [(idx, generated[j]) for j, idx in enumerate(mine)]
    if dist.is_initialized() and dp_size > 1:
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
    else:
        gathered = [local]
    for part in gathered:
        for idx, tokens in part:
            results[idx] = tokens
    return results


def _longest_everywhere(seqs: list[list[int]]) -> int:
    """Rows must have one length on every rank (expert-parallel dispatch gathers tokens)."""
    t = torch.tensor([max(len(s) for s in seqs)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _all_ranks_done(flag: bool) -> bool:
    """Agree over the whole world so every rank leaves the loop at the same step."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _from_last_stage(outputs: list, count: int) -> torch.Tensor:
    tokens = torch.zeros(count, dtype=torch.long)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        tokens = torch.cat([o["next_tokens"] for o in outputs])[:count]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return tokens
