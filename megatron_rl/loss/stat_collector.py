"""Gather many statistics with a single device-to-host copy.

``Stat.mean`` converts to a Python float at once, which on a GPU is one synchronisation
per statistic; a loss reports about twenty every micro-batch. The collector keeps the
sums and counts on the device, stacks them and copies them once.
"""

from __future__ import annotations

import math

import torch

from megatron_rl.metrics.stats import Reduction, Stat


class StatCollector:
    def __init__(self) -> None:
        self._names: list[str] = []
        self._reductions: list[Reduction] = []
        self._values: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def add(
        self, name: str, value: torch.Tensor, count: torch.Tensor, reduction: Reduction
    ) -> None:
        self._names.append(name)
        self._reductions.append(reduction)
        self._values.append(value.detach().double().reshape(()))
        self._counts.append(count.detach().double().reshape(()))

    def mean(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Mean of ``values`` over the positions where ``mask`` is True."""
        values = values.detach().double()
        zero = torch.zeros_like(values)
        self.add(name, torch.where(mask, values, zero).sum(), mask.sum(), "mean")

    def extreme(
        self, name: str, values: torch.Tensor, mask: torch.Tensor, reduction: Reduction
    ) -> None:
        """Max or min of ``values`` over ``mask`` (the reduction's identity when empty)."""
        values = values.detach().double()
        identity = torch.full_like(values, -math.inf if reduction == "max" else math.inf)
        picked = torch.where(mask, values, identity)
        if picked.numel() == 0:
            value = identity.new_tensor(identity_value(reduction))
        else:
            value = picked.amax() if reduction == "max" else picked.amin()
        self.add(name, value, mask.sum(), reduction)

    def stats(self) -> dict[str, Stat]:
        if not self._names:
            return {}
        values = torch.stack(self._values).tolist()
        counts = torch.stack(self._counts).tolist()
        return {
            name: Stat(value, count, reduction)
            for name, reduction, value, count in zip(
                self._names, self._reductions, values, counts, strict=True
            )
        }


def identity_value(reduction: Reduction) -> float:
    return {"max": -math.inf, "min": math.inf}.get(reduction, 0.0)
