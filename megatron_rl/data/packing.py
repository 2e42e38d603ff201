"""Samples -> micro-batches: token rows, masks, per-token loss inputs and routes.

A sample is ``x = prompt + response``; the model is fed ``x[:-1]`` and scored on
``x[1:]`` (see docs/ARCHITECTURE.md). Rows are either one sample each, right-padded, or
several samples packed end to end (``pack=True``) with a block-diagonal causal mask and
positions restarting at every sample, so a token never attends across samples. Either
way a real token sees exactly what it would see alone: losses do not depend on padding
or packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_rl.data.routes import padding_routes


@dataclass
class Sample:
    """One sequence to score."""

    tokens: list[int]
    """prompt + response ids."""
    prompt_len: int
    """Prompt length P; response tokens are tokens[P:]."""
    advantage: float = 0.0
    """Sequence advantage (RL)."""
    old_logprobs: torch.Tensor | None = None
    """pi_old per response token [R] (RL, filled by the logprob pass)."""
    rollout_logprobs: torch.Tensor | None = None
    """mu_old per response token [R] (RL)."""
    ref_logprobs: torch.Tensor | None = None
    """pi_ref per response token [R] (RL with a reference KL, filled by the reference pass)."""
    routes: torch.Tensor | None = None
    """[P + R - 1, moe_layers, topk] compact routes to replay (R2/R3)."""
    index: int = 0
    """Index of the sample in its mini-batch (for results that flow back)."""
    loss_mask: torch.Tensor | None = None
    """bool [R]: response tokens trained on (False: tool output of a multi-turn rollout,
    scored by no loss, counted in no normaliser); None: all. Per-token tensors above stay
    [R] (0 where masked)."""

    @property
    def num_inputs(self) -> int:
        return len(self.tokens) - 1

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def trained_len(self) -> int:
        """Response tokens the loss sees (its per-response length and global count)."""
        if self.loss_mask is None:
            return self.response_len
        return int(self.loss_mask.sum())


@dataclass
class MicroBatch:
    """Tensors of one micro-batch, batch-first ``[B, S]``."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    """bool, True where attention is NOT allowed; [1 or B, 1, S, S]."""
    labels: torch.Tensor
    loss_mask: torch.Tensor
    """bool, True on response tokens (the tokens that are scored)."""
    sample_ids: torch.Tensor
    """int64 local sample index of each token, -1 on padding."""
    sample_index: list[int]
    """Mini-batch index of each local sample."""
    response_lengths: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    routes: torch.Tensor | None
    """[B, S, moe_layers, topk] compact, padding filled by data.routes.padding_routes."""
    key: int = 0
    """Identity of the micro-batch within its step (routes are keyed by it)."""
    ref_logprobs: torch.Tensor | None = None
    """[B, S] float32 log pi_ref on response tokens (0 elsewhere); None when no sample
    of the micro-batch carries reference log-probs."""
    global_num_samples: int = 0
    global_num_tokens: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.sample_index)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]


def _rows(samples: list[Sample], pack: bool, seq_length: int) -> list[list[Sample]]:
    if not pack:
        return [[s] for s in samples]
    rows: list[list[Sample]] = []
    used = 0
    for sample in samples:
        if sample.num_inputs > seq_length:
            raise ValueError(
                f"sample {sample.index} has {sample.num_inputs} input tokens, more than "
                f"--seq-length {seq_length}"
            )
        if rows and used + sample.num_inputs <= seq_length:
            rows[-1].append(sample)
            used += sample.num_inputs
        else:
            rows.append([sample])
            used = sample.num_inputs
    return rows


def make_microbatch(
    rows: list[list[Sample]],
    *,
    pad_to: int,
    num_rows: int | None = None,
    pad_id: int = 0,
    route_shape: tuple[int, int, int] | None = None,
    key: int = 0,
) -> MicroBatch:
    """Lay ``rows`` (each a list of samples placed end to end) out as one micro-batch of
    ``num_rows`` rows of length ``pad_to``; missing rows are all padding.

    ``route_shape`` = (moe_layers, topk, num_experts) when routes are replayed; samples
    then must carry routes."""
    pack = any(len(row) > 1 for row in rows)
    B, S = num_rows or len(rows), pad_to
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), pad_id, dtype=torch.long)
    positions = torch.zeros((B, S), dtype=torch.long)
    loss_mask = torch.zeros((B, S), dtype=torch.bool)
    sample_ids = torch.full((B, S), -1, dtype=torch.long)
    advantages = torch.zeros((B, S), dtype=torch.float32)
    old_lp = torch.zeros((B, S), dtype=torch.float32)
    roll_lp = torch.zeros((B, S), dtype=torch.float32)
    with_ref = any(s.ref_logprobs is not None for row in rows for s in row)
    ref_lp = torch.zeros((B, S), dtype=torch.float32) if with_ref else None
    routes = None
    if route_shape is not None:
        layers, topk, experts = route_shape
        routes = padding_routes(B * S, layers, topk, experts).view(B, S, layers, topk).clone()
    segments = torch.zeros((B, S), dtype=torch.long)  # 0 = padding, k+1 = k-th sample of row
    order: list[int] = []
    lengths: list[int] = []
    for r, row in enumerate(rows):
        offset = 0
        for k, sample in enumerate(row):
            n = sample.num_inputs
            if offset + n > S:
                raise ValueError(
                    f"sample {sample.index} needs {n} input tokens; row {r} has {S - offset} left"
                )
            local = len(order)
            order.append(sample.index)
            lengths.append(sample.trained_len)
            ids = torch.as_tensor(sample.tokens, dtype=torch.long)
            span = slice(offset, offset + n)
            tokens[r, span] = ids[:-1]
            labels[r, span] = ids[1:]
            positions[r, span] = torch.arange(n)
            segments[r, span] = k + 1
            resp = slice(offset + sample.prompt_len - 1, offset + n)
            if sample.loss_mask is None:
                loss_mask[r, resp] = True
            else:
                if sample.loss_mask.shape != (sample.response_len,):
                    raise ValueError(f"sample {sample.index}: loss_mask has shape "
                                     f"{tuple(sample.loss_mask.shape)}, want "
                                     f"[{sample.response_len}] (one per response token)")
                loss_mask[r, resp] = sample.loss_mask.bool()
            sample_ids[r, span] = local
            advantages[r, resp] = float(sample.advantage)
            if sample.old_logprobs is not None:
                old_lp[r, resp] = sample.old_logprobs.float()
            if sample.rollout_logprobs is not None:
                roll_lp[r, resp] = sample.rollout_logprobs.float()
            if ref_lp is not None:
                if sample.ref_logprobs is None:
                    raise ValueError(f"sample {sample.index} has no reference log-probs, "
                                     "while others of its micro-batch have")
                ref_lp[r, resp] = sample.ref_logprobs.float()
            if routes is not None:
                if sample.routes is None:
                    raise ValueError(f"sample {sample.index} has no routes to replay")
                routes[r, span] = sample.routes.to(routes.dtype)
            offset += n
    causal = torch.ones((S, S), dtype=torch.bool).tril()
    if pack:
        same = segments[:, :, None] == segments[:, None, :]
        allowed = same & causal[None] & (segments[:, :, None] > 0)
        # Padding positions attend to themselves only, so their softmax stays finite.
        allowed |= torch.eye(S, dtype=torch.bool)[None]
        mask = ~allowed[:, None]
    else:
        mask = ~causal[None, None]
    return MicroBatch(
        tokens=tokens,
        position_ids=positions,
        attention_mask=mask,
        labels=labels,
        loss_mask=loss_mask,
        sample_ids=sample_ids,
        sample_index=order,
        response_lengths=torch.tensor(lengths, dtype=torch.long),
        advantages=advantages,
        old_logprobs=old_lp,
        rollout_logprobs=roll_lp,
        routes=routes,
        key=key,
        ref_logprobs=ref_lp,
    )


def split_microbatches(
    samples: list[Sample],
    micro_batch_size: int,
    *,
    pad_multiple: int = 8,
    max_length: int | None = None,
    pack: bool = False,
    pad_id: int = 0,
    route_shape: tuple[int, int, int] | None = None,
    key_offset: int = 0,
    length_of: list[Sample] | None = None,
    min_length: int = 0,
) -> tuple[list[MicroBatch], int]:
    """Cut ``samples`` into micro-batches of ``micro_batch_size`` rows, all of one shape
    (pipeline schedules exchange one tensor shape per step). Without packing a row holds one
    sample; with packing, samples are placed end to end in rows of ``max_length`` tokens.
    Returns the micro-batches and the row length.

    ``length_of`` (default ``samples``) are the samples whose longest input sets the row
    length: pass the whole data-parallel batch so that every rank pads to the same length
    (expert-parallel dispatch and pipeline exchanges need equal shapes on all ranks)."""
    if not samples:
        raise ValueError("no samples to batch")
    longest = max(max(s.num_inputs for s in (length_of or samples)), min_length)
    if max_length is not None and longest > max_length:
        raise ValueError(f"a sample has {longest} input tokens, above --seq-length {max_length}")
    if pack:
        if max_length is None:
            raise ValueError("packing needs max_length (--seq-length)")
        pad_to = max_length
    else:
        pad_to = -(-longest // pad_multiple) * pad_multiple
        if max_length is not None:
            pad_to = min(pad_to, max_length)
    rows = _rows(samples, pack, pad_to)
    batches = []
    for i in range(0, len(rows), micro_batch_size):
        batches.append(
            make_microbatch(
                rows[i : i + micro_batch_size], pad_to=pad_to, num_rows=micro_batch_size,
                pad_id=pad_id, route_shape=route_shape, key=key_offset + len(batches),
            )
        )
    return batches, pad_to


def set_global_counts(batches: list[MicroBatch], num_samples: int, num_tokens: int) -> None:
    """Record the denominators of the whole mini-batch (all ranks) in every micro-batch."""
    for batch in batches:
        batch.global_num_samples = num_samples
        batch.global_num_tokens = num_tokens
