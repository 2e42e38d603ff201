"""tools/study.py for real: a tiny cold start and two short RL runs (N = 1 and N = 2),
the summary and the plots; a second invocation skips both; an interrupted run resumes
from its checkpoint. The tests share one study folder and run in file order."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Two updates per run: N = 1 takes two RL steps of 8 responses, N = 2 one step of 16.
# Checkpoints every step (and the last two kept) so that a resume can be staged.
TINY = [
    "--grid", "objectives=minirl n=1,2 replay=r3", "--seeds", "1", "--parallel", "2",
    "--prompts-per-update", "2", "--group-size", "4", "--updates", "2", "--eval-every", "2",
    "--eval-size", "8", "--max-new-tokens", "4", "--micro-batch-size", "8",
    "--coldstart-iters", "2", "--coldstart-batch", "16",
    "--", "--save-interval", "1", "--keep-last", "2",
]
RUN_N1 = "minirl_n1_r3_s1"
RUN_N2 = "minirl_n2_r3_s1"


def study(out: Path, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cut = TINY.index("--")
    args = [*TINY[:cut], *extra, *TINY[cut:]]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--out", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"study.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study(out)


def test_every_run_has_its_folder_metrics_and_command(first):
    out, proc = first
    assert "2 runs (0 finished, 0 to resume, 2 to start)" in proc.stdout
    for name, steps in ((RUN_N1, 2), (RUN_N2, 1)):
        run = out / "runs" / name
        metrics = rows(run / "metrics.jsonl")
        assert [r["step"] for r in metrics] == list(range(steps + 1))
        assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]
        assert metrics[-1]["replay/fidelity"] == pytest.approx(1.0)
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "finished" and record["attempts"] == 1
        command = (run / "command.sh").read_text()
        assert "--routing-replay r3" in command and f"--train-iters {steps}" in command
        assert f"--global-batch-size {8 * (2 // steps)}" in command
    assert (out / "coldstart" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    study_json = json.loads((out / "study.json").read_text())
    assert {r["name"] for r in study_json["runs"]} == {RUN_N1, RUN_N2}


def test_summary_tables_and_plots(first):
    out, proc = first
    table = (out / "summary.md").read_text()
    assert table.count("| minirl | ") == 2 and "replay fidelity" in table
    with open(out / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert [(r["n"], r["replay"], r["seeds"]) for r in summary] == [("1", "r3", "1"),
                                                                     ("2", "r3", "1")]
    for r in summary:
        assert 0.0 <= float(r["final_accuracy_mean"]) <= 1.0
        assert float(r["replay_fidelity_mean"]) == pytest.approx(1.0)
        assert 0.0 < float(r["router_agreement_mean"]) <= 1.0
        assert float(r["step_s_mean"]) > 0
    with open(out / "runs.csv") as handle:
        assert {r["run"] for r in csv.DictReader(handle)} == {RUN_N1, RUN_N2}
    for name in ("rollout_reward_mean", "eval_accuracy", "train_entropy", "mismatch_kl",
                 "mismatch_router_agreement", "replay_fidelity", "overview"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_second_invocation_redoes_nothing(first):
    out, _ = first
    before = {name: (out / "runs" / name / "metrics.jsonl").stat().st_mtime_ns
              for name in (RUN_N1, RUN_N2)}
    proc = study(out)
    assert "2 runs (2 finished, 0 to resume, 0 to start)" in proc.stdout
    for name, mtime in before.items():
        assert (out / "runs" / name / "metrics.jsonl").stat().st_mtime_ns == mtime
        assert json.loads((out / "runs" / name / "run.json").read_text())["attempts"] == 1


def test_other_settings_in_the_same_folder_are_refused(first):
    out, _ = first
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cut = TINY.index("--")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--out", str(out),
                           *TINY[:cut], "--lr", "1e-3", *TINY[cut:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "another command" in proc.stderr


def test_an_interrupted_run_resumes_from_its_checkpoint(first):
    """Stage what a kill during step 2 of the N = 1 run leaves (checkpoint of step 1,
    metrics up to step 1, status running); the study then finishes it from step 1."""
    out, _ = first
    run = out / "runs" / RUN_N1
    kept = rows(run / "metrics.jsonl")[:2]
    shutil.rmtree(run / "iter_0000002")
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))

    proc = study(out)
    assert "2 runs (1 finished, 1 to resume, 0 to start)" in proc.stdout
    log = (run / "train.log").read_text()
    assert "resuming RL from step 1" in log
    metrics = rows(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2]
    assert metrics[:2] == kept  # the steps before the checkpoint are not redone
    assert json.loads((run / "run.json").read_text())["attempts"] == 2
