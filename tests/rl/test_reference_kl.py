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


@pytest.mark.parametrize(("mode", "routes", "want"), [
    ("r3", True, ("replay", "rollout")), ("r2", True, ("replay", "old_pass")),
    ("r2", False, ("replay", "old_pass")), ("none", True, ("observe", "rollout")),
    ("none", False, ("off", "rollout")),
])
def test_reference_routes_as_the_updates(mode, routes, want):
    from megatron_rl.replay.config import ReplayConfig

    config = ReplayConfig(routing_replay=mode)
    assert (config.reference_mode(have_rollout_routes=routes),
            config.reference_routes_from()) == want
    # The reference replays exactly when the updates do.
    assert (want[0] == "replay") == (config.update_mode() == "replay")


def test_reference_route_stats_names():
    from megatron_rl.metrics.stats import Stat
    from megatron_rl.training.rl_passes import reference_route_stats

    stats = {"mismatch/router_agreement": Stat(3.0, 4.0, "mean"),
             "mismatch/router_agreement/layer_1": Stat(1.0, 2.0, "mean"),
             "replay/fidelity": Stat(4.0, 4.0, "mean")}
    assert sorted(reference_route_stats(stats, "rollout")) == [
        "ref/replay_fidelity", "ref/router_agreement", "ref/router_agreement/layer_1"]
    assert "ref/target_agreement" in reference_route_stats(stats, "old_pass")
    with pytest.raises(ValueError, match="routes_from"):
        reference_route_stats(stats, "elsewhere")


def test_start_checkpoint_is_recorded_and_carried(tmp_path):
    from megatron_rl.training.checkpoint import LoadSource
    from megatron_rl.training.reference import COMMON_KEY, start_checkpoint

    cold = LoadSource(str(tmp_path / "cold"), 3, {"stage": "sft"}, resume=False)
    recorded = start_checkpoint(cold)
    assert recorded == {"directory": str(tmp_path / "cold"), "step": 3}
    # A resumed RL run takes the record from its own checkpoint, not its own weights.
    resumed = LoadSource(str(tmp_path / "rl"), 2, {"stage": "rl", COMMON_KEY: recorded},
                         resume=True)
    assert start_checkpoint(resumed) == recorded
    assert start_checkpoint(None) is None


def test_differentiable_entropy_matches_autograd():
    import torch

    from megatron_rl.training.token_logprobs import token_entropy

    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    got = token_entropy(logits, 0.7, with_grad=True)
    logp = torch.log_softmax(logits.float() / 0.7, dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weights = torch.rand(2, 3)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert not token_entropy(logits, 0.7).requires_grad
