"""What the user watches: a rich progress display and one line per RL step (rank 0)."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from megatron_rl.distributed import is_rank0

logger = logging.getLogger(__name__)

# Figures shown on the per-step line: metric name -> label.
STEP_LINE = (
    ("rollout/reward_mean", "reward"),
    ("eval/accuracy", "acc"),
    ("mismatch/kl", "kl"),
    ("train/clipfrac", "clip"),
    ("train/entropy", "ent"),
    ("train/staleness_kl", "stale"),
    ("mismatch/router_agreement", "agree"),
    ("replay/fidelity", "fidelity"),
)
TIMES = ("time/rollout", "time/logprob", "time/update", "time/sync")


class RLProgress:
    """Step, rollout and update bars with ETA; a summary line per step."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled and is_rank0()
        self.console = Console(stderr=True)
        self._progress = None
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self._progress.start()
        self.steps = self._progress.add_task("steps", total=total_steps, completed=start_step)
        self.rollout = self._progress.add_task("rollout", total=1, visible=False)
        self.update = self._progress.add_task("updates", total=1, visible=False)
        self._started = time.perf_counter()

    def start_rollout(self, total: int) -> None:
        if self._progress:
            self._progress.reset(self.rollout, total=total, visible=True)

    def rollout_advance(self, n: int = 1) -> None:
        if self._progress:
            self._progress.advance(self.rollout, n)

    def start_updates(self, total: int) -> None:
        if self._progress:
            self._progress.reset(self.update, total=total, visible=True)

    def update_advance(self, *_args) -> None:
        if self._progress:
            self._progress.advance(self.update)

    def end_step(self, step: int, metrics: dict[str, float]) -> None:
        if not is_rank0():
            return
        if not self.enabled:
            logger.info(format_step_line(step, metrics))
            return
        self._progress.advance(self.steps)
        self.console.print(format_step_line(step, metrics))

    def close(self) -> None:
        if self._progress:
            self._progress.stop()


def format_step_line(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step:>4}"]
    for name, label in STEP_LINE:
        value = metrics.get(name)
        if value is not None and value == value:
            parts.append(f"{label} {value:.4g}")
    times = [f"{n.split('/')[1]} {metrics[n]:.1f}s" for n in TIMES if n in metrics]
    if times:
        parts.append("| " + " ".join(times))
    layers = sorted(k for k in metrics if k.startswith("mismatch/router_agreement/layer_"))
    if layers:
        parts.append("| agree/layer " + " ".join(f"{metrics[k]:.3f}" for k in layers))
    return "  ".join(parts)
