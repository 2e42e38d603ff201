"""The study's grid: which configurations (objective, off-policiness N, routing replay)
run, with which seeds.

A grid is the union of products written as ``"objectives=minirl,grpo n=1,4 replay=none,r3"``;
a key left out takes every value. The union lets a study combine, e.g., the replay sweep of
MiniRL at several N with the objective ablation at N = 1 without running every product.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OBJECTIVES = ("minirl", "minirl_no_is", "minirl_length_norm", "grpo")
"""The paper's objective and its ablations (README.md, section "Objectives", lists them)."""
OFF_POLICINESS = (1, 2, 4, 8)
"""N: gradient updates per rollout batch (global batch / mini-batch)."""
REPLAYS = ("none", "r2", "r3")

_KEYS = {"objectives": "objectives", "objective": "objectives", "n": "n", "replay": "replays",
         "replays": "replays"}


class GridError(ValueError):
    """A grid specification that cannot be expanded."""


@dataclass(frozen=True)
class Config:
    """One configuration of the study (what a line of a plot shows, seeds aside)."""

    objective: str
    n: int
    replay: str

    @property
    def name(self) -> str:
        """File-system name, e.g. ``minirl_n4_r3``."""
        return f"{self.objective}_n{self.n}_{self.replay}"

    @property
    def label(self) -> str:
        """Legend label within a panel of one N, e.g. ``minirl + R3``."""
        return f"{self.objective} + {self.replay.upper() if self.replay != 'none' else 'no replay'}"

    def sort_key(self) -> tuple[int, int, int]:
        return (self.n, OBJECTIVES.index(self.objective) if self.objective in OBJECTIVES
                else len(OBJECTIVES), REPLAYS.index(self.replay))


@dataclass(frozen=True)
class RunSpec:
    """One run: a configuration with a seed."""

    config: Config
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config.name}_s{self.seed}"


def _values(text: str, allowed: Sequence, kind: type) -> tuple:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            raise GridError(f"{part!r} is not a valid {kind.__name__}") from None
        if value not in allowed:
            raise GridError(f"{part!r} is not one of {', '.join(map(str, allowed))}")
        values.append(value)
    if not values:
        raise GridError(f"empty value list {text!r}")
    return tuple(dict.fromkeys(values))


def parse_grid(text: str) -> list[Config]:
    """The configurations of one product, ``"objectives=A,B n=1,4 replay=none,r3"``."""
    chosen: dict[str, tuple] = {"objectives": OBJECTIVES, "n": OFF_POLICINESS, "replays": REPLAYS}
    seen: set[str] = set()
    for token in text.split():
        key, sep, value = token.partition("=")
        canonical = _KEYS.get(key.strip().lower())
        if not sep or canonical is None:
            raise GridError(f"{token!r} in grid {text!r}: expected objectives=..., n=... or "
                            "replay=...")
        if canonical in seen:
            raise GridError(f"{key!r} given twice in grid {text!r}")
        seen.add(canonical)
        if canonical == "objectives":
            chosen[canonical] = _values(value, OBJECTIVES, str)
        elif canonical == "n":
            chosen[canonical] = _values(value, OFF_POLICINESS, int)
        else:
            chosen[canonical] = _values(value, REPLAYS, str)
    return [Config(o, n, r) for o, n, r in
            itertools.product(chosen["objectives"], chosen["n"], chosen["replays"])]


def expand(grids: Iterable[Iterable[Config]], seeds: Sequence[int]) -> list[RunSpec]:
    """Every configuration of the union of ``grids`` with every seed, without repeats.

    Ordered seed first: an interrupted study then holds a complete first seed of every
    configuration before any second seed."""
    if not seeds:
        raise GridError("at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"repeated seeds in {list(seeds)}")
    configs = sorted({c for grid in grids for c in grid}, key=Config.sort_key)
    if not configs:
        raise GridError("the grid is empty")
    return [RunSpec(c, s) for s in seeds for c in configs]


def configs_of(specs: Iterable[RunSpec]) -> list[Config]:
    """The distinct configurations of ``specs``, in grid order."""
    return sorted({s.config for s in specs}, key=Config.sort_key)


__all__ = ["Config", "GridError", "OBJECTIVES", "OFF_POLICINESS", "REPLAYS", "RunSpec",
           "configs_of", "expand", "parse_grid"]
