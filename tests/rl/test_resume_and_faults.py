"""A run killed with SIGKILL resumes to exactly the metrics of an uninterrupted run; a
non-finite loss skips the update and never reaches the weights."""

import signal
import subprocess
import time

import psutil
import pytest
import torch
from rl_fixtures import TINY_RL, launch, read_metrics, start, steps
from safetensors.torch import load_file

# One run for everything a resume must restore (each launch costs ~15 s of the suite, so
# the kill test covers all of it at once): dynamic sampling draws extra prompts (the weak
# cold start's groups are mostly all wrong), so the resumed run must continue from the
# data position past them, on both DP ranks; with a reference KL term it must reload the
# cold start as its reference (recorded in the RL checkpoint), not the step-2 policy it
# resumes from; with --rl-rollout-ahead 1 step k+1's batch is generated (by version k-1)
# while step k trains, each checkpoint holds the batch generated ahead (each DP rank its
# share), and the resumed run trains step 3 on the checkpointed batch and generates
# step 4's itself.
RUN = TINY_RL + ["--expert-model-parallel-size", "2", "--train-iters", "4",
                 "--save-interval", "2", "--routing-replay", "r3",
                 "--rl-mini-batch-size", "8", "--eval-interval", "2", "--rl-rollout-seed", "7",
                 "--rl-filter-groups", "--rl-max-sampling-rounds", "2", "--rl-kl-coef", "0.05",
                 "--rl-rollout-ahead", "1"]
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
    want = steps(read_metrics(reference))
    assert sorted(want) == [1, 2, 3, 4]
    for step, row in want.items():
        # The first step has no batch generated before it; every later one trains on the
        # batch the previous step's weights generated, one version behind the trainer.
        assert row["rollout/staleness"] == (0.0 if step == 1 else 1.0)
        assert row["rollout/weight_version"] == (0.0 if step == 1 else step - 2)
        assert row["rollout/policy_version"] == step
        assert row["replay/fidelity"] == 1.0  # r3 replays the generating policy's routes
        assert row["dynamic_sampling/rounds"] >= 1 and row["rollout/num_samples"] == 16
        assert ("time/rollout_ahead" in row) == (step > 1)
    assert sum(want[s]["dynamic_sampling/extra_prompts"] for s in (1, 2)) > 0
    # Step 2 checkpoints the batch generated ahead, each DP rank its share; the last step
    # generates nothing ahead.
    for step, ahead in ((2, True), (4, False)):
        files = sorted(p.name for p in (reference / f"iter_{step:07d}").glob("rollout_ahead_*"))
        assert files == ([f"rollout_ahead_dp00{r}.{e}" for r in range(2)
                          for e in ("json", "safetensors")] if ahead else []), step

    killed = tmp_path / "killed"
    args = RUN + ["--load", str(coldstart), "--save", str(killed)]
    proc = start(2, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    resumed = launch(2, args)  # resumes from the step-2 checkpoint in --save
    assert "generated ahead by policy version" in resumed.stderr + resumed.stdout
    got = steps(read_metrics(killed))
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert _stable(got[step]) == _stable(want[step]), f"step {step} differs after resume"
    for step in (3, 4):
        assert got[step]["train/kl_ref"] > 0
    assert "eval/accuracy" in got[4]


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
