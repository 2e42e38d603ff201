"""MiniRL's gradient on a real (tiny) model is the paper's
sum_t M_t w_t A grad log pi_theta(y_t), the clip mask switches off exactly the tokens the
paper names, and on-policy minirl, ppo and reinforce give the same gradient."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from loss_batches import TinyPolicy

from megatron_rl.loss import LossInputs, ObjectiveConfig, compute_loss

VOCAB, HIDDEN = 11, 8
LENGTHS = [4, 3, 5]
ADVANTAGE = [1.0, -0.7, 0.4]
# r = pi_theta/pi_old per token, chosen to hit every case of the paper's mask with
# eps_low = 0.2, eps_high = 0.27 (A > 0 for responses 0 and 2, A < 0 for response 1):
RATIO = [
    [1.0, 1.5, 0.6, 1.2],  # A>0: 1.5 > 1.27 clipped; 0.6 < 0.8 NOT clipped (wrong side)
    [0.5, 1.6, 0.9],  # A<0: 0.5 < 0.8 clipped; 1.6 > 1.27 NOT clipped
    [1.3, 0.79, 1.26, 2.0, 0.81],  # A>0: 1.3 and 2.0 clipped
]
CLIPPED = {(0, 1), (1, 0), (2, 0), (2, 3)}  # (response, token) that get M_t = 0
RHO = [[1.0, 7.0, 0.9, 1.1], [0.3, 1.0, 2.0], [1.0, 1.2, 0.8, 6.0, 1.05]]  # pi_old/mu_old


def _policy_and_tokens():
    torch.manual_seed(0)
    model = TinyPolicy(VOCAB, HIDDEN).double()
    gen = torch.Generator().manual_seed(3)
    n = sum(LENGTHS)
    prev = torch.randint(0, VOCAB, (n,), generator=gen)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    return model, prev, labels


def _logprobs(model, prev, labels):
    return model.logprobs(prev, labels)


def _inputs(logprobs: torch.Tensor, old: torch.Tensor, rollout: torch.Tensor) -> LossInputs:
    lengths = torch.tensor(LENGTHS)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=old,
        rollout_logprobs=rollout,
        advantages=torch.repeat_interleave(torch.tensor(ADVANTAGE, dtype=torch.float64), lengths),
        loss_mask=torch.ones(len(logprobs), dtype=torch.bool),
        sample_ids=torch.repeat_interleave(torch.arange(len(LENGTHS)), lengths),
        num_samples=len(LENGTHS),
        response_lengths=lengths,
        global_num_samples=len(LENGTHS),
        global_num_tokens=sum(LENGTHS),
    )


def _flat(values):
    return torch.tensor([v for row in values for v in row], dtype=torch.float64)


def test_minirl_gradient_is_the_papers():
    model, prev, labels = _policy_and_tokens()
    logprobs = _logprobs(model, prev, labels)
    old = logprobs.detach() - _flat(RATIO).log()
    rollout = old - _flat(RHO).log()
    logprobs.retain_grad()
    loss = compute_loss(_inputs(logprobs, old, rollout), ObjectiveConfig()).loss
    loss.backward()
    params = list(model.parameters())
    autograd_grads = [p.grad.clone() for p in params]

    # The paper: grad J = sum_t M_t w_t A grad log pi_theta(y_t), w_t = min(rho, C) r_t,
    # averaged over the N responses; the loss is -J.
    expected = [torch.zeros_like(p) for p in params]
    fresh = _logprobs(model, prev, labels)
    t = 0
    for i, length in enumerate(LENGTHS):
        for j in range(length):
            r, rho, adv = RATIO[i][j], RHO[i][j], ADVANTAGE[i]
            clipped = (adv > 0 and r > 1 + 0.27) or (adv < 0 and r < 1 - 0.2)
            assert clipped == ((i, j) in CLIPPED)
            m = 0.0 if clipped else 1.0
            w = min(rho, 5.0) * r
            token_grads = torch.autograd.grad(fresh[t], params, retain_graph=True)
            for e, g in zip(expected, token_grads, strict=True):
                e -= m * w * adv * g / len(LENGTHS)
            t += 1
    for got, want in zip(autograd_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    # The clip mask: d loss / d log pi_theta(y_t) is 0 exactly on the paper's clipped tokens.
    per_token = logprobs.grad.view(-1).tolist()
    t = 0
    for i, length in enumerate(LENGTHS):
        for j in range(length):
            if (i, j) in CLIPPED:
                assert per_token[t] == 0.0, (i, j)
            else:
                assert per_token[t] != 0.0, (i, j)
            t += 1


@pytest.mark.parametrize("pair", [("minirl", "ppo"), ("minirl", "reinforce"), ("minirl", "minirl_no_is")])
def test_on_policy_gradients_agree(pair):
    """pi_theta = pi_old = mu_old: every weight is 1, nothing is clipped."""
    grads = []
    for name in pair:
        model, prev, labels = _policy_and_tokens()
        logprobs = _logprobs(model, prev, labels)
        same = logprobs.detach().clone()
        out = compute_loss(_inputs(logprobs, same, same.clone()), ObjectiveConfig(objective=name))
        out.loss.backward()
        assert out.stats["train/clipfrac"].result() == 0.0
        grads.append([p.grad.clone() for p in model.parameters()])
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_minirl_and_ppo_gradients_agree_off_policy():
    """The decoupled mask is exactly where PPO's min picks the constant branch, so the two
    gradients agree off-policy too (only the loss values differ)."""
    grads, losses = [], []
    for name in ("minirl", "ppo"):
        model, prev, labels = _policy_and_tokens()
        logprobs = _logprobs(model, prev, labels)
        old = logprobs.detach() - _flat(RATIO).log()
        out = compute_loss(_inputs(logprobs, old, old - _flat(RHO).log()),
                           ObjectiveConfig(objective=name))
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert not math.isclose(losses[0], losses[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_kl_and_entropy_gradients_are_the_hand_written_ones():
    """minirl + beta k3 - alpha H on a real model: the parameter gradient equals autograd
    of the loss written out by hand, with the full-vocabulary entropy of the model."""
    beta, alpha = 0.3, 0.05
    model, prev, labels = _policy_and_tokens()
    log_softmax = torch.log_softmax(model(prev), dim=-1)
    logprobs = log_softmax.gather(-1, labels[:, None])[:, 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    old = logprobs.detach() - _flat(RATIO).log()
    rollout = old - _flat(RHO).log()
    ref = logprobs.detach() - 0.3 * torch.linspace(-1, 1, len(logprobs), dtype=torch.float64)
    inputs = dataclasses.replace(_inputs(logprobs, old, rollout), ref_logprobs=ref, entropy=entropy)
    config = ObjectiveConfig(kl_coef=beta, entropy_coef=alpha)
    params = list(model.parameters())
    got = torch.autograd.grad(compute_loss(inputs, config).loss, params)

    log_softmax = torch.log_softmax(model(prev), dim=-1)
    lp = log_softmax.gather(-1, labels[:, None])[:, 0]
    h = -(log_softmax.exp() * log_softmax).sum(-1)
    n = len(LENGTHS)
    loss = lp.new_zeros(())
    t = 0
    for i, length in enumerate(LENGTHS):
        for j in range(length):
            r, rho, adv = RATIO[i][j], RHO[i][j], ADVANTAGE[i]
            m = 0.0 if (i, j) in CLIPPED else 1.0
            d = lp[t] - ref[t]
            loss = loss - m * min(rho, 5.0) * r * adv * lp[t] / n
            loss = loss + beta * (torch.exp(-d) - 1 + d) / n - alpha * h[t] / n
            t += 1
    want = torch.autograd.grad(loss, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in want) > 0
