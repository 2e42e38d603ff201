"""Statistics shared by every objective: training-inference mismatch, staleness, entropy.

Each is a per-token mean or extreme over the masked tokens, so it reduces exactly over
pieces and ranks. Quantities that are not means of token values (effective sample size,
standard deviations) are derived after the reduction by :func:`derived_metrics` from
means that are.
"""

from __future__ import annotations

import math

import torch

from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.loss.tokens import Tokens

# name -> definition; README.md ("Objectives", "Metrics") carries the same table (a test keeps them equal).
METRICS: dict[str, str] = {
    "train/loss": "the loss minimised (-J, plus the KL and entropy terms when on), summed over the pieces of a mini-batch; averaged over mini-batches",
    "train/clipfrac": "fraction of tokens clipped (train/clipfrac_low + train/clipfrac_high)",
    "train/clipfrac_low": "fraction of tokens clipped on the low side (A < 0 and ratio < 1 - eps_low; cispo: weight raised to 1 - eps_low)",
    "train/clipfrac_high": "fraction of tokens clipped on the high side (A > 0 and ratio > 1 + eps_high; cispo: weight lowered to 1 + eps_high)",
    "train/staleness_kl": "policy staleness E[log pi_old - log pi_theta] over tokens",
    "train/entropy": "mean token entropy of pi_theta (only when the forward step supplies it)",
    "train/kl_ref": "KL(pi_theta || pi_ref) to the frozen reference policy: mean over tokens of the --rl-kl-estimator value (only with --rl-kl-coef > 0)",
    "train/objective_loss": "the objective's own loss, without the KL and entropy terms that train/loss includes (only with --rl-kl-coef or --rl-entropy-coef > 0)",
    "mismatch/kl": "training-inference KL(mu_old || pi_old) estimated as E[log mu_old - log pi_old] over tokens",
    "mismatch/kl_k3": "the same KL with the k3 estimator E[rho - 1 - log rho], rho = pi_old/mu_old",
    "mismatch/abs_logratio_mean": "E|log pi_old - log mu_old| over tokens",
    "mismatch/abs_logratio_max": "max |log pi_old - log mu_old| over tokens",
    "mismatch/is_weight_mean": "mean of the raw token ratio rho = pi_old/mu_old (before any correction)",
    "mismatch/is_weight_min": "min of rho",
    "mismatch/is_weight_max": "max of rho",
    "mismatch/is_weight_sq_mean": "mean of rho^2 (input of mismatch/ess)",
    "mismatch/ess": "normalised effective sample size of rho, E[rho]^2 / E[rho^2] in (0, 1] (derived)",
    "mismatch/correction_weight_mean": "mean of the correction weight c_t actually applied (1 for none)",
    "mismatch/correction_masked_frac": "fraction of tokens given weight 0 by mis / icepop (at sequence level: tokens of rejected responses)",
    "mismatch/correction_truncated_frac": "fraction of tokens whose weight tis truncated at C",
    "rollout/reward_mean": "mean reward over responses",
    "rollout/reward_sq_mean": "mean squared reward (input of rollout/reward_std)",
    "rollout/reward_std": "population standard deviation of the rewards over responses (derived)",
    "rollout/zero_adv_group_frac": "fraction of groups whose advantages are all zero (no learning signal)",
    "rollout/response_length_mean": "mean response length in tokens",
    "rollout/response_length_max": "longest response in tokens",
}


def mismatch_stats(tokens: Tokens, stats: StatCollector) -> None:
    """Training-inference discrepancy between pi_old and mu_old."""
    mask = tokens.mask
    log_rho = tokens.old - tokens.rollout
    rho = log_rho.exp()
    stats.mean("mismatch/kl", -log_rho, mask)
    stats.mean("mismatch/kl_k3", rho - 1 - log_rho, mask)
    stats.mean("mismatch/abs_logratio_mean", log_rho.abs(), mask)
    stats.extreme("mismatch/abs_logratio_max", log_rho.abs(), mask, "max")
    stats.mean("mismatch/is_weight_mean", rho, mask)
    stats.mean("mismatch/is_weight_sq_mean", rho * rho, mask)
    stats.extreme("mismatch/is_weight_min", rho, mask, "min")
    stats.extreme("mismatch/is_weight_max", rho, mask, "max")


def policy_stats(tokens: Tokens, entropy: torch.Tensor | None, stats: StatCollector) -> None:
    """Staleness of pi_old relative to the policy being updated, and its entropy."""
    stats.mean("train/staleness_kl", tokens.old - tokens.logprobs.detach(), tokens.mask)
    if entropy is not None:
        stats.mean("train/entropy", entropy.detach(), tokens.mask)


def derived_metrics(results: dict[str, float]) -> dict[str, float]:
    """Metrics computed from already reduced results (``metrics.stats.results``).

    Returns only the derived entries: ``mismatch/ess`` and ``rollout/reward_std``, each
    when its inputs are present."""
    derived: dict[str, float] = {}
    mean, sq = results.get("mismatch/is_weight_mean"), results.get("mismatch/is_weight_sq_mean")
    if mean is not None and sq is not None:
        derived["mismatch/ess"] = mean * mean / sq if sq > 0 else math.nan
    mean, sq = results.get("rollout/reward_mean"), results.get("rollout/reward_sq_mean")
    if mean is not None and sq is not None:
        derived["rollout/reward_std"] = math.sqrt(max(sq - mean * mean, 0.0))
    return derived
