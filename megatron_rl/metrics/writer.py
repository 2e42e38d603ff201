"""Where metrics go: metrics.jsonl (always, with --save), tensorboard and wandb.

One JSON object per line and step; names are stable and documented in the README. Only
global rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from megatron_rl.distributed import is_rank0

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsWriter:
    """Appends step metrics to ``<save>/metrics.jsonl`` and mirrors them to tensorboard
    and wandb when configured."""

    def __init__(
        self,
        save_dir: str | None,
        *,
        tensorboard_dir: str | None = None,
        wandb_project: str | None = None,
        wandb_exp_name: str | None = None,
        wandb_mode: str = "offline",
        config: dict[str, Any] | None = None,
        filename: str = "metrics.jsonl",
        resume_step: int | None = None,
    ) -> None:
        self.enabled = is_rank0()
        self.path = os.path.join(save_dir, filename) if save_dir and self.enabled else None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        if self.path:
            os.makedirs(save_dir, exist_ok=True)
            if resume_step is not None:
                _truncate_after(self.path, resume_step)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project and wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_project, name=wandb_exp_name, mode=wandb_mode,
                config=config or {}, dir=save_dir or None, resume="allow",
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: str, step: int) -> None:
    """On resume, drop lines of steps after the checkpoint: they will be produced again."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as handle:
        for line in handle:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.writelines(kept)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
