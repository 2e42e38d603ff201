"""Launching real multi-process jobs with torchrun (gloo) from tests.

A module of its own (not conftest.py): every directory's conftest.py is imported under
the same name, so ``from conftest import`` would find whichever was loaded first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, args: list[str], out_dir: Path,
                 timeout: int = 300, env: dict[str, str] | None = None) -> list[dict]:
    """Run ``script`` under torchrun with ``nproc`` processes; each rank writes
    ``<out_dir>/rank<r>.json``. Returns those records, rank order. Fails the test with the
    processes' output if any rank fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(script), "--out", str(out_dir), *args,
    ]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                    PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
