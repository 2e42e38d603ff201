"""Helpers of the end-to-end RL tests: launch pretrain_rl.py, read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from torchrun_launch import ROOT, free_port

# Small and fast: 4 prompts x 4 responses per step, a few new tokens, 8 held-out items.
TINY_RL = [
    "--stage", "rl", "--rl-group-size", "4", "--global-batch-size", "16",
    "--micro-batch-size", "4", "--rl-max-new-tokens", "5", "--rl-eval-size", "8",
    "--eval-micro-batch-size", "8", "--eval-max-new-tokens", "4", "--lr", "5e-4",
    "--lr-decay-style", "constant", "--adam-beta2", "0.95", "--no-progress",
    "--seq-length", "96",
]


def _command(nproc: int, args: list[str], env: dict | None = None) -> tuple[list[str], dict]:
    """torchrun's command line for ``pretrain_rl.py args`` and the environment to run it in."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "pretrain_rl.py"), *args]
    return cmd, dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                     PYTHONWARNINGS="ignore", **(env or {}))


def start(nproc: int, args: list[str], **popen) -> subprocess.Popen:
    """Start ``pretrain_rl.py`` under torchrun and return at once (tests that kill or
    watch a run); ``popen`` are ``subprocess.Popen``'s keywords (stdout, stderr, ...)."""
    cmd, env = _command(nproc, args)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def launch(nproc: int, args: list[str], *, timeout: int = 300, check: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, full_env = _command(nproc, args, env)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain_rl.py {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(rows: list[dict]) -> dict[int, dict]:
    return {row["step"]: row for row in rows if row["step"] > 0}
