"""Statistics that reduce exactly across micro-batches and ranks.

A training step sees its data in pieces (micro-batches, data-parallel ranks, pipeline
stages). A mean must therefore travel as (sum, count), an extreme as a value with its
reduction, so that the step's figure is the same however the batch was split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Reduction = Literal["mean", "sum", "max", "min"]


@dataclass
class Stat:
    """One statistic of a piece of the batch.

    For ``mean`` the value is the sum of the observations and ``count`` their number;
    for ``sum``, ``max`` and ``min`` ``count`` only records whether anything was seen.
    """

    value: float
    count: float
    reduction: Reduction = "mean"

    @staticmethod
    def mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> Stat:
        values = values.detach().double()
        if mask is not None:
            mask = mask.detach().to(values.dtype)
            return Stat(float((values * mask).sum()), float(mask.sum()), "mean")
        return Stat(float(values.sum()), float(values.numel()), "mean")

    @staticmethod
    def extreme(values: torch.Tensor, mask: torch.Tensor | None, reduction: Reduction) -> Stat:
        values = values.detach().double()
        if mask is not None:
            values = values[mask.detach().bool()]
        if values.numel() == 0:
            return Stat(_identity(reduction), 0.0, reduction)
        value = values.max() if reduction == "max" else values.min()
        return Stat(float(value), float(values.numel()), reduction)

    def merge(self, other: Stat) -> Stat:
        if self.reduction != other.reduction:
            raise ValueError(f"cannot merge a {self.reduction} stat with a {other.reduction} stat")
        if self.reduction in ("mean", "sum"):
            value = self.value + other.value
        elif self.reduction == "max":
            value = max(self.value, other.value)
        else:
            value = min(self.value, other.value)
        return Stat(value, self.count + other.count, self.reduction)

    def result(self) -> float:
        if self.count == 0:
            return float("nan")
        if self.reduction == "mean":
            return self.value / self.count
        return self.value


def _identity(reduction: Reduction) -> float:
    return {"max": -math.inf, "min": math.inf}.get(reduction, 0.0)


def merge_stats(pieces: list[dict[str, Stat]]) -> dict[str, Stat]:
    """Merge the statistics of several pieces (e.g. micro-batches) key by key."""
    merged: dict[str, Stat] = {}
    for piece in pieces:
        for name, stat in piece.items():
            merged[name] = merged[name].merge(stat) if name in merged else stat
    return merged


def all_reduce_stats(
    stats: dict[str, Stat], group: dist.ProcessGroup | None = None
) -> dict[str, Stat]:
    """Reduce statistics over a process group; every rank must pass the same names.

    Names missing on some ranks are allowed: they are exchanged first so that every
    rank takes part in the same collectives."""
    if not dist.is_available() or not dist.is_initialized():
        return dict(stats)
    if dist.get_world_size(group) == 1:
        return dict(stats)
    local = {name: (stat.reduction,) for name, stat in stats.items()}
    gathered: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, local, group=group)
    kinds: dict[str, str] = {}
    for entry in gathered:
        for name, (reduction,) in entry.items():
            kinds.setdefault(name, reduction)
    names = sorted(kinds)
    out: dict[str, Stat] = {}
    for reduction, op in (("mean", dist.ReduceOp.SUM), ("sum", dist.ReduceOp.SUM),
                          ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        chosen = [n for n in names if kinds[n] == reduction]
        if not chosen:
            continue
        empty = _identity(reduction)  # type: ignore[arg-type]
        values = torch.tensor(
            [stats[n].value if n in stats else empty for n in chosen], dtype=torch.float64
        )
        counts = torch.tensor([stats[n].count if n in stats else 0.0 for n in chosen],
                              dtype=torch.float64)
        dist.all_reduce(values, op=op, group=group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        for i, name in enumerate(chosen):
            out[name] = Stat(float(values[i]), float(counts[i]), reduction)  # type: ignore[arg-type]
    return out


def results(stats: dict[str, Stat]) -> dict[str, float]:
    return {name: stat.result() for name, stat in sorted(stats.items())}
