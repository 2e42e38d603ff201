"""Multi-turn trajectories: the trainer's checks (coverage, drift, mask and log-prob
lengths), the calculator tool, and the loss on masked tool tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rl.data.packing import Sample, make_microbatch, set_global_counts
from megatron_rl.loss import ObjectiveConfig
from megatron_rl.loss.compute import compute_loss
from megatron_rl.rollout.trajectory import Trajectory, TrajectoryError, Turn, check_trajectory
from megatron_rl.rollouts.calculator import calculate
from megatron_rl.training.rl_losses import policy_inputs

LAYERS, TOPK = 2, 2


def turn(inputs: list[int], outputs: list[int], logprobs: list[float] | None = None) -> Turn:
    n = len(inputs) + len(outputs) - 1
    return Turn(input_ids=inputs, output_ids=outputs,
                logprobs=torch.tensor(logprobs or [-0.5] * len(outputs)),
                routes=torch.zeros(n, LAYERS, TOPK, dtype=torch.uint8), finish_reason="stop",
                weight_version="0", server_url="http://s", latency_s=0.0)


def two_turns():
    """Prompt [1, 2]; model [3, 4]; tool [5, 6]; model [7]."""
    t0 = turn([1, 2], [3, 4], [-0.1, -0.2])
    t1 = turn([1, 2, 3, 4, 5, 6], [7], [-0.3])
    trajectory = Trajectory(
        prompt_ids=[1, 2], response_ids=[3, 4, 5, 6, 7],
        loss_mask=torch.tensor([True, True, False, False, True]),
        rollout_logprobs=torch.tensor([-0.1, -0.2, 0.0, 0.0, -0.3]), routes=t1.routes)
    return trajectory, [t0, t1]


def check(trajectory, turns):
    check_trajectory(trajectory, turns, sample="step1/p3/s1", want_routes=True,
                     route_shape=(LAYERS, TOPK))


def test_a_consistent_trajectory_passes():
    check(*two_turns())


def test_drift_names_sample_and_first_differing_position():
    trajectory, (t0, _) = two_turns()
    # The second turn's prompt re-tokenised the tool text: 5, 6 became 9.
    drifted = turn([1, 2, 3, 4, 9], [7], [-0.3])
    # A turn whose output is not the trajectory's tokens at its place.
    with pytest.raises(TrajectoryError, match=r"step1/p3/s1.*turn 0.*position 4"):
        check_trajectory(Trajectory(prompt_ids=[1, 2], response_ids=[3, 4, 5, 6, 7],
                                    loss_mask=torch.ones(5, dtype=torch.bool),
                                    rollout_logprobs=torch.zeros(5), routes=None),
                         [turn([1, 2], [3, 4, 8])], sample="step1/p3/s1", want_routes=False)
    good, _ = two_turns()
    with pytest.raises(TrajectoryError, match=r"trajectory step1/p3/s1: turn 1.*position 4 "
                                              r"\(turn: 9, trajectory: 5\)"):
        check(good, [t0, drifted])


def test_last_turn_must_cover_the_whole_trajectory():
    trajectory, turns = two_turns()
    trajectory.response_ids = trajectory.response_ids + [8]  # tokens after the last turn
    trajectory.loss_mask = torch.cat([trajectory.loss_mask, torch.tensor([False])])
    trajectory.rollout_logprobs = torch.cat([trajectory.rollout_logprobs, torch.zeros(1)])
    with pytest.raises(TrajectoryError, match=r"turn 1.*position 7 \(turn: end, trajectory: 8\)"):
        check(trajectory, turns)


def test_routes_must_cover_prompt_plus_response_minus_one():
    trajectory, turns = two_turns()
    trajectory.routes = turns[0].routes  # the first turn's: 3 positions, not 6
    with pytest.raises(TrajectoryError, match=r"step1/p3/s1: routes have shape \(3, 2, 2\), "
                                              r"want \[6"):
        check(trajectory, turns)
    trajectory.routes = None
    with pytest.raises(TrajectoryError, match="routes have shape None"):
        check(trajectory, turns)


@pytest.mark.parametrize("name", ["loss_mask", "rollout_logprobs"])
def test_mask_and_logprobs_one_per_response_token(name):
    trajectory, turns = two_turns()
    setattr(trajectory, name, getattr(trajectory, name)[:4])
    with pytest.raises(TrajectoryError, match=rf"step1/p3/s1: {name} has shape \(4,\), want \[5\]"):
        check(trajectory, turns)


def test_model_tokens_masked_in_with_the_servers_logprobs():
    trajectory, turns = two_turns()
    trajectory.loss_mask = torch.tensor([True, False, False, False, True])
    with pytest.raises(TrajectoryError, match="model token at position 3 \\(turn 0\\)"):
        check(trajectory, turns)
    trajectory, turns = two_turns()
    trajectory.rollout_logprobs = torch.tensor([-0.1, -0.2, 0.0, 0.0, -0.9])
    with pytest.raises(TrajectoryError, match="log-prob at position 6 \\(turn 1\\)"):
        check(trajectory, turns)
    trajectory, turns = two_turns()
    trajectory.loss_mask = torch.zeros(5, dtype=torch.bool)
    with pytest.raises(TrajectoryError, match="no model token"):
        check(trajectory, turns)


def test_calculator_tool():
    assert calculate("CALC 3+4") == "7"
    assert calculate("CALC 10 - 3 + -2\n") == "5"
    assert calculate("CALC 3*4") == "error"
    assert calculate("7") == "error"


def test_masked_tool_tokens_get_no_gradient_and_no_share_of_the_normaliser():
    """A trajectory with tool tokens trains exactly as the same tokens with the tool's
    positions left out of the loss: zero gradient there, and the per-response length and
    global token count are the model tokens only (length-normalised objective too)."""
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    mask = torch.tensor([True, True, False, False, True, True])  # response: 3..8
    roll = torch.tensor([-0.5, -0.4, 0.0, 0.0, -0.7, -0.6])
    for objective in ("minirl", "minirl_length_norm"):
        sample = Sample(tokens=tokens, prompt_len=2, advantage=1.0, rollout_logprobs=roll,
                        old_logprobs=roll.clone(), loss_mask=mask)
        assert sample.trained_len == 4
        batch = make_microbatch([[sample]], pad_to=8)
        set_global_counts([batch], 1, sample.trained_len)
        assert batch.response_lengths.tolist() == [4]
        assert batch.loss_mask[0].tolist() == [False, True, True, False, False, True, True,
                                               False]
        logprobs = torch.full((1, 8), -0.5, requires_grad=True)
        loss = compute_loss(policy_inputs(batch, logprobs, None),
                            ObjectiveConfig(objective=objective)).loss
        loss.backward()
        grad = logprobs.grad[0]
        assert grad[3].item() == 0.0 and grad[4].item() == 0.0  # the tool's tokens
        assert (grad[[1, 2, 5, 6]] != 0).all()
        # The same loss and gradients as the model tokens alone, as one response of 4.
        inputs = policy_inputs(batch, logprobs, None)
        keep = torch.tensor([1, 2, 5, 6])
        alone = torch.full((4,), -0.5, requires_grad=True)
        reference = dataclasses.replace(
            inputs, logprobs=alone, old_logprobs=inputs.old_logprobs[keep],
            rollout_logprobs=inputs.rollout_logprobs[keep],
            advantages=inputs.advantages[keep], loss_mask=torch.ones(4, dtype=torch.bool),
            sample_ids=torch.zeros(4, dtype=torch.long))
        expected = compute_loss(reference, ObjectiveConfig(objective=objective)).loss
        expected.backward()
        assert torch.allclose(loss, expected)
        assert torch.allclose(grad[keep], alone.grad)
