"""Resume logic and scheduling of the study runner, with a stand-in for pretrain_rl.py.

The stand-in writes metrics lines and a checkpoint tracker like the loop does, so these
tests run in seconds; tests/study/test_study_e2e.py does the same with the real loop."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_rl.study import runner
from megatron_rl.study.runner import Job, StudyError, execute, last_metrics_step

FAKE = """
import json, os, sys, time
out, steps, sleep, code = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
with open(os.path.join(out, "metrics.jsonl"), "a") as f:
    for step in range(steps + 1):
        f.write(json.dumps({"step": step}) + "\\n")
time.sleep(sleep)
sys.exit(code)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE)
    # The job's args are the fake's argv: <dir> <steps> <sleep> <exit code>.
    monkeypatch.setattr(runner, "command", lambda args: [sys.executable, str(script), *args])
    return script


def _job(tmp_path: Path, name: str, steps: int = 2, sleep: float = 0.0, code: int = 0) -> Job:
    directory = tmp_path / name
    return Job(name=name, directory=directory,
               args=[str(directory), str(steps), str(sleep), str(code)], final_step=steps,
               env={})


def _checkpoint(directory: Path, step: int) -> None:
    (directory / f"iter_{step:07d}").mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text(str(step))


def test_a_new_folder_runs_and_then_counts_as_finished(tmp_path, fake_trainer):
    job = _job(tmp_path, "a")
    assert job.action() == "new"
    job.prepare("new")
    assert (job.directory / "command.sh").read_text().count("fake_trainer.py") == 1
    assert execute([job], parallel=1, poll_s=0.05) == []
    record = job.record()
    assert record["status"] == "finished" and record["attempts"] == 1
    assert job.action() == "finished"


def test_failures_are_reported_and_retried(tmp_path, fake_trainer):
    bad = _job(tmp_path, "bad", code=3)
    short = _job(tmp_path, "short")
    short.args[1] = "1"  # exits 0 but stops a step early: not finished either
    for job in (bad, short):
        job.prepare("new")
    assert {j.name for j in execute([bad, short], parallel=2, poll_s=0.05)} == {"bad", "short"}
    assert bad.record()["status"] == "failed" and bad.record()["returncode"] == 3
    # No checkpoint: a rerun starts from scratch, dropping the old metrics, keeping the log.
    assert bad.action() == "restart"
    bad.prepare("restart")
    assert not (bad.directory / "metrics.jsonl").exists()
    assert (bad.directory / "train.log").exists()


def test_an_unfinished_run_with_a_checkpoint_is_resumed_in_place(tmp_path, fake_trainer):
    job = _job(tmp_path, "r", steps=4)
    job.prepare("new")
    job.write_record(status="running", attempts=1)
    _checkpoint(job.directory, 2)
    (job.directory / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s}) + "\n" for s in range(3)))
    assert job.action() == "resume"
    job.prepare("resume")
    # Resuming keeps the checkpoint and metrics for the loop to continue from.
    assert (job.directory / "iter_0000002").is_dir()
    assert last_metrics_step(job.directory / "metrics.jsonl") == 2
    assert execute([job], parallel=1, poll_s=0.05) == []
    assert job.record()["attempts"] == 2
    assert job.action() == "finished"


def test_a_finished_status_without_the_last_step_is_not_finished(tmp_path):
    job = _job(tmp_path, "f", steps=3)
    job.prepare("new")
    job.write_record(status="finished")
    (job.directory / "metrics.jsonl").write_text('{"step": 0}\n{"step": 2}\n{"step": 3')
    assert last_metrics_step(job.directory / "metrics.jsonl") == 2  # cut line ignored
    assert job.action() == "restart"


def test_a_folder_made_with_other_settings_is_refused(tmp_path):
    job = _job(tmp_path, "x")
    job.prepare("new")
    job.write_record(status="finished")
    changed = Job(name="x", directory=job.directory, args=[*job.args, "--lr", "1"],
                  final_step=2, env={})
    with pytest.raises(StudyError, match="another command"):
        changed.action()


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler: libraries used by earlier tests in this process
    (servers, loggers) may have installed theirs."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_parallel_runs_overlap_and_interrupt_ends_only_its_runs(tmp_path, fake_trainer,
                                                                 python_sigint):
    jobs = [_job(tmp_path, f"p{i}", sleep=60.0) for i in range(3)]
    for job in jobs:
        job.prepare("new")
    pid_files = [j.directory / "pid" for j in jobs]

    def ctrl_c_once_two_run():
        deadline = time.time() + 30
        while sum(p.exists() for p in pid_files) < 2 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C in the terminal would

    watcher = threading.Thread(target=ctrl_c_once_two_run, daemon=True)
    started = time.time()
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        execute(jobs, parallel=2, poll_s=0.05)
    watcher.join()
    assert time.time() - started < 40
    # Two ran at once, the third never started, and both running ones were ended.
    assert [p.exists() for p in pid_files] == [True, True, False]
    for pid_file in pid_files[:2]:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    assert [j.record()["status"] for j in jobs[:2]] == ["failed", "failed"]
    assert jobs[2].action() == "restart"  # prepared, never run: starts from scratch
