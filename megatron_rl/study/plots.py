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
    key = "n" if panels == "n" else "replay"
    return _value_name(key, getattr(config, key))


def _label(config: Config, panels: Panels) -> str:
    """Legend label within a panel: the panel's own key is left out."""
    return config.label if panels == "n" else f"{config.objective}, N = {config.n}"


LINESTYLES = ("-", "--", ":", "-.")


def _value_name(key: str, value) -> str:
    if key == "replay":
        return "no replay" if value == "none" else value.upper()
    return f"N = {value}" if key == "n" else str(value)


def line_styles(configs: Sequence[Config], panels: Panels
                ) -> tuple[dict[Config, tuple[int, str]], list[tuple[str, int | None, str]]]:
    """How each configuration's line is drawn: (colour index, line style), and the key to
    them as (name, colour index or None, line style) when the lines are keyed.

    Within a panel two things can vary: the objective and the replay mode (a panel per N),
    or the objective and N (a panel per replay mode). When both vary a panel can hold a
    dozen lines, more than a legend beside each panel can name and than ten colours keep
    apart: the colour then says the objective, the line style the other key, and one key
    serves the whole figure. Otherwise each line has its own colour and is named in its
    panel's legend (the key is empty)."""
    ordered = sorted(configs, key=Config.sort_key)
    other = "replay" if panels == "n" else "n"
    objectives = list(dict.fromkeys(c.objective for c in ordered))
    others = list(dict.fromkeys(getattr(c, other) for c in ordered))
    if len(objectives) > 1 and len(others) > 1 and len(others) <= len(LINESTYLES):
        styles = {c: (objectives.index(c.objective),
                      LINESTYLES[others.index(getattr(c, other))]) for c in ordered}
        key = [(o, i, "-") for i, o in enumerate(objectives)]
        key += [(_value_name(other, v), None, LINESTYLES[i]) for i, v in enumerate(others)]
        return styles, key
    labels = list(dict.fromkeys(_label(c, panels) for c in ordered))
    return {c: (labels.index(_label(c, panels)), "-") for c in ordered}, []


def _draw(ax, config: Config, runs_rows: list[list[dict]], metric: str, smoothed: bool,
          colour, linestyle: str, label: str) -> int:
    """The line of ``config``'s seeds (mean, and their range as a band); returns how many
    seeds it averages (0: nothing drawn)."""
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
        return 0
    xs, mean, low, high = seed_band(curves)
    if not xs:
        return 0
    seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
    ax.plot(xs, mean, color=colour, ls=linestyle, label=f"{label} ({seeds})", lw=1.6,
            marker="o" if metric in (ACCURACY, SAMPLED_ACCURACY) or len(xs) < 4 else None,
            ms=3)
    if len(curves) > 1:
        ax.fill_between(xs, low, high, color=colour, alpha=0.12, lw=0)
    return len(curves)


def _seeds_note(counts: Sequence[int]) -> str:
    low, high = min(counts), max(counts)
    return f"{low} seed{'s' if high > 1 else ''}" if low == high else f"{low}-{high} seeds"


def _draw_key(ax, key: list[tuple[str, int | None, str]], colours) -> None:
    """The figure's key beside ``ax`` (the rightmost panel of its row)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours(i) if i is not None else "0.3", ls=style, lw=1.6)
               for _, i, style in key]
    ax.legend(handles, [name for name, _, _ in key], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_metric(runs: Sequence[tuple[RunSpec, Path]], metric: str, title: str, smoothed: bool,
                path: Path, axes_row=None, panels: Panels = "n") -> bool:
    """One figure (or one row of a figure) for ``metric``, a panel per N (or per replay
    mode); False when no run has it."""
    return _plot_loaded(_curves(runs), metric, title, smoothed, path, axes_row, panels)


def _plot_loaded(loaded: dict[Config, list[list[dict]]], metric: str, title: str,
                 smoothed: bool, path: Path, axes_row, panels: Panels) -> bool:
    """:func:`plot_metric` on metrics already read (a study's figures read each run once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({_panel(c, panels) for c in loaded})
    if not keys:
        return False
    styles, key = line_styles(list(loaded), panels)
    cmap = matplotlib.colormaps["tab10"]
    colours = lambda i: cmap(i % 10)  # noqa: E731
    own = axes_row is None
    if own:
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False,
                                 sharey=True)
        axes_row = axes[0]
    drawn = False
    for ax, panel in zip(axes_row, keys, strict=False):
        configs = sorted((c for c in loaded if _panel(c, panels) == panel), key=Config.sort_key)
        seeds = []
        for config in configs:
            index, linestyle = styles[config]
            seeds.append(_draw(ax, config, loaded[config], metric, smoothed, colours(index),
                               linestyle, _label(config, panels)))
        drawn |= any(seeds)
        where = _panel_title(configs[0], panels)
        if key and any(seeds):
            where += f" ({_seeds_note([k for k in seeds if k])} a line)"
        ax.set_title(where if own else f"{title}\n{where}", fontsize=9 if own else 8)
        ax.set_xlabel("gradient updates")
        ax.grid(alpha=0.3)
        if not key and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if key:
        _draw_key(axes_row[-1], key, colours)
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
    loaded = _curves(runs)
    for metric, title, smoothed in METRICS:
        path = out_dir / f"{metric.replace('/', '_')}.png"
        if _plot_loaded(loaded, metric, title, smoothed, path, None, panels):
            written.append(path)
        else:
            logger.info("no run reports %s: no figure", metric)
    keys = sorted({_panel(c, panels) for c in loaded})
    if written and keys:
        fig, axes = plt.subplots(len(METRICS), len(keys),
                                 figsize=(4.6 * len(keys), 3.0 * len(METRICS)), squeeze=False)
        for row, (metric, title, smoothed) in zip(axes, METRICS, strict=True):
            _plot_loaded(loaded, metric, title, smoothed, out_dir, row, panels)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["METRICS", "PANELS", "line_styles", "plot_metric", "plot_study", "seed_band", "smooth"]
