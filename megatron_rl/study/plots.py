"""PNG figures of a study, laid out like the paper's: a metric against gradient updates,
one panel per off-policiness N, one line per configuration (mean over seeds) with the
seeds' range as a band. ``panels="replay"`` lays one N's ablation out instead: a panel per
replay mode, a line per objective (and N).

Training metrics are noisy at this scale (a few hundred responses per step), so they are
smoothed with a trailing moving average whose window is printed on the figure; held-out
accuracy is plotted as measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from megatron_rl.study.grid import REPLAYS, Config, RunSpec
from megatron_rl.study.summary import (
    ACCURACY,
    AGREEMENT,
    ENTROPY,
    FIDELITY,
    KL,
    REWARD,
    SAMPLED_ACCURACY,
    load_metrics,
    series,
)

logger = logging.getLogger(__name__)

Panels = Literal["n", "replay"]
PANELS: tuple[str, ...] = ("n", "replay")

# (metric, title, smoothed)
METRICS: list[tuple[str, str, bool]] = [
    (REWARD, "training reward", True),
    (ACCURACY, "held-out accuracy (greedy)", False),
    (SAMPLED_ACCURACY, "held-out accuracy (sampled, avg@K)", False),
    (ENTROPY, "token entropy", True),
    (KL, "training-inference KL  E[log mu_old - log pi_old]", True),
    (AGREEMENT, "router agreement", True),
    (FIDELITY, "replay fidelity", True),
]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def seed_band(curves: Sequence[tuple[list[int], list[float]]]):
    """(x, mean, low, high) over the x the seeds share."""
    shared = set(curves[0][0])
    for xs, _ in curves[1:]:
        shared &= set(xs)
    xs = sorted(shared)
    lookup = [dict(zip(cx, cy, strict=True)) for cx, cy in curves]
    mean = [sum(d[x] for d in lookup) / len(lookup) for x in xs]
    low = [min(d[x] for d in lookup) for x in xs]
    high = [max(d[x] for d in lookup) for x in xs]
    return xs, mean, low, high


def _curves(runs: Sequence[tuple[RunSpec, Path]]) -> dict[Config, list[list[dict]]]:
    loaded: dict[Config, list[list[dict]]] = {}
    for spec, directory in runs:
        rows = load_metrics(directory / "metrics.jsonl")
        if any(r["step"] >= 1 for r in rows):
            loaded.setdefault(spec.config, []).append(rows)
    return loaded


def _panel(config: Config, panels: Panels) -> int:
    """The panel's position: N itself, or the replay mode's place in REPLAYS."""
    return config.n if panels == "n" else REPLAYS.index(config.replay)


def _panel_title(config: Config, panels: Panels) -> str:
    if panels == "n":
        return f"N = {config.n}"
    return "no replay" if config.replay == "none" else config.replay.upper()


def _label(config: Config, panels: Panels) -> str:
    """Legend label within a panel: the panel's own key is left out."""
    return config.label if panels == "n" else f"{config.objective}, N = {config.n}"


def _colours(configs: Sequence[Config], panels: Panels) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    labels = list(dict.fromkeys(_label(c, panels) for c in sorted(configs, key=Config.sort_key)))
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _draw(ax, config: Config, runs_rows: list[list[dict]], metric: str, smoothed: bool,
          colour, label: str) -> bool:
    n = config.n
    curves = []
    for rows in runs_rows:
        xs, ys = series(rows, metric, n)
        if not xs:
            continue
        if smoothed:
            ys = smooth(ys, max(1, math.ceil(len(ys) / 8)))
        curves.append((xs, ys))
    if not curves:
        return False
    xs, mean, low, high = seed_band(curves)
    if not xs:
        return False
    ax.plot(xs, mean, color=colour, label=f"{label} ({len(curves)} seeds)", lw=1.6,
            marker="o" if metric in (ACCURACY, SAMPLED_ACCURACY) or len(xs) < 4 else None, ms=3)
    if len(curves) > 1:
        ax.fill_between(xs, low, high, color=colour, alpha=0.18, lw=0)
    return True


def plot_metric(runs: Sequence[tuple[RunSpec, Path]], metric: str, title: str, smoothed: bool,
                path: Path, axes_row=None, panels: Panels = "n") -> bool:
    """One figure (or one row of a figure) for ``metric``, a panel per N (or per replay
    mode); False when no run has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = _curves(runs)
    keys = sorted({_panel(c, panels) for c in loaded})
    if not keys:
        return False
    colours = _colours(list(loaded), panels)
    own = axes_row is None
    if own:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False,
                                 sharey=True)
        axes_row = axes[0]
    drawn = False
    for ax, key in zip(axes_row, keys, strict=False):
        configs = sorted((c for c in loaded if _panel(c, panels) == key), key=Config.sort_key)
        for config in configs:
            label = _label(config, panels)
            drawn |= _draw(ax, config, loaded[config], metric, smoothed, colours[label], label)
        where = _panel_title(configs[0], panels)
        ax.set_title(where if own else f"{title}, {where}", fontsize=9)
        ax.set_xlabel("gradient updates")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes_row[0].set_ylabel(title if own else metric, fontsize=8)
    if own:
        note = " (moving average, seeds' range as band)" if smoothed else " (seeds' range as band)"
        fig.suptitle(title + note, fontsize=10)
        fig.tight_layout()
        if drawn:
            fig.savefig(path, dpi=110)
        plt.close(fig)
    return drawn


def plot_study(runs: Sequence[tuple[RunSpec, Path]], out_dir: Path,
               panels: Panels = "n") -> list[Path]:
    """Every figure of the study into ``out_dir``: one PNG per metric and an overview
    with a row per metric, a panel per N (or per replay mode). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, title, smoothed in METRICS:
        path = out_dir / f"{metric.replace('/', '_')}.png"
        if plot_metric(runs, metric, title, smoothed, path, panels=panels):
            written.append(path)
        else:
            logger.info("no run reports %s: no figure", metric)
    keys = sorted({_panel(c, panels) for c in _curves(runs)})
    if written and keys:
        fig, axes = plt.subplots(len(METRICS), len(keys),
                                 figsize=(4.6 * len(keys), 3.0 * len(METRICS)), squeeze=False)
        for row, (metric, title, smoothed) in zip(axes, METRICS, strict=True):
            plot_metric(runs, metric, title, smoothed, out_dir, axes_row=row, panels=panels)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["METRICS", "PANELS", "plot_metric", "plot_study", "seed_band", "smooth"]
