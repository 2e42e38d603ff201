"""Samples -> micro-batches: token rows, masks, per-token loss inputs and routes.

A sample is ``x = prompt + response``; the model is fed ``x[:-1]`` and scored on
``x[1:]`` (see docs/ARCHITECTURE.md). Rows are either one sample each, right-padded, or
several samples packed end to end (``pack=True``) with a block-diagonal causal mask and
positions restarting at every sample, so a token never attends across samples.

With ``share_prompts``, consecutive samples of a row with the same prompt (the G
responses of a group) are laid out as a tree: the prompt's inputs but its last token
once, then one block per sample -- the prompt's last token and the sample's response
inputs, at the positions they have in the sample -- each block attending to the shared
prefix and causally to itself only. The prompt's last input stays in every block because
its logits predict the sample's first response token (a different label per sample).
A group of G responses of R tokens after a P-token prompt then costs P - 1 + G * R
positions instead of G * (P + R - 1).

Either way a real token sees exactly what it would see alone (the same keys, values and
positions): losses do not depend on padding, packing or prompt sharing (up to the
rounding of sums taken in another order).
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
    copies: torch.Tensor | None = None
    """Prompt sharing only: ``[B, S]`` int64, how many samples each token stands for (the
    samples sharing a prefix, 1 on a sample's own tokens, 0 on padding), so per-token
    statistics over inputs (router agreement) count a shared token once per sample, as
    separate rows would. None: 1 on every real token."""
    input_index: list[torch.Tensor] | None = None
    """Prompt sharing only: per local sample, the flat (row * S + column) positions of
    its inputs in order, shared prefix included (``sample_ids`` names one owner per
    token, the first sample of the group on a shared prefix). None: every sample's
    inputs are the tokens whose ``sample_ids`` name it."""

    @property
    def num_samples(self) -> int:
        return len(self.sample_index)

    def sample_inputs(self, values: torch.Tensor, local: int) -> torch.Tensor:
        """``values`` (``[B, S, ...]``, one entry per input token) at local sample
        ``local``'s inputs, in token order (e.g. the routes a pass recorded for it)."""
        if self.input_index is None:
            return values[self.sample_ids == local]
        return values.flatten(0, 1)[self.input_index[local].to(values.device)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]


def shares_prompt(a: Sample, b: Sample) -> bool:
    """Whether ``b`` can share ``a``'s prompt prefix: the same prompt tokens and, where
    routes travel with the samples, the same routes on the shared inputs (a shared token
    is computed, so routed, once)."""
    n = a.prompt_len
    if n < 2 or b.prompt_len != n or a.tokens[:n] != b.tokens[:n]:
        return False
    if a.routes is None and b.routes is None:
        return True
    if a.routes is None or b.routes is None:
        return False
    return torch.equal(a.routes[: n - 1], b.routes[: n - 1])


def _units(samples: list[Sample], share: bool) -> list[list[Sample]]:
    """Runs of consecutive samples that share their prompt (singletons without sharing)."""
    units: list[list[Sample]] = []
    for sample in samples:
        if share and units and shares_prompt(units[-1][0], sample):
            units[-1].append(sample)
        else:
            units.append([sample])
    return units


def _prefix_len(unit: list[Sample]) -> int:
    """Inputs laid out once for the unit: the prompt's but its last, when shared."""
    return unit[0].prompt_len - 1 if len(unit) > 1 else 0


def row_length(row: list[Sample], share: bool = False) -> int:
    """Positions ``row`` takes: the sum of its samples' inputs, less the prefixes that
    prompt sharing lays out once."""
    return sum(sum(s.num_inputs for s in unit) - (len(unit) - 1) * _prefix_len(unit)
               for unit in _units(row, share))


def _check_fits(sample: Sample, seq_length: int) -> None:
    if sample.num_inputs > seq_length:
        raise ValueError(
            f"sample {sample.index} has {sample.num_inputs} input tokens, more than "
            f"--seq-length {seq_length}"
        )


def _rows(samples: list[Sample], pack: bool, seq_length: int | None,
          share: bool = False) -> list[list[Sample]]:
    """Samples -> rows. Without packing a row holds one sample, or with ``share`` one
    run of samples sharing a prompt (cut where the row would exceed ``seq_length``);
    packing fills rows of ``seq_length`` positions end to end."""
    if not pack and not share:
        return [[s] for s in samples]
    rows: list[list[Sample]] = []
    used = 0
    for sample in samples:
        if seq_length is not None:
            _check_fits(sample, seq_length)
        shared = share and bool(rows) and shares_prompt(rows[-1][-1], sample)
        if rows and (pack or shared):
            # A sample joining its prompt's run adds only what follows the shared prefix.
            added = sample.num_inputs - (sample.prompt_len - 1 if shared else 0)
            if seq_length is None or used + added <= seq_length:
                rows[-1].append(sample)
                used += added
                continue
        rows.append([sample])
        used = sample.num_inputs
    return rows


def _routes_of(sample: Sample, start: int, stop: int) -> torch.Tensor:
    """``sample.routes[start:stop]``, the routes of inputs ``start..stop`` (a micro-batch
    replaying routes needs them for every sample)."""
    if sample.routes is None:
        raise ValueError(f"sample {sample.index} has no routes to replay")
    if sample.routes.shape[0] != sample.num_inputs:
        raise ValueError(f"sample {sample.index}: routes for {sample.routes.shape[0]} input "
                         f"tokens, the sample has {sample.num_inputs}")
    return sample.routes[start:stop]


class _Positions:
    """What a micro-batch's loop places, gathered as flat (row * S + column) indices and
    values, written into the tensors with one indexed assignment per tensor: a few
    thousand small tensor assignments per micro-batch took most of its layout time."""

    def __init__(self) -> None:
        self.inputs: list[int] = []  # flat positions of input tokens
        self.tokens: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []
        self.segments: list[int] = []
        self.blocks: list[int] = []
        self.copies: list[int] = []
        self.sample_ids: list[int] = []
        self.responses: list[int] = []  # flat positions of scored (response) tokens
        self.loss_mask: list[bool] = []
        self.advantages: list[float] = []
        # Per-token tensors of the samples that carry them: (flat positions, values).
        self.old_lp: tuple[list[int], list[torch.Tensor]] = ([], [])
        self.roll_lp: tuple[list[int], list[torch.Tensor]] = ([], [])
        self.ref_lp: tuple[list[int], list[torch.Tensor]] = ([], [])
        self.routes: tuple[list[int], list[torch.Tensor]] = ([], [])

    def place(self, start: int, ids: list[int], first_position: int, *, segment: int,
              block: int, copies: int, sample_id: int) -> range:
        """Inputs ``ids[:-1]`` with labels ``ids[1:]`` from flat position ``start``."""
        n = len(ids) - 1
        where = range(start, start + n)
        self.inputs += where
        self.tokens += ids[:-1]
        self.labels += ids[1:]
        self.positions += range(first_position, first_position + n)
        self.segments += [segment] * n
        self.blocks += [block] * n
        self.copies += [copies] * n
        self.sample_ids += [sample_id] * n
        return where

    @staticmethod
    def add(pair: tuple[list[int], list[torch.Tensor]], where: range,
            values: torch.Tensor) -> None:
        pair[0].extend(where)
        pair[1].append(values)

    @staticmethod
    def write(target: torch.Tensor, pair: tuple[list[int], list[torch.Tensor]]) -> None:
        if pair[0]:
            flat = target.view(-1, *target.shape[2:])
            flat[torch.tensor(pair[0], dtype=torch.long)] = torch.cat(pair[1]).to(target.dtype)


def make_microbatch(
    rows: list[list[Sample]],
    *,
    pad_to: int,
    num_rows: int | None = None,
    pad_id: int = 0,
    route_shape: tuple[int, int, int] | None = None,
    key: int = 0,
    share_prompts: bool = False,
) -> MicroBatch:
    """Lay ``rows`` (each a list of samples placed end to end) out as one micro-batch of
    ``num_rows`` rows of length ``pad_to``; missing rows are all padding. With
    ``share_prompts``, consecutive samples of a row that share their prompt are laid out
    as a tree (see the module's docstring).

    ``route_shape`` = (moe_layers, topk, num_experts) when routes are replayed; samples
    then must carry routes."""
    B, S = num_rows or len(rows), pad_to
    if len(rows) > B:
        raise ValueError(f"{len(rows)} rows do not fit a micro-batch of {B} rows")
    with_ref = any(s.ref_logprobs is not None for row in rows for s in row)
    at = _Positions()
    order: list[int] = []
    lengths: list[int] = []
    input_index: list[list[int]] = []
    shared_any = False
    pack = False
    for r, row in enumerate(rows):
        row_start = offset = r * S  # flat positions: row * S + column
        units = _units(row, share_prompts)
        pack = pack or len(units) > 1
        for u, unit in enumerate(units):
            prefix = _prefix_len(unit)
            shared_any = shared_any or prefix > 0
            first = unit[0]
            need = sum(s.num_inputs for s in unit) - (len(unit) - 1) * prefix
            left = row_start + S - offset
            if need > left:
                raise ValueError(f"sample {first.index} needs {need} input tokens; row {r} "
                                 f"has {left} left")
            head = range(offset, offset)
            if prefix:
                head = at.place(offset, first.tokens[: prefix + 1], 0, segment=u + 1, block=0,
                                copies=len(unit), sample_id=len(order))
                if route_shape is not None:
                    at.add(at.routes, head, _routes_of(first, 0, prefix))
            offset += prefix
            for k, sample in enumerate(unit):
                local = len(order)
                order.append(sample.index)
                lengths.append(sample.trained_len)
                n = sample.num_inputs
                span = at.place(offset, sample.tokens[prefix:], prefix, segment=u + 1,
                                block=k + 1, copies=1, sample_id=local)
                input_index.append([*head, *span])
                resp = range(offset + sample.prompt_len - 1 - prefix, offset + n - prefix)
                at.responses += resp
                if sample.loss_mask is None:
                    at.loss_mask += [True] * len(resp)
                else:
                    if sample.loss_mask.shape != (sample.response_len,):
                        raise ValueError(f"sample {sample.index}: loss_mask has shape "
                                         f"{tuple(sample.loss_mask.shape)}, want "
                                         f"[{sample.response_len}] (one per response token)")
                    at.loss_mask += sample.loss_mask.bool().tolist()
                at.advantages += [float(sample.advantage)] * len(resp)
                if sample.old_logprobs is not None:
                    at.add(at.old_lp, resp, sample.old_logprobs)
                if sample.rollout_logprobs is not None:
                    at.add(at.roll_lp, resp, sample.rollout_logprobs)
                if with_ref:
                    if sample.ref_logprobs is None:
                        raise ValueError(f"sample {sample.index} has no reference log-probs, "
                                         "while others of its micro-batch have")
                    at.add(at.ref_lp, resp, sample.ref_logprobs)
                if route_shape is not None:
                    at.add(at.routes, span, _routes_of(sample, prefix, n))
                offset += n - prefix

    def filled(value, dtype, where, values):
        out = torch.full((B, S), value, dtype=dtype)
        if values:
            out.view(-1)[where] = torch.tensor(values, dtype=dtype)
        return out

    inputs = torch.tensor(at.inputs, dtype=torch.long)
    responses = torch.tensor(at.responses, dtype=torch.long)
    tokens = filled(pad_id, torch.long, inputs, at.tokens)
    labels = filled(pad_id, torch.long, inputs, at.labels)
    positions = filled(0, torch.long, inputs, at.positions)
    segments = filled(0, torch.long, inputs, at.segments)  # 0 = padding, k+1 = k-th unit
    blocks = filled(0, torch.long, inputs, at.blocks)  # 0 = shared prefix, k+1 = k-th sample
    copies = filled(0, torch.long, inputs, at.copies)
    sample_ids = filled(-1, torch.long, inputs, at.sample_ids)
    loss_mask = filled(False, torch.bool, responses, at.loss_mask)
    advantages = filled(0.0, torch.float32, responses, at.advantages)
    old_lp = torch.zeros((B, S), dtype=torch.float32)
    roll_lp = torch.zeros((B, S), dtype=torch.float32)
    ref_lp = torch.zeros((B, S), dtype=torch.float32) if with_ref else None
    at.write(old_lp, at.old_lp)
    at.write(roll_lp, at.roll_lp)
    if ref_lp is not None:
        at.write(ref_lp, at.ref_lp)
    routes = None
    if route_shape is not None:
        layers, topk, experts = route_shape
        routes = padding_routes(B * S, layers, topk, experts).view(B, S, layers, topk).clone()
        at.write(routes, at.routes)
    causal = torch.ones((S, S), dtype=torch.bool).tril()
    if pack or shared_any:
        mask = _tree_mask(segments, blocks, causal)
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
        copies=copies if shared_any else None,
        input_index=[torch.tensor(i, dtype=torch.long) for i in input_index]
        if shared_any else None,
    )


def _tree_mask(segments: torch.Tensor, blocks: torch.Tensor,
               causal: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] True where attention is masked: a token sees earlier tokens of its
    unit (segment) that are in its own block or in the unit's shared prefix (block 0);
    padding (segment 0) sees only itself, so its softmax stays finite. Each position gets
    one key (its unit and block) and the key of its unit's prefix, so the mask is two
    comparisons of [B, S, S] rather than one per rule: on the CPU these passes were most
    of a micro-batch's layout time."""
    rows, length = segments.shape
    span = int(blocks.max()) + 1
    key = segments * span + blocks
    prefix_key = segments * span
    # Distinct negative keys: a padding position matches nothing but itself.
    padding = segments == 0
    alone = -torch.arange(1, length + 1).expand(rows, length)
    key = torch.where(padding, alone, key)
    prefix_key = torch.where(padding, alone, prefix_key)
    allowed = (key[:, None, :] == key[:, :, None]) | (key[:, None, :] == prefix_key[:, :, None])
    allowed &= causal
    return ~allowed[:, None]


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
    share_prompts: bool = False,
    min_rows: int = 0,
) -> tuple[list[MicroBatch], int]:
    """Cut ``samples`` into micro-batches, all of one shape (pipeline schedules exchange
    one tensor shape per step). Without packing a row holds one sample and a micro-batch
    ``micro_batch_size`` rows; with packing, samples are placed end to end in rows of
    ``max_length`` tokens, ``micro_batch_size`` rows a micro-batch. With
    ``share_prompts`` (no packing) a micro-batch holds ``micro_batch_size`` samples, one
    row per run of them sharing a prompt, as many rows as the fullest micro-batch needs
    (at least ``min_rows``). Returns the micro-batches and the row length.

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
        rows = _rows(samples, True, pad_to, share_prompts)
        groups = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        num_rows = micro_batch_size
    elif share_prompts:
        groups = _shared_rows(samples, micro_batch_size, max_length)
        widest = max(row_length(row, True) for rows in groups for row in rows)
        pad_to = -(-max(widest, min_length) // pad_multiple) * pad_multiple
        if max_length is not None:
            pad_to = min(pad_to, max_length)
        num_rows = max(min_rows, *(len(rows) for rows in groups))
    else:
        pad_to = -(-longest // pad_multiple) * pad_multiple
        if max_length is not None:
            pad_to = min(pad_to, max_length)
        rows = _rows(samples, False, pad_to)
        groups = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        num_rows = micro_batch_size
    batches = [
        make_microbatch(rows, pad_to=pad_to, num_rows=num_rows, pad_id=pad_id,
                        route_shape=route_shape, key=key_offset + k, share_prompts=share_prompts)
        for k, rows in enumerate(groups)
    ]
    return batches, pad_to


def plan_rows(samples: list[Sample], micro_batch_size: int, *,
              max_length: int | None) -> tuple[int, int]:
    """(widest row, most rows of a micro-batch) of :func:`split_microbatches`' layout with
    ``share_prompts`` and no packing: what ranks agree on before laying out their samples
    (every rank's micro-batches must have one shape)."""
    if not samples:
        return 0, 0
    groups = _shared_rows(samples, micro_batch_size, max_length)
    widest = max(row_length(row, True) for rows in groups for row in rows)
    return widest, max(len(rows) for rows in groups)


def _shared_rows(samples: list[Sample], micro_batch_size: int,
                 max_length: int | None) -> list[list[list[Sample]]]:
    """Per micro-batch of ``micro_batch_size`` samples, its rows with prompts shared."""
    return [_rows(samples[i : i + micro_batch_size], False, max_length, True)
            for i in range(0, len(samples), micro_batch_size)]


def set_global_counts(batches: list[MicroBatch], num_samples: int, num_tokens: int) -> None:
    """Record the denominators of the whole mini-batch (all ranks) in every micro-batch."""
    for batch in batches:
        batch.global_num_samples = num_samples
        batch.global_num_tokens = num_tokens
