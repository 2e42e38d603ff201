"""Test batches for the loss tests, and the ways of cutting one into pieces.

A ``Batch`` holds the per-token data of whole responses (one flat vector over all
response tokens). A ``Piece`` says which of those tokens a piece of the batch holds and
where prompt / padding positions sit between them; ``to_inputs`` turns it into
``LossInputs`` with garbage (NaN, +-inf) at every position the mask excludes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_rl.loss import LossInputs, LossOutput, ObjectiveConfig, compute_loss

GARBAGE = torch.tensor([float("nan"), float("-inf"), float("inf"), 7.0], dtype=torch.float64)


@dataclass
class Batch:
    lengths: list[int]
    prompt_lengths: list[int]
    old: torch.Tensor
    rollout: torch.Tensor
    advantages: torch.Tensor
    entropy: torch.Tensor
    token_ids: torch.Tensor
    prev_ids: torch.Tensor
    ref: torch.Tensor
    """log pi_ref: a few tenths away from the current policy, so every KL estimator and
    its gradient differ from 0."""

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def token_range(self, sample: int) -> torch.Tensor:
        start = sum(self.lengths[:sample])
        return torch.arange(start, start + self.lengths[sample])


def make_batch(
    current_logprobs: torch.Tensor, lengths: list[int], *, seed: int = 0, vocab: int = 11
) -> Batch:
    """Old and rollout log-probabilities at random offsets from ``current_logprobs`` wide
    enough that clipping, truncation and masking all occur; one zero advantage."""
    gen = torch.Generator().manual_seed(seed)
    dtype = current_logprobs.dtype
    n = sum(lengths)
    old = current_logprobs.detach() - 0.3 * torch.randn(n, generator=gen, dtype=dtype)
    rollout = old - 0.8 * torch.randn(n, generator=gen, dtype=dtype)
    # One token far on each side of the usual correction bounds (rho = e^2, e^-2).
    rollout[1] = old[1] - 2.0
    rollout[-1] = old[-1] + 2.0
    per_sample = torch.randn(len(lengths), generator=gen, dtype=dtype)
    per_sample[len(lengths) // 2] = 0.0
    advantages = torch.repeat_interleave(per_sample, torch.tensor(lengths))
    return Batch(
        lengths=list(lengths),
        prompt_lengths=[1 + (3 * i) % 4 for i in range(len(lengths))],
        old=old,
        rollout=rollout,
        advantages=advantages,
        entropy=torch.rand(n, generator=gen, dtype=dtype),
        token_ids=torch.randint(0, vocab, (n,), generator=gen),
        prev_ids=torch.randint(0, vocab, (n,), generator=gen),
        ref=current_logprobs.detach() - 0.4 * torch.randn(n, generator=gen, dtype=dtype),
    )


@dataclass
class Piece:
    token_index: torch.Tensor
    """[T] index into the batch's response tokens, -1 for prompt or padding."""
    sample_ids: torch.Tensor
    """[T] local sample id of each position (garbage at padding)."""
    samples: list[int]
    """Global response index of each local sample."""


def _sequence(batch: Batch, sample: int) -> torch.Tensor:
    """Token indices of prompt (-1) + response of one sample, as the trainer packs it."""
    prompt = torch.full((batch.prompt_lengths[sample],), -1, dtype=torch.long)
    return torch.cat([prompt, batch.token_range(sample)])


def _packed(batch: Batch, samples: list[int], padding: int = 0) -> Piece:
    index, ids = [], []
    for local, sample in enumerate(samples):
        seq = _sequence(batch, sample)
        index.append(seq)
        ids.append(torch.full_like(seq, local))
    index.append(torch.full((padding,), -1, dtype=torch.long))
    ids.append(torch.full((padding,), -7, dtype=torch.long))
    return Piece(torch.cat(index), torch.cat(ids), list(samples))


def whole(batch: Batch) -> list[list[Piece]]:
    return [[_packed(batch, list(range(batch.num_samples)))]]


def micro_batches(batch: Batch, k: int) -> list[list[Piece]]:
    """k micro-batches of whole responses, each padded at the end."""
    groups = torch.arange(batch.num_samples).tensor_split(k)
    return [[_packed(batch, g.tolist(), padding=1 + i % 3)] for i, g in enumerate(groups)]


def cp_chunks(batch: Batch, k: int, samples: list[int] | None = None) -> list[Piece]:
    """k context-parallel pieces: piece j holds the j-th contiguous chunk of every
    (prompt + response) sequence; sample ids and response lengths stay those of the
    whole responses."""
    samples = list(range(batch.num_samples)) if samples is None else samples
    pieces = []
    for j in range(k):
        index, ids = [], []
        for local, sample in enumerate(samples):
            chunk = _sequence(batch, sample).tensor_split(k)[j]
            index.append(chunk)
            ids.append(torch.full_like(chunk, local))
        pieces.append(Piece(torch.cat(index), torch.cat(ids), samples))
    return pieces


def split(batch: Batch, name: str) -> list[list[Piece]]:
    """Named ways of cutting the batch: a list of context-parallel groups of pieces."""
    if name == "whole":
        return whole(batch)
    kind, _, ways = name.partition("-")
    if kind == "micro":
        return micro_batches(batch, int(ways))
    if kind == "cp":
        return [cp_chunks(batch, int(ways))]
    if kind == "micro2xcp2":
        groups = torch.arange(batch.num_samples).tensor_split(2)
        return [cp_chunks(batch, 2, g.tolist()) for g in groups]
    raise ValueError(name)


SPLITS = ["whole", "micro-2", "micro-4", "cp-2", "cp-4", "micro2xcp2"]


def entropy_of(batch: Batch, logprobs: torch.Tensor) -> torch.Tensor:
    """A stand-in for pi_theta's entropy that depends on ``logprobs`` (positive, with a
    gradient), so that the entropy bonus's gradient is checked too."""
    return batch.entropy.to(logprobs.dtype) - 0.5 * logprobs


def to_inputs(batch: Batch, piece: Piece, logprobs: torch.Tensor) -> LossInputs:
    """``logprobs`` holds pi_theta of every response token of the batch ([num_tokens])."""
    mask = piece.token_index >= 0
    safe = piece.token_index.clamp(min=0)
    garbage = GARBAGE.to(logprobs.dtype).repeat(len(mask) // 4 + 1)[: len(mask)]

    def per_token(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values[safe], garbage)

    return LossInputs(
        logprobs=per_token(logprobs),
        old_logprobs=per_token(batch.old.to(logprobs.dtype)),
        rollout_logprobs=per_token(batch.rollout.to(logprobs.dtype)),
        advantages=per_token(batch.advantages.to(logprobs.dtype)),
        loss_mask=mask,
        sample_ids=piece.sample_ids,
        num_samples=len(piece.samples),
        response_lengths=torch.tensor([batch.lengths[s] for s in piece.samples]),
        global_num_samples=batch.num_samples,
        global_num_tokens=batch.num_tokens,
        entropy=per_token(entropy_of(batch, logprobs)),
        ref_logprobs=per_token(batch.ref.to(logprobs.dtype)),
    )


LossFn = Callable[[LossInputs, Callable | None], LossOutput]


def run_cp_group(inputs: list[LossInputs], fn: LossFn) -> list[LossOutput]:
    """Run ``fn`` on k pieces at once, one thread per simulated context-parallel rank.

    ``seq_sum`` behaves like an all-reduce with autograd: every rank gets the same sum
    (added in rank order) and the graph links each rank's partial to every rank's loss,
    so backward from the sum of the losses sees what a differentiable all-reduce gives."""
    k = len(inputs)
    if k == 1:
        return [fn(inputs[0], None)]
    barrier = threading.Barrier(k, timeout=60)
    slots: list[torch.Tensor | None] = [None] * k
    results: list[LossOutput | None] = [None] * k
    errors: list[BaseException] = []

    def seq_sum_of(rank: int):
        def seq_sum(partial: torch.Tensor) -> torch.Tensor:
            slots[rank] = partial
            barrier.wait()
            total = slots[0]
            for other in slots[1:]:
                total = total + other
            barrier.wait()
            return total

        return seq_sum

    def work(rank: int) -> None:
        try:
            results[rank] = fn(inputs[rank], seq_sum_of(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def run_split(
    batch: Batch, pieces: list[list[Piece]], logprobs: torch.Tensor, config: ObjectiveConfig
) -> tuple[torch.Tensor, list[dict]]:
    """Total loss over all pieces and each piece's statistics."""
    total = logprobs.new_zeros(())
    stats = []
    for group in pieces:
        outputs = run_cp_group(
            [to_inputs(batch, p, logprobs) for p in group],
            lambda inp, seq_sum: compute_loss(inp, config, seq_sum=seq_sum),
        )
        for out in outputs:
            total = total + out.loss
            stats.append(out.stats)
    return total, stats


def custom_objective(inputs: LossInputs, config: ObjectiveConfig, *, seq_sum=None) -> LossOutput:
    """A user objective for the import-path tests: minus the mean masked log-probability."""
    mask = inputs.loss_mask
    lp = torch.where(mask, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    return LossOutput(-lp.sum() / inputs.global_num_tokens, {})


def custom_estimator(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """A user estimator for the import-path tests: reward minus the batch mean."""
    return rewards - rewards.mean()


class TinyPolicy(nn.Module):
    """Logits of the next token from the previous one: enough to have real parameters."""

    def __init__(self, vocab: int = 11, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, prev: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(prev)))

    def logprobs(self, prev: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(prev), dim=-1).gather(-1, labels[:, None])[:, 0]
