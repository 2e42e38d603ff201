"""The forward step megatron-core's pipeline schedules call for every micro-batch.

A loss here is a *globally normalised* contribution: its denominator (responses or
tokens of the whole mini-batch, over every rank) is known before the step, so the step's
objective is the plain sum of the micro-batch losses however the batch is split. To keep
megatron from rescaling that sum, the config runs with ``calculate_per_token_loss=True``
and the step reports a token count of exactly 1 in total (one micro-batch of
data-parallel rank 0 reports 1, all others 0): ``finalize_model_grads`` then divides the
summed gradients by 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import torch
from megatron.core import parallel_state as ps

from megatron_rl.cpu_adaptation import device_mode_suspended
from megatron_rl.data.packing import MicroBatch
from megatron_rl.metrics.stats import Stat
from megatron_rl.model.rope_positions import rotary_positions
from megatron_rl.parallel_layout import cp_positions, split_for_cp

LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


class ReplayHook(Protocol):
    """What routing replay needs from the forward step (see megatron_rl.replay and
    docs/replay.md): ``microbatch(batch, model)`` is entered around the model chunk's
    forward of ``batch`` (routes keyed by ``batch.key``), and ``mark_output(output,
    batch)`` is called on that forward's output right after, before anything else runs
    (it hooks the backward so a recomputed forward replays the same micro-batch)."""

    def microbatch(self, batch: MicroBatch, model: torch.nn.Module) -> contextlib.AbstractContextManager: ...

    def mark_output(self, output: torch.Tensor, batch: MicroBatch) -> torch.Tensor: ...


def _counts_for_megatron(batch: MicroBatch) -> torch.Tensor:
    owner = (
        batch.key == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    return torch.tensor(1 if owner else 0, dtype=torch.int)


def _loss_func(batch: MicroBatch, loss_fn: LossFn, output: torch.Tensor):
    with device_mode_suspended():
        loss, info = loss_fn(batch, output)
    info = dict(info)
    info.setdefault("loss", loss.detach())
    info["key"] = batch.key
    return loss, _counts_for_megatron(batch), info


def context_parallel_share(batch: MicroBatch) -> MicroBatch:
    """This context-parallel rank's chunks of every sequence-shaped tensor of ``batch``
    (megatron's load-balanced split: chunks r and 2CP-1-r of 2CP), routes included. The
    per-sample tensors (response lengths, counts) stay whole: objectives join the
    chunks' partial sums with a CP all-reduce (``seq_sum``)."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    if batch.input_index is not None:
        raise ValueError(f"micro-batch {batch.key}: prompt sharing lays samples out as "
                         "trees, which context parallelism cannot split (--no-rl-share-prompts)")
    rank = ps.get_context_parallel_rank()
    cut = {name: split_for_cp(getattr(batch, name), 1, cp, rank)
           for name in ("tokens", "position_ids", "labels", "loss_mask", "sample_ids",
                        "advantages", "old_logprobs", "rollout_logprobs")}
    for name in ("routes", "ref_logprobs"):
        if getattr(batch, name) is not None:
            cut[name] = split_for_cp(getattr(batch, name), 1, cp, rank)
    # Query rows only: with CP the keys stay whole (Transformer Engine's CP attention).
    cut["attention_mask"] = split_for_cp(batch.attention_mask, 2, cp, rank)
    # The whole micro-batch stays reachable: per-sample results are put back together
    # from the chunks of all CP ranks (see cp_gather).
    return dataclasses.replace(batch, **cut, extras={**batch.extras, "cp_whole": batch})


def cp_gather(local: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, MicroBatch]:
    """Inverse of :func:`context_parallel_share` for a ``[B, S/CP]`` result: the whole
    ``[B, S]`` tensor (on every CP rank) and the whole micro-batch it belongs to."""
    whole = batch.extras.get("cp_whole")
    if whole is None:
        return local, batch
    return cp_unsplit(local, whole.tokens.shape[1]), whole


def cp_unsplit(local: torch.Tensor, length: int) -> torch.Tensor:
    """All-gather ``[B, S/CP, ...]`` chunks over the context-parallel group and put them
    back in sequence order: ``[B, S, ...]``."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return local
    import torch.distributed as dist

    pieces = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_context_parallel_group())
    full = local.new_zeros((local.shape[0], length, *local.shape[2:]))
    for rank, piece in enumerate(pieces):
        full[:, cp_positions(length, cp, rank).to(full.device)] = piece
    return full


def make_forward_step(loss_fn: LossFn, replay: ReplayHook | None = None):
    """A ``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func``."""

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = context_parallel_share(next(data_iterator))
        context = replay.microbatch(batch, model) if replay is not None else contextlib.nullcontext()
        # Shared prompts put a response's tokens after other responses' in the row: they
        # rotate by their positions in the sample (model.rope_positions).
        positions = batch.position_ids if batch.input_index is not None else None
        with device_mode_suspended(), context, rotary_positions(positions):
            output = model(batch.tokens, batch.position_ids, batch.attention_mask)
        if replay is not None:
            output = replay.mark_output(output, batch)
        return output, partial(_loss_func, batch, loss_fn)

    return forward_step


def sft_loss(temperature: float = 1.0) -> LossFn:
    """Cross-entropy of the response tokens, divided by the mini-batch's response tokens."""
    from megatron_rl.training.token_logprobs import token_logprobs

    def loss_fn(batch: MicroBatch, logits: torch.Tensor):
        logprobs = token_logprobs(logits, batch.labels, temperature)
        mask = batch.loss_mask
        nll = -(logprobs * mask).sum()
        loss = nll / max(batch.global_num_tokens, 1)
        stats = {"sft/nll": Stat(float(nll.detach()), float(mask.sum()), "mean")}
        return loss, {"stats": stats}

    return loss_fn
