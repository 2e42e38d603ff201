"""A run killed with SIGKILL resumes to exactly the metrics of an uninterrupted run; a
non-finite loss skips the update and never reaches the weights."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from rl_fixtures import TINY_RL, launch, read_metrics, steps
from safetensors.torch import load_file
from torchrun_launch import ROOT, free_port

# Dynamic sampling draws extra prompts (the weak cold start's groups are mostly all wrong):
# the resumed run must continue from the data position past them, on both DP ranks.
# With a reference KL term: the resumed run must reload the cold start as its reference
# (recorded in the RL checkpoint), not the step-2 policy it resumes from.
RUN = TINY_RL + ["--expert-model-parallel-size", "2", "--train-iters", "4",
                 "--save-interval", "2", "--routing-replay", "r3",
                 "--rl-mini-batch-size", "8", "--eval-interval", "2", "--rl-rollout-seed", "7",
                 "--rl-filter-groups", "--rl-max-sampling-rounds", "2", "--rl-kl-coef", "0.05"]
# Wall-clock figures differ between runs; everything else must not.
VOLATILE = ("time/", "rollout/latency", "sync/")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun, its trainers and the rollout server at once -- a crash. torchrun
    may put its workers in process groups of their own, so the tree is walked."""
    try:
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(coldstart, tmp_path):
    reference = tmp_path / "reference"
    launch(2, RUN + ["--load", str(coldstart), "--save", str(reference)])

    killed = tmp_path / "killed"
    args = RUN + ["--load", str(coldstart), "--save", str(killed)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "pretrain_rl.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        tracker = killed / "latest_checkpointed_iteration.txt"
        while time.monotonic() < deadline and proc.poll() is None:
            if tracker.is_file() and tracker.read_text().strip() == "2":
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)  # into step 3
        _kill_tree(proc)
    finally:
        _kill_tree(proc)
    assert max(steps(read_metrics(killed))) < 4

    launch(2, args)  # resumes from the step-2 checkpoint in --save
    want, got = steps(read_metrics(reference)), steps(read_metrics(killed))
    assert sorted(got) == [1, 2, 3, 4]
    assert sum(want[s]["dynamic_sampling/extra_prompts"] for s in (1, 2)) > 0
    for step in (3, 4):
        assert got[step]["train/kl_ref"] > 0
        assert _stable(got[step]) == _stable(want[step]), f"step {step} differs after resume"
    assert "eval/accuracy" in got[4]


# --rl-rollout-ahead 1: step k+1's batch is generated (by version k-1) while step k trains,
# and each checkpoint holds the batch generated ahead; dynamic sampling's extra rounds run
# inside the background generation. One process keeps the three launches near a minute
# (two DP ranks with EP=2 cost 60% more CPU here; the same run passes at NPROC = 2).
NPROC = 1
AHEAD_RUN = TINY_RL + ["--train-iters", "3",
                       "--save-interval", "1", "--routing-replay", "r3",
                       "--rl-mini-batch-size", "8", "--rl-rollout-seed", "7",
                       "--rl-rollout-ahead", "1", "--rl-filter-groups",
                       "--rl-max-sampling-rounds", "2", "--rl-eval-size", "0",
                       "--eval-interval", "-1"]


@pytest.mark.slow
def test_rollout_ahead_labels_staleness_and_resumes_exactly(coldstart, tmp_path):
    reference = tmp_path / "reference"
    launch(NPROC, AHEAD_RUN + ["--load", str(coldstart), "--save", str(reference)])
    want = steps(read_metrics(reference))
    assert sorted(want) == [1, 2, 3]
    for step, row in want.items():
        # The first step has no batch generated before it; every later one trains on the
        # batch the previous step's weights generated, one version behind the trainer.
        assert row["rollout/staleness"] == (0.0 if step == 1 else 1.0)
        assert row["rollout/weight_version"] == (0.0 if step == 1 else step - 2)
        assert row["rollout/policy_version"] == step
        assert row["replay/fidelity"] == 1.0  # r3 replays the generating policy's routes
        assert row["dynamic_sampling/rounds"] >= 1 and row["rollout/num_samples"] == 16
        assert ("time/rollout_ahead" in row) == (step > 1)
    assert sum(want[s]["dynamic_sampling/extra_prompts"] for s in (1, 2, 3)) > 0
    # Step 2 checkpoints the batch generated ahead (each DP rank its share); the last
    # step generates nothing ahead. (Step 1's checkpoint is pruned: --keep-last 2.)
    for step, ahead in ((2, True), (3, False)):
        files = sorted(p.name for p in (reference / f"iter_{step:07d}").glob("rollout_ahead_*"))
        assert files == ([f"rollout_ahead_dp00{r}.{e}" for r in range(NPROC)
                          for e in ("json", "safetensors")] if ahead else []), step

    killed = tmp_path / "killed"
    args = AHEAD_RUN + ["--load", str(coldstart), "--save", str(killed)]
    proc = _start(args)
    try:
        deadline = time.monotonic() + 240
        tracker = killed / "latest_checkpointed_iteration.txt"
        while time.monotonic() < deadline and proc.poll() is None:
            if tracker.is_file() and tracker.read_text().strip() == "1":
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        _kill_tree(proc)
    finally:
        _kill_tree(proc)
    assert max(steps(read_metrics(killed))) < 3
    resumed = launch(NPROC, args)
    assert "generated ahead by policy version" in resumed.stderr + resumed.stdout
    got = steps(read_metrics(killed))
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert _stable(got[step]) == _stable(want[step]), f"step {step} differs after resume"


def _start(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "pretrain_rl.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_non_finite_loss_skips_updates_and_keeps_weights(coldstart, tmp_path):
    save = tmp_path / "nan"
    launch(1, TINY_RL + ["--train-iters", "2", "--load", str(coldstart), "--save", str(save),
                         "--rl-objective", "tests.rl.nan_objective:objective",
                         "--rl-mini-batch-size", "8", "--rl-keep-weight-versions", "3"])
    rows = steps(read_metrics(save))
    assert [rows[s]["train/skipped_updates"] for s in (1, 2)] == [2.0, 2.0]
    versions = [load_file(str(next((save / "weights" / f"v{v}").glob("*.safetensors"))))
                for v in (0, 1, 2)]
    assert versions[0].keys() == versions[2].keys()
    for name, tensor in versions[0].items():
        assert torch.equal(tensor, versions[1][name]) and torch.equal(tensor, versions[2][name])
