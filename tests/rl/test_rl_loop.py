"""The RL loop end to end: torchrun with 2 processes (EP=2), the embedded server over
HTTP, every replay mode, on- and off-policy (N = 1, 2); the same runs with prompts not
shared and with the server in rank 0's process change no result."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from rl_fixtures import TINY_RL, launch, read_metrics, steps

from megatron_rl.model.provider import transformer_engine_available

REQUIRED = (
    "rollout/reward_mean", "mismatch/kl", "mismatch/kl_k3", "mismatch/router_agreement",
    "train/clipfrac", "train/entropy", "train/staleness_kl", "time/rollout", "time/logprob",
    "time/update", "time/sync",
)


class TwoStepRuns:
    """Two RL steps at EP = 2 per (replay, mini-batch, extra flags), launched once per
    module: the comparisons below reuse the plain runs test_two_rl_steps checks instead of
    launching their own (each launch is ~30 s of the suite)."""

    def __init__(self, coldstart: Path, root: Path):
        self.coldstart, self.root = coldstart, root
        self.done: dict[tuple, tuple[Path, subprocess.CompletedProcess] | AssertionError] = {}

    def get(self, replay: str, mini_batch: int, *extra: str
            ) -> tuple[Path, subprocess.CompletedProcess]:
        key = (replay, mini_batch, *extra)
        if key not in self.done:
            save = self.root / "-".join(str(k).lstrip("-") for k in key)
            try:
                proc = launch(2, TINY_RL + [
                    "--expert-model-parallel-size", "2", "--train-iters", "2",
                    "--routing-replay", replay, "--rl-mini-batch-size", str(mini_batch),
                    "--lr-decay-style", "linear", "--eval-samples", "2", *extra,
                    "--load", str(self.coldstart), "--save", str(save)])
            except AssertionError as exc:  # every test of this run fails with it, at once
                self.done[key] = exc
            else:
                self.done[key] = save, proc
        if isinstance(self.done[key], AssertionError):
            raise self.done[key]
        return self.done[key]


@pytest.fixture(scope="module")
def runs(coldstart, tmp_path_factory) -> TwoStepRuns:
    return TwoStepRuns(coldstart, tmp_path_factory.mktemp("two-step-runs"))


@pytest.mark.slow
@pytest.mark.parametrize(("mini_batch", "replay"), [(16, "none"), (16, "r2"), (8, "r2"), (8, "r3")],
                         ids=["N1-none", "N1-r2", "N2-r2", "N2-r3"])
def test_two_rl_steps(replay, mini_batch, runs):
    save, proc = runs.get(replay, mini_batch)
    # Prompts are shared where they can be (the default; not with Transformer Engine's
    # attention), the server is a process.
    log = proc.stdout + proc.stderr
    assert ("one row per prompt" in log) == (not transformer_engine_available())
    assert "ready (pid" in log
    rows = read_metrics(save)
    by_step = steps(rows)
    assert sorted(by_step) == [1, 2]
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    assert rows[0]["eval/sampled_accuracy"] is not None
    assert "eval/accuracy" in by_step[2]
    n_updates = 16 // mini_batch
    for step, row in by_step.items():
        for name in REQUIRED:
            assert row.get(name) is not None, name
        assert row["train/updates"] == n_updates
        # RL's own learning rate, not the cold start's (whose Adam state it continues),
        # decaying over all train-iters x N updates; the last update of the step reports.
        last_update = step * n_updates - 1
        assert row["train/lr"] == pytest.approx(5e-4 * (1 - last_update / (2 * n_updates)))
        assert row["rollout/policy_version"] == row["step"]
        # --rl-rollout-ahead 0: each batch comes from the weights the step starts with.
        assert row["rollout/staleness"] == 0.0 and row["rollout/weight_version"] == step - 1
        assert "time/rollout_ahead" not in row and "time/rollout_wait" not in row
        layers = [k for k in row if k.startswith("mismatch/router_agreement/layer_")]
        assert sorted(layers) == [f"mismatch/router_agreement/layer_{i}" for i in (1, 2, 3)]
        assert 0.0 <= row["mismatch/router_agreement"] <= 1.0
        if replay == "none":
            assert "replay/fidelity" not in row and "replay/target_agreement" not in row
        else:
            # r3: the experts used in the updates are the rollout's; r2: the pi_old pass's.
            assert row["replay/fidelity"] == 1.0
            assert 0.0 <= row["replay/target_agreement"] <= 1.0
        if replay == "r2" and n_updates == 1:
            # One update per pi_old pass, same weights: the update's own routing is exactly
            # what the pi_old pass recorded, while the rollout engine (bf16) disagrees on
            # some pairs -- the two figures must not be mixed up.
            assert row["replay/target_agreement"] == 1.0
            assert row["mismatch/router_agreement"] < 1.0
        if n_updates == 2:
            # The second update sees a policy one step newer than pi_old.
            assert f"train/staleness_kl/update_{n_updates - 1}" in row
    # A complete checkpoint and the exported weights of the last policy exist.
    assert (save / "iter_0000002" / "common_state.pt").is_file()
    assert (save / "weights" / "v2" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(transformer_engine_available(),
                    reason="Transformer Engine's attention takes no tree mask: no sharing")
@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_sharing_prompts_changes_no_result(replay, runs):
    """The first RL step with each group's prompt laid out once (test_two_rl_steps' N = 2
    run) and with one row per response: the same rollout, pi_old, loss, clipping and router
    statistics (each shared prompt token counted once per response), up to rounding, over
    two processes (EP=2: the ranks agree on the shape of their tree-shaped micro-batches)."""
    (shared_dir, _), (alone_dir, alone_proc) = (runs.get(replay, 8),
                                                runs.get(replay, 8, "--no-rl-share-prompts"))
    assert "one row per response" in alone_proc.stdout + alone_proc.stderr
    shared, alone = steps(read_metrics(shared_dir))[1], steps(read_metrics(alone_dir))[1]
    # The groups' prompts were shared: the updates computed fewer positions.
    assert shared["train/positions"] < 0.8 * alone["train/positions"]
    assert shared["rollout/reward_mean"] == alone["rollout/reward_mean"]
    for name in ("mismatch/kl", "train/loss", "train/entropy", "train/staleness_kl",
                 "logprob/entropy", "train/grad_norm"):
        assert shared[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-6), name
    for name in ("mismatch/router_agreement", "replay/fidelity", "replay/target_agreement",
                 "train/clipfrac"):
        assert shared[name] == pytest.approx(alone[name], abs=1e-3), name


@pytest.mark.slow
def test_a_colocated_server_changes_no_result(runs):
    """Two RL steps (R3, EP = 2, a weight sync in between, evaluation on the servers) with
    the embedded server in a process of its own (test_two_rl_steps' N2-r3 run) and served
    from rank 0's process: the same rollouts, evaluations and updates, and no server
    process in the colocated run."""
    apart_dir, _ = runs.get("r3", 8)
    together_dir, proc = runs.get("r3", 8, "--rl-rollout-colocate")
    log = proc.stdout + proc.stderr
    assert "ready (in process" in log and "ready (pid" not in log
    assert (together_dir / "weights" / "v2" / "config.json").is_file()
    together, apart = read_metrics(together_dir), read_metrics(apart_dir)
    assert [r["step"] for r in together] == [r["step"] for r in apart] == [0, 1, 2]
    for ours, theirs in zip(together, apart, strict=True):
        for name in ("rollout/reward_mean", "rollout/response_length_mean", "mismatch/kl",
                     "mismatch/router_agreement", "eval/accuracy", "eval/sampled_accuracy",
                     "rollout/weight_version"):
            assert ours.get(name) == theirs.get(name), (ours["step"], name)
        for name in ("train/loss", "train/grad_norm", "train/entropy"):
            if ours["step"] > 0:
                assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name
    assert together[0]["eval/sampled_accuracy"] is not None
    assert together[2]["rollout/weight_version"] == 1
