"""Every kind of bad input gets a LossInputError naming the tensor and the position."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_rl.loss import (
    LossInputError,
    LossInputs,
    ObjectiveConfig,
    compute_loss,
    validate_inputs,
)


def good() -> LossInputs:
    # Two responses of 2 and 3 tokens after one prompt token each, then one padding token.
    mask = torch.tensor([False, True, True, False, True, True, True, False])
    lp = torch.tensor([-0.1, -1.0, -2.0, -0.2, -0.5, -1.5, -3.0, -0.3], requires_grad=True)
    return LossInputs(
        logprobs=lp,
        old_logprobs=lp.detach() + 0.1,
        rollout_logprobs=lp.detach() - 0.1,
        advantages=torch.tensor([0.0, 1.0, 1.0, 0.0, -0.5, -0.5, -0.5, 0.0]),
        loss_mask=mask,
        sample_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1, 0]),
        num_samples=2,
        response_lengths=torch.tensor([2, 3]),
        global_num_samples=4,
        global_num_tokens=10,
    )


def with_value(name: str, index: int, value: float) -> LossInputs:
    inputs = good()
    tensor = getattr(inputs, name).detach().clone()
    tensor[index] = value
    return dataclasses.replace(inputs, **{name: tensor})


def test_good_inputs_pass():
    validate_inputs(good())
    compute_loss(good(), ObjectiveConfig())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["logprobs", "old_logprobs", "rollout_logprobs", "advantages"])
def test_non_finite_where_masked_in(name, value):
    with pytest.raises(LossInputError, match=rf"LossInputs\.{name}\[5\] = .* \(sample 1\) is not finite"):
        compute_loss(with_value(name, 5, value), ObjectiveConfig())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_where_masked_out_is_ignored(value):
    inputs = with_value("logprobs", 7, value)
    inputs = dataclasses.replace(inputs, logprobs=inputs.logprobs.requires_grad_(True))
    reference = compute_loss(good(), ObjectiveConfig()).loss
    out = compute_loss(inputs, ObjectiveConfig())
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), reference.detach())
    assert torch.isfinite(inputs.logprobs.grad).all()


def test_nan_entropy_where_masked_in():
    inputs = dataclasses.replace(good(), entropy=torch.tensor([0.0, 1, float("nan"), 1, 1, 1, 1, 1]))
    with pytest.raises(LossInputError, match=r"entropy\[2\]"):
        compute_loss(inputs, ObjectiveConfig())


@pytest.mark.parametrize("name", ["old_logprobs", "rollout_logprobs", "advantages", "loss_mask", "sample_ids"])
def test_shape_mismatch(name):
    inputs = good()
    shorter = getattr(inputs, name)[:-1]
    with pytest.raises(LossInputError, match=rf"LossInputs\.{name} has shape \(7,\) but logprobs has \(8,\)"):
        validate_inputs(dataclasses.replace(inputs, **{name: shorter}))


def test_logprobs_not_flat():
    inputs = good()
    with pytest.raises(LossInputError, match=r"logprobs must be a flat \[T\] vector, got shape \(2, 4\)"):
        validate_inputs(dataclasses.replace(inputs, logprobs=inputs.logprobs.detach().view(2, 4)))


def test_mask_not_bool():
    with pytest.raises(LossInputError, match="loss_mask must be bool"):
        validate_inputs(dataclasses.replace(good(), loss_mask=good().loss_mask.float()))


def test_empty_response():
    # Response 1 has no token left: response_lengths says 0.
    inputs = dataclasses.replace(
        good(),
        loss_mask=torch.tensor([False, True, True, False, False, False, False, False]),
        response_lengths=torch.tensor([2, 0]),
    )
    with pytest.raises(LossInputError, match=r"response_lengths\[1\] = 0: response 1 is empty"):
        compute_loss(inputs, ObjectiveConfig())


def test_response_lengths_disagree_with_the_mask():
    inputs = dataclasses.replace(good(), response_lengths=torch.tensor([2, 4]))
    with pytest.raises(LossInputError, match=r"response 1 has 3 masked tokens in this piece but response_lengths\[1\] = 4"):
        compute_loss(inputs, ObjectiveConfig())


def test_response_lengths_wrong_shape():
    with pytest.raises(LossInputError, match=r"response_lengths has shape \(3,\), expected \(2,\)"):
        validate_inputs(dataclasses.replace(good(), response_lengths=torch.tensor([2, 3, 1])))


def test_sample_id_out_of_range():
    inputs = dataclasses.replace(good(), sample_ids=torch.tensor([0, 0, 0, 1, 1, 2, 1, 0]))
    with pytest.raises(LossInputError, match=r"sample_ids\[5\] = 2 is outside 0..1"):
        compute_loss(inputs, ObjectiveConfig())


def test_global_denominators():
    with pytest.raises(LossInputError, match="global_num_samples 1 must be >= 1 and >= this piece's num_samples 2"):
        validate_inputs(dataclasses.replace(good(), global_num_samples=1))
    with pytest.raises(LossInputError, match="global_num_tokens must be >= 1"):
        validate_inputs(dataclasses.replace(good(), global_num_tokens=0))
    with pytest.raises(LossInputError, match="5 masked tokens, more than global_num_tokens = 4"):
        validate_inputs(dataclasses.replace(good(), global_num_tokens=4))


def test_piece_without_responses():
    """A piece holding only padding (e.g. an idle rank) contributes 0 and a gradient of 0."""
    lp = torch.full((4,), float("nan"), requires_grad=True)
    inputs = LossInputs(
        logprobs=lp, old_logprobs=lp.detach(), rollout_logprobs=lp.detach(),
        advantages=torch.zeros(4), loss_mask=torch.zeros(4, dtype=torch.bool),
        sample_ids=torch.zeros(4, dtype=torch.long), num_samples=0,
        response_lengths=torch.zeros(0, dtype=torch.long), global_num_samples=3, global_num_tokens=9,
    )
    for name in ("minirl", "gspo", "cispo", "grpo"):
        config = ObjectiveConfig(objective=name, correction_level="sequence")
        out = compute_loss(inputs, config)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0
        assert lp.grad.eq(0).all()
        assert out.stats["train/loss"].count == 0
