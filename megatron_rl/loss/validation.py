"""Checks of a piece's loss inputs, cheap enough to run on every micro-batch.

All value checks are vectorised and read back together (one device synchronisation);
only when something is wrong is the first offending token located for the message.

Policy on non-finite values: where ``loss_mask`` is False anything goes (prompt and
padding positions are often filled with -inf or garbage). Where it is True, every
log-probability and advantage must be finite: -inf would mean that an engine gave
probability 0 to a token that was sampled, NaN or +inf are numerical failures.
"""

from __future__ import annotations

import torch

from megatron_rl.loss.types import LossInputs, SeqSum


class LossInputError(ValueError):
    """Loss inputs that cannot be used; the message names the tensor and the position."""


_TOKEN_TENSORS = ("logprobs", "old_logprobs", "rollout_logprobs", "advantages")
_OPTIONAL_TENSORS = ("entropy", "ref_logprobs")


def _check_structure(inputs: LossInputs) -> None:
    lp = inputs.logprobs
    if lp.dim() != 1:
        raise LossInputError(
            f"LossInputs.logprobs must be a flat [T] vector, got shape {tuple(lp.shape)}"
        )
    named = [(n, getattr(inputs, n)) for n in (*_TOKEN_TENSORS[1:], "loss_mask", "sample_ids")]
    named += [(n, getattr(inputs, n)) for n in _OPTIONAL_TENSORS if getattr(inputs, n) is not None]
    for name, tensor in named:
        if tensor.shape != lp.shape:
            raise LossInputError(
                f"LossInputs.{name} has shape {tuple(tensor.shape)} but logprobs has "
                f"{tuple(lp.shape)}: every per-token tensor must be the same [T] vector"
            )
    for name in (*_TOKEN_TENSORS, *_OPTIONAL_TENSORS):
        tensor = getattr(inputs, name)
        if tensor is not None and not tensor.is_floating_point():
            raise LossInputError(f"LossInputs.{name} must be floating point, got {tensor.dtype}")
    if inputs.loss_mask.dtype != torch.bool:
        raise LossInputError(f"LossInputs.loss_mask must be bool, got {inputs.loss_mask.dtype}")
    for name in ("sample_ids", "response_lengths"):
        tensor = getattr(inputs, name)
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise LossInputError(f"LossInputs.{name} must be an integer tensor, got {tensor.dtype}")
    if inputs.num_samples < 0:
        raise LossInputError(f"LossInputs.num_samples must be >= 0, got {inputs.num_samples}")
    if tuple(inputs.response_lengths.shape) != (inputs.num_samples,):
        raise LossInputError(
            f"LossInputs.response_lengths has shape {tuple(inputs.response_lengths.shape)}, "
            f"expected ({inputs.num_samples},) = [num_samples]"
        )
    if inputs.global_num_samples < max(1, inputs.num_samples):
        raise LossInputError(
            f"LossInputs.global_num_samples {inputs.global_num_samples} must be >= 1 and >= "
            f"this piece's num_samples {inputs.num_samples}"
        )
    if inputs.global_num_tokens < 1:
        raise LossInputError(
            f"LossInputs.global_num_tokens must be >= 1, got {inputs.global_num_tokens}"
        )


def _first(where: torch.Tensor) -> int:
    return int(where.nonzero()[0, 0])


def validate_inputs(inputs: LossInputs, *, seq_sum: SeqSum | None = None) -> None:
    """Raise :class:`LossInputError` if ``inputs`` are malformed.

    Besides shapes, dtypes and finiteness this checks that each response's masked
    tokens, summed over the pieces ``seq_sum`` joins, number exactly its
    ``response_lengths`` entry: a piece holds whole responses unless a ``seq_sum``
    joins their parts. With context parallelism this costs one small collective."""
    _check_structure(inputs)
    mask = inputs.loss_mask
    num_samples = inputs.num_samples
    ids = inputs.sample_ids.long()
    bad_ids = mask & ((ids < 0) | (ids >= num_samples))
    named = [(n, getattr(inputs, n)) for n in _TOKEN_TENSORS]
    named += [(n, getattr(inputs, n)) for n in _OPTIONAL_TENSORS if getattr(inputs, n) is not None]
    nonfinite = [mask & ~torch.isfinite(t.detach()) for _, t in named]
    lengths = inputs.response_lengths.to(mask.device)
    counted = mask & ~bad_ids
    dtype = torch.promote_types(inputs.logprobs.dtype, torch.float32)
    counts = torch.zeros(num_samples, dtype=dtype, device=mask.device)
    if num_samples > 0:
        counts = counts.index_add(0, torch.where(counted, ids, 0), counted.to(dtype))
    if seq_sum is not None:
        counts = seq_sum(counts)
    flags = torch.stack(
        [
            bad_ids.any(),
            *(bad.any() for bad in nonfinite),
            (lengths < 1).any(),
            (counts != lengths.to(dtype)).any(),
            mask.sum() > inputs.global_num_tokens,
        ]
    )
    if not bool(flags.any()):
        return
    flags_list = flags.tolist()
    if flags_list[0]:
        t = _first(bad_ids)
        raise LossInputError(
            f"LossInputs.sample_ids[{t}] = {int(ids[t])} is outside 0..{num_samples - 1} "
            f"(num_samples = {num_samples}) at a token where loss_mask is True "
            f"({int(bad_ids.sum())} such tokens)"
        )
    for (name, tensor), bad, flag in zip(named, nonfinite, flags_list[1:], strict=False):
        if flag:
            t = _first(bad)
            raise LossInputError(
                f"LossInputs.{name}[{t}] = {float(tensor[t])} (sample {int(ids[t])}) is not "
                f"finite where loss_mask is True ({int(bad.sum())} such tokens in this piece); "
                f"non-finite values are allowed only where loss_mask is False"
            )
    k = 1 + len(named)
    if flags_list[k]:
        i = _first(lengths < 1)
        raise LossInputError(
            f"LossInputs.response_lengths[{i}] = {int(lengths[i])}: response {i} is empty; "
            f"drop empty responses before the loss (they carry no token to train on)"
        )
    if flags_list[k + 1]:
        i = _first(counts != lengths.to(dtype))
        where = "summed over the pieces seq_sum joins" if seq_sum is not None else "in this piece"
        raise LossInputError(
            f"response {i} has {int(counts[i])} masked tokens {where} but "
            f"response_lengths[{i}] = {int(lengths[i])}; a piece must hold whole responses "
            f"unless a seq_sum joins their parts (context parallelism)"
        )
    raise LossInputError(
        f"this piece has {int(mask.sum())} masked tokens, more than global_num_tokens = "
        f"{inputs.global_num_tokens}"
    )
