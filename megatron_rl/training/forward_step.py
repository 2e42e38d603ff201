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
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import torch
from megatron.core import parallel_state as ps

from megatron_rl.data.packing import MicroBatch
from megatron_rl.metrics.stats import Stat

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
    loss, info = loss_fn(batch, output)
    info = dict(info)
    info.setdefault("loss", loss.detach())
    info["key"] = batch.key
    return loss, _counts_for_megatron(batch), info


def make_forward_step(loss_fn: LossFn, replay: ReplayHook | None = None):
    """A ``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func``."""

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        batch = next(data_iterator)
        context = replay.microbatch(batch, model) if replay is not None else contextlib.nullcontext()
        with context:
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
