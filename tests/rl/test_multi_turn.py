"""--rl-rollout-function end to end: the calculator tool on chain_sum under R3."""

from __future__ import annotations

from rl_fixtures import TINY_RL, launch, read_metrics, steps


def test_calculator_rollouts_train_model_tokens_only_with_r3_fidelity_one(coldstart, tmp_path):
    launch(1, [*TINY_RL, "--load", str(coldstart), "--save", str(tmp_path / "run"),
               "--train-iters", "1", "--routing-replay", "r3", "--eval-interval", "-1",
               "--rl-rollout-function", "megatron_rl.rollouts.calculator:calculator_rollout"])
    row = steps(read_metrics(tmp_path / "run"))[1]
    # Routes of each trajectory's last turn cover its earlier turns and the tool's tokens.
    assert row["replay/fidelity"] == 1.0
    # Only the model's tokens are trained on: the loss saw as many tokens as the turns made.
    assert row["rollout/trained_tokens"] == row["rollout/model_tokens"]
    assert 0 < row["rollout/model_tokens"] < row["rollout/response_tokens"]
