"""Running a study: the cold start, then every run of the grid, a few at a time, resumable.

Each run lives in ``<out>/runs/<name>/`` with its ``metrics.jsonl``, ``train.log``, the
exact command (``command.sh``) and ``run.json`` (spec, command, status, attempts, wall
time). Running the study again:

- skips a finished run (status finished and metrics up to the last step);
- relaunches an unfinished run with the same command: the RL loop resumes by itself from
  the RL checkpoint in its ``--save`` directory, or starts afresh when there is none (the
  folder's partial metrics are then cleared first);
- refuses a folder whose recorded command differs from the one the settings give now,
  rather than mixing two workloads in one table (use another ``--out``).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from megatron_rl.study.grid import RunSpec
from megatron_rl.study.settings import (
    ROOT,
    StudySettings,
    coldstart_args,
    command,
    environment,
    run_args,
)

logger = logging.getLogger(__name__)

Action = Literal["new", "finished", "resume", "restart"]
TRACKER = "latest_checkpointed_iteration.txt"


class StudyError(RuntimeError):
    """A study folder that does not match the requested study, or a failed cold start."""


def latest_checkpoint(directory: Path) -> int | None:
    """Step of the newest complete checkpoint in ``directory`` (the loop's own rule)."""
    from megatron_rl.training.checkpoint import latest_step

    return latest_step(str(directory)) if directory.is_dir() else None


def last_metrics_step(path: Path) -> int | None:
    """Largest ``step`` in a metrics.jsonl (lines cut short by a crash are ignored)."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:
            continue
        if isinstance(step, int):
            last = step if last is None else max(last, step)
    return last


@dataclass
class Job:
    """One run of the grid (or the cold start) and how to launch it."""

    name: str
    directory: Path
    args: list[str]
    """pretrain_rl.py flags (the recorded command, without the interpreter)."""
    final_step: int
    env: dict[str, str]
    metrics_file: str = "metrics.jsonl"
    _log: IO[str] | None = field(default=None, init=False, repr=False)

    @property
    def record_path(self) -> Path:
        return self.directory / "run.json"

    def record(self) -> dict:
        if not self.record_path.is_file():
            return {}
        return json.loads(self.record_path.read_text())

    def write_record(self, **fields) -> None:
        record = {**self.record(), "name": self.name, "args": self.args, **fields}
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.record_path)

    def action(self) -> Action:
        """What running the study again does with this job's folder."""
        record = self.record()
        if not record and (not self.directory.exists() or not any(self.directory.iterdir())):
            return "new"
        if record and record.get("args") != self.args:
            raise StudyError(
                f"{self.directory} was made by another command than the current settings give "
                f"(recorded: {shlex.join(record.get('args', []))}); choose another --out, or "
                "delete the folder to redo it")
        if record.get("status") == "finished" and \
                last_metrics_step(self.directory / self.metrics_file) == self.final_step:
            return "finished"
        if latest_checkpoint(self.directory) is not None:
            return "resume"
        return "restart"

    def prepare(self, action: Action) -> None:
        """Make the folder ready to launch into."""
        if action == "restart" and self.directory.exists():
            # No checkpoint: the run starts from step 0, so nothing of the old attempt stays.
            for child in self.directory.iterdir():
                if child.name in ("run.json", "train.log"):
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = command(self.args)
        env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        (self.directory / "command.sh").write_text(
            f"#!/usr/bin/env bash\n# {self.name}\ncd {shlex.quote(str(ROOT))}\n"
            f"{env_prefix} {shlex.join(cmd)}\n")

    def start(self) -> subprocess.Popen:
        record = self.record()
        self.write_record(status="running", attempts=record.get("attempts", 0) + 1,
                          started=time.time(), wall_s=record.get("wall_s", 0.0))
        self._log = open(self.directory / "train.log", "a")  # noqa: SIM115 (closed in finish)
        self._log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                        f"{shlex.join(command(self.args))}\n")
        self._log.flush()
        # A session of its own: stopping the study ends exactly this run's processes
        # (the trainer and the rollout server it starts), nothing else.
        return subprocess.Popen(command(self.args), cwd=ROOT, env={**os.environ, **self.env},
                                stdout=self._log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def finish(self, proc: subprocess.Popen) -> bool:
        """Record how the launched process ended; True when the run is complete."""
        if self._log is not None:
            self._log.close()
            self._log = None
        record = self.record()
        wall = record.get("wall_s", 0.0) + time.time() - record.get("started", time.time())
        done = proc.returncode == 0 and \
            last_metrics_step(self.directory / self.metrics_file) == self.final_step
        self.write_record(status="finished" if done else "failed",
                          returncode=proc.returncode, wall_s=wall)
        return done


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """End a job's process group (SIGTERM, then SIGKILL after ``grace_s``)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def execute(jobs: list[Job], parallel: int,
            on_done: Callable[[Job, bool, float], None] | None = None,
            poll_s: float = 0.5) -> list[Job]:
    """Run ``jobs`` at most ``parallel`` at a time; returns the ones that failed.

    On an exception (Ctrl-C, SIGTERM turned into KeyboardInterrupt) the running jobs are
    stopped; their checkpoints let the next invocation resume them."""
    pending = deque(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    failed: list[Job] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                job = pending.popleft()
                running[job.name] = (job, job.start(), time.time())
            time.sleep(poll_s)
            for name, (job, proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                ok = job.finish(proc)
                if not ok:
                    failed.append(job)
                if on_done is not None:
                    on_done(job, ok, time.time() - started)
    except BaseException:
        for job, proc, _ in running.values():
            stop(proc)
            job.finish(proc)
        raise
    return failed


def coldstart_job(settings: StudySettings, directory: Path) -> Job:
    return Job(name="coldstart", directory=directory,
               args=coldstart_args(settings, directory), final_step=settings.coldstart_iters,
               env=environment(settings), metrics_file="sft_metrics.jsonl")


def run_job(settings: StudySettings, spec: RunSpec, coldstart: Path, runs_dir: Path) -> Job:
    directory = runs_dir / spec.name
    return Job(name=spec.name, directory=directory,
               args=run_args(settings, spec, coldstart, directory),
               final_step=settings.steps(spec.config.n), env=environment(settings))


def ensure_coldstart(settings: StudySettings, directory: Path, *, given: bool) -> None:
    """Use the cold-start checkpoint in ``directory``; create (or finish) it if the study
    owns it. A ``given`` directory (``--coldstart``) is only checked, never written."""
    if given:
        if latest_checkpoint(directory) is None:
            raise StudyError(f"--coldstart {directory} holds no complete checkpoint")
        return
    job = coldstart_job(settings, directory)
    action = job.action()
    if action == "finished":
        return
    logger.info("cold start (%s, %d steps) in %s", action, settings.coldstart_iters, directory)
    job.prepare(action)
    if execute([job], 1):
        raise StudyError(f"the cold start failed; see {directory / 'train.log'}")


__all__ = ["Job", "StudyError", "coldstart_job", "ensure_coldstart", "execute",
           "last_metrics_step", "latest_checkpoint", "run_job", "stop"]
