"""Reading a study's runs back: per-run figures, then mean ± std per configuration.

Each run's ``metrics.jsonl`` (one object per RL step, the eval at step 0 included) is
reduced to a few numbers; configurations average them over seeds. Steps are converted to
gradient updates (``step x N``) so that runs with different N line up.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.study.grid import Config, RunSpec

REWARD = "rollout/reward_mean"
ACCURACY = "eval/accuracy"
SAMPLED_ACCURACY = "eval/sampled_accuracy"
ENTROPY = "train/entropy"
KL = "mismatch/kl"
AGREEMENT = "mismatch/router_agreement"
FIDELITY = "replay/fidelity"

COLLAPSE_RATIO = 0.5
"""A run counts as collapsed when its final held-out accuracy (greedy or sampled), or its
training reward over the last updates, is below this fraction of the best it reached
before (the cold-start accuracy included) and at least :data:`COLLAPSE_MIN_DROP` below
it: a drop no seed-to-seed noise of a stable run explains."""
COLLAPSE_MIN_DROP = 0.05
"""Smallest absolute drop (accuracy or reward) that can count as a collapse."""
COLLAPSE_KL_FACTOR = 10.0
"""A run also counts as collapsed when its training-inference KL over the last updates is
more than this many times its KL over the first updates (the same fraction of the run)
and above :data:`COLLAPSE_KL_FLOOR`: the mismatch blow-up that precedes the paper's
collapses. Stable runs here stay at 2-5e-3 throughout."""
COLLAPSE_KL_FLOOR = 1e-2
"""Smallest last-updates KL that can count as a blow-up."""


def _fell(last: float, best: float) -> bool:
    return last < COLLAPSE_RATIO * best and best - last >= COLLAPSE_MIN_DROP


def _blew_up(last: float, first: float) -> bool:
    """KL over the last updates against the first (the k1 estimate can dip below 0 while
    the policies agree: that counts as 0; a run with no first-window KL compares with 0)."""
    baseline = 0.0 if math.isnan(first) else max(first, 0.0)
    return last > COLLAPSE_KL_FLOOR and last > COLLAPSE_KL_FACTOR * baseline


def load_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl by step; a step written twice (a resumed run) keeps its
    last row, and lines cut short by a crash are skipped."""
    by_step: dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def series(rows: Sequence[dict], name: str, n: int) -> tuple[list[int], list[float]]:
    """(gradient updates, values) of metric ``name``; missing and null values skipped."""
    xs, ys = [], []
    for row in rows:
        value = row.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["step"] * n)
            ys.append(float(value))
    return xs, ys


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _tail(xs: Sequence[int], ys: Sequence[float], start: float) -> list[float]:
    return [y for x, y in zip(xs, ys, strict=True) if x > start]


def _rolling_best(xs: Sequence[int], ys: Sequence[float], window: float) -> float:
    """Best mean of ``ys`` over any window of ``window`` updates ending at a point."""
    best = -math.inf
    for i, x in enumerate(xs):
        inside = [y for xx, y in zip(xs[: i + 1], ys[: i + 1], strict=True) if xx > x - window]
        best = max(best, _mean(inside))
    return best


@dataclass
class RunSummary:
    """The figures of one run."""

    spec: RunSpec
    steps: int
    updates: int
    initial_accuracy: float
    final_accuracy: float
    best_accuracy: float
    initial_sampled_accuracy: float
    final_sampled_accuracy: float
    reward_last: float
    reward_best: float
    entropy_last: float
    kl: float
    router_agreement: float
    replay_fidelity: float
    step_s: float
    collapsed: bool
    collapse_reason: str = ""
    """Which signals fired ("reward", "held-out accuracy", "sampled accuracy", "kl")."""

    @classmethod
    def from_rows(cls, spec: RunSpec, rows: Sequence[dict], tail: float = 0.25) -> RunSummary:
        n = spec.config.n
        updates = max((r["step"] for r in rows), default=0) * n
        start = updates * (1.0 - tail)
        window = max(updates * tail, n)
        acc_x, acc = series(rows, ACCURACY, n)
        sam_x, sam = series(rows, SAMPLED_ACCURACY, n)
        rew_x, rew = series(rows, REWARD, n)
        ent_x, ent = series(rows, ENTROPY, n)
        # Step time without the held-out evaluation some steps include.
        times = [r["time/step"] - (r.get("time/eval") or 0.0) for r in rows
                 if r["step"] >= 1 and isinstance(r.get("time/step"), (int, float))]
        initial = acc[0] if acc and acc_x[0] == 0 else math.nan
        final = acc[-1] if acc else math.nan
        reward_last = _mean(_tail(rew_x, rew, start))
        reward_best = _rolling_best(rew_x, rew, window) if rew else math.nan
        best_acc = max(acc) if acc else math.nan
        kl_x, kl = series(rows, KL, n)
        kl_first = _mean([y for x, y in zip(kl_x, kl, strict=True) if x <= updates * tail])
        kl_last = _mean(_tail(kl_x, kl, start))
        signals = {
            "held-out accuracy": bool(acc) and _fell(final, best_acc),
            "sampled accuracy": bool(sam) and _fell(sam[-1], max(sam)),
            "reward": bool(rew) and _fell(reward_last, reward_best),
            "kl": _blew_up(kl_last, kl_first),
        }
        reasons = [name for name, fired in signals.items() if fired]
        return cls(
            spec=spec, steps=updates // n if n else 0, updates=updates,
            initial_accuracy=initial, final_accuracy=final, best_accuracy=best_acc,
            initial_sampled_accuracy=sam[0] if sam and sam_x[0] == 0 else math.nan,
            final_sampled_accuracy=sam[-1] if sam else math.nan,
            reward_last=reward_last, reward_best=reward_best,
            entropy_last=_mean(_tail(ent_x, ent, start)),
            kl=_mean(kl),
            router_agreement=_mean(series(rows, AGREEMENT, n)[1]),
            replay_fidelity=_mean(series(rows, FIDELITY, n)[1]),
            step_s=statistics.median(times) if times else math.nan,
            collapsed=bool(reasons), collapse_reason="+".join(reasons),
        )


# (attribute, column title, number format) of the per-configuration table.
COLUMNS: list[tuple[str, str, str]] = [
    ("initial_accuracy", "cold-start acc", "{:.3f}"),
    ("final_accuracy", "final held-out acc", "{:.3f}"),
    ("best_accuracy", "best held-out acc", "{:.3f}"),
    ("initial_sampled_accuracy", "cold-start sampled acc", "{:.3f}"),
    ("final_sampled_accuracy", "final sampled acc", "{:.3f}"),
    ("reward_last", "reward (last 25%)", "{:.3f}"),
    ("kl", "train-infer KL", "{:.2e}"),
    ("router_agreement", "router agreement", "{:.4f}"),
    ("replay_fidelity", "replay fidelity", "{:.4f}"),
    ("entropy_last", "entropy (last 25%)", "{:.3f}"),
    ("step_s", "s / RL step", "{:.2f}"),
]


@dataclass
class ConfigSummary:
    """Mean and standard deviation over the seeds of one configuration."""

    config: Config
    runs: list[RunSummary]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, _, _ in COLUMNS:
            values = [getattr(r, attr) for r in self.runs if not math.isnan(getattr(r, attr))]
            self.mean[attr] = _mean(values)
            # One seed has no spread to show (NaN, printed as the bare mean).
            self.std[attr] = statistics.stdev(values) if len(values) > 1 else math.nan

    @property
    def collapsed(self) -> int:
        return sum(r.collapsed for r in self.runs)


def summarize(runs: Sequence[tuple[RunSpec, Path]], tail: float = 0.25) -> list[ConfigSummary]:
    """Per-configuration summaries of the runs that have metrics, in grid order."""
    by_config: dict[Config, list[RunSummary]] = {}
    for spec, directory in runs:
        rows = load_metrics(directory / "metrics.jsonl")
        if any(r["step"] >= 1 for r in rows):
            by_config.setdefault(spec.config, []).append(RunSummary.from_rows(spec, rows, tail))
    return [ConfigSummary(c, by_config[c]) for c in sorted(by_config, key=Config.sort_key)]


def _cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "–"
    return f"{fmt.format(mean)} ± {fmt.format(std)}" if std == std else fmt.format(mean)


def markdown_table(summaries: Sequence[ConfigSummary]) -> str:
    head = ["objective", "N", "replay", "seeds"] + [t for _, t, _ in COLUMNS] + ["collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        c = s.config
        cells = [c.objective, str(c.n), c.replay, str(len(s.runs))]
        cells += [_cell(s.mean[a], s.std[a], f) for a, _, f in COLUMNS]
        cells.append(f"{s.collapsed}/{len(s.runs)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(summaries: Sequence[ConfigSummary], path: Path) -> None:
    attrs = [a for a, _, _ in COLUMNS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["objective", "n", "replay", "seeds", "collapsed"]
                        + [f"{a}_{k}" for a in attrs for k in ("mean", "std")])
        for s in summaries:
            c = s.config
            writer.writerow([c.objective, c.n, c.replay, len(s.runs), s.collapsed]
                            + [f"{v:.6g}" for a in attrs for v in (s.mean[a], s.std[a])])


def write_runs_csv(summaries: Sequence[ConfigSummary], path: Path) -> None:
    """One row per run (the seeds the table averages)."""
    fields = ["initial_accuracy", "final_accuracy", "best_accuracy",
              "initial_sampled_accuracy", "final_sampled_accuracy", "reward_last",
              "reward_best", "entropy_last", "kl", "router_agreement", "replay_fidelity",
              "step_s", "collapsed", "collapse_reason", "steps", "updates"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "objective", "n", "replay", "seed", *fields])
        for s in summaries:
            for r in s.runs:
                c = r.spec.config
                writer.writerow([r.spec.name, c.objective, c.n, c.replay, r.spec.seed]
                                + [_csv_value(getattr(r, f)) for f in fields])


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else int(value)


__all__ = ["COLLAPSE_KL_FACTOR", "COLLAPSE_KL_FLOOR", "COLLAPSE_MIN_DROP", "COLLAPSE_RATIO",
           "COLUMNS", "SAMPLED_ACCURACY", "ConfigSummary", "RunSummary", "load_metrics",
           "markdown_table", "series", "summarize", "write_csv", "write_runs_csv"]
