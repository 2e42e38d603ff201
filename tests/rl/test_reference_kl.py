"""The reference KL and entropy terms in a real RL run (one process, r3, N = 2, two steps):
the reference is the cold start itself, so the KL is exactly 0 at the first update and
grows once the policy moves; the reference pass replays the rollout's routes exactly."""

import pytest
from rl_fixtures import TINY_RL, launch, read_metrics, steps


@pytest.mark.slow
def test_reference_kl_run(coldstart, tmp_path):
    save = tmp_path / "rl"
    launch(1, TINY_RL + ["--train-iters", "2", "--routing-replay", "r3",
                         "--rl-mini-batch-size", "8", "--eval-interval", "0",
                         "--rl-kl-coef", "0.1", "--rl-kl-estimator", "k3",
                         "--rl-entropy-coef", "0.01",
                         "--load", str(coldstart), "--save", str(save)])
    by_step = steps(read_metrics(save))
    assert sorted(by_step) == [1, 2]
    first, second = by_step[1], by_step[2]
    # pi_theta = pi_ref before the first update (same checkpoint, same replayed experts):
    # k3 is exactly 0; the second update sees a policy one update away from the reference.
    assert first["train/kl_ref/update_0"] == 0.0
    assert first["train/kl_ref/update_1"] > 0.0
    assert second["train/kl_ref/update_0"] > 0.0 and second["train/kl_ref"] > 0.0
    for row in by_step.values():
        # R3 applies to the reference pass too: it used exactly the rollout's experts.
        assert row["ref/replay_fidelity"] == 1.0
        assert row["replay/fidelity"] == 1.0
        assert 0.0 <= row["ref/router_agreement"] <= 1.0
        assert row["time/reference"] > 0
        # The loss minimised is the objective's plus 0.1 x KL - 0.01 x entropy (reduced
        # per response, as minirl reduces): the entropy bonus is what moves it here.
        assert row["train/loss"] != row["train/objective_loss"]
        assert row["train/entropy"] > 0 and row["ref/entropy"] > 0
    # Same weights at step 1: the reference sees what the pi_old pass saw.
    assert first["ref/router_agreement"] == pytest.approx(first["mismatch/router_agreement"],
                                                          abs=1e-12)
    assert first["ref/entropy"] == pytest.approx(first["logprob/entropy"], rel=1e-6)
