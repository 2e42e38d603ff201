"""The reference KL and entropy terms that ``compute_loss`` adds to any objective.

    loss = objective + kl_coef x agg(k_t) - entropy_coef x agg(H_t)

with ``k_t`` the per-token estimate of KL(pi_theta || pi_ref) at the sampled token,
``d_t = log pi_theta(y_t) - log pi_ref(y_t)``:

    k1 = d_t                      d k1 / d log pi_theta = 1
    k2 = d_t^2 / 2                d k2 / d log pi_theta = d_t
    k3 = exp(-d_t) - 1 + d_t      d k3 / d log pi_theta = 1 - exp(-d_t)

(Schulman's estimators, used without an importance weight as GRPO and verl do: the tokens
were sampled by mu_old, not pi_theta), ``H_t`` the entropy of pi_theta over the vocabulary
at the token's position, and ``agg`` the objective's own reduction
(``ObjectiveConfig.aggregation_in_force``): ``sum`` = (1/N) sum_i sum_t,
``length_norm`` = (1/N) sum_i (1/|y_i|) sum_t, ``token_mean`` = (1/T_all) sum_i sum_t.
Every denominator is global, so pieces add up exactly like the objective's.
"""

from __future__ import annotations

import torch

from megatron_rl.loss.config import Aggregation, KLEstimator, ObjectiveConfig
from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.loss.tokens import Tokens
from megatron_rl.loss.types import LossInputs


def kl_estimate(log_ratio: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """``[T]`` per-token KL estimate from ``log_ratio`` = log pi_theta - log pi_ref
    (differentiable in it)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        # expm1 keeps k3 accurate (and >= 0) where pi_theta and pi_ref nearly agree.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def aggregate(terms: torch.Tensor, tokens: Tokens, inputs: LossInputs,
              how: Aggregation) -> torch.Tensor:
    """This piece's share of the mini-batch reduction of the ``[T]`` token ``terms``."""
    terms = torch.where(tokens.mask, terms, torch.zeros_like(terms))
    if how == "sum":
        return terms.sum() / inputs.global_num_samples
    if how == "length_norm":
        return (terms / tokens.lengths).sum() / inputs.global_num_samples
    if how == "token_mean":
        return terms.sum() / inputs.global_num_tokens
    raise ValueError(f"unknown aggregation {how!r}")


def regularization(inputs: LossInputs, tokens: Tokens, config: ObjectiveConfig,
                   stats: StatCollector) -> torch.Tensor | None:
    """kl_coef x agg(k) - entropy_coef x agg(H) for this piece (None when both are off),
    and ``train/kl_ref`` (mean k over tokens) in ``stats``. The inputs were checked by
    ``validate_inputs``."""
    how = config.aggregation_in_force()
    total = None
    if config.kl_coef > 0:
        if tokens.ref is None:
            raise ValueError("--rl-kl-coef > 0 but the loss inputs carry no ref_logprobs")
        k = kl_estimate(tokens.logprobs - tokens.ref, config.kl_estimator)
        stats.mean("train/kl_ref", k, tokens.mask)
        total = config.kl_coef * aggregate(k, tokens, inputs, how)
    if config.entropy_coef > 0:
        if tokens.entropy is None:
            raise ValueError("--rl-entropy-coef > 0 but the loss inputs carry no entropy")
        bonus = -config.entropy_coef * aggregate(tokens.entropy, tokens, inputs, how)
        total = bonus if total is None else total + bonus
    return total
