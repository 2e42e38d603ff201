"""The RL objectives, as pure functions of a piece's tensors, and their registry.

Notation (README.md, section "Objectives", has every formula): r_t = pi_theta/pi_old of token t,
c_t the training-inference correction weight (corrections.py), A_t the advantage,
|y| the full response length, N the mini-batch's responses, T_all its tokens. Every
objective returns -J for its piece, already divided by N or T_all, so the mini-batch
loss is the sum of the pieces' losses.
"""

from __future__ import annotations

import functools
import logging

import torch

from megatron_rl.config.import_path import load_callable
from megatron_rl.loss.config import ObjectiveConfig, is_import_path
from megatron_rl.loss.corrections import CorrectionWeights, correction_weights
from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.loss.tokens import Tokens, prepare
from megatron_rl.loss.types import LossInputs, LossOutput, Objective, SeqSum

logger = logging.getLogger(__name__)


def _clip_stats(
    stats: StatCollector, tokens: Tokens, low: torch.Tensor, high: torch.Tensor
) -> None:
    stats.mean("train/clipfrac", low | high, tokens.mask)
    stats.mean("train/clipfrac_low", low, tokens.mask)
    stats.mean("train/clipfrac_high", high, tokens.mask)


def decoupled_clip(
    ratio: torch.Tensor, tokens: Tokens, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's clipping: tokens whose update already went far enough in the
    direction the advantage pushes. Returns (low, high) bool masks; M_t = ~(low | high)."""
    adv = tokens.advantages
    low = tokens.mask & (adv < 0) & (ratio < 1 - eps_low)
    high = tokens.mask & (adv > 0) & (ratio > 1 + eps_high)
    return low, high


def _setup(
    inputs: LossInputs, config: ObjectiveConfig, name: str, seq_sum: SeqSum | None
) -> tuple[Tokens, StatCollector, CorrectionWeights]:
    tokens = prepare(inputs)
    stats = StatCollector()
    kind = config.correction_in_force(name)
    correction = correction_weights(tokens, config, kind, stats, seq_sum=seq_sum)
    return tokens, stats, correction


def _masked(tokens: Tokens, terms: torch.Tensor) -> torch.Tensor:
    return torch.where(tokens.mask, terms, torch.zeros_like(terms))


def _minirl(
    inputs: LossInputs,
    config: ObjectiveConfig,
    seq_sum: SeqSum | None,
    *,
    name: str,
    length_normalized: bool,
) -> LossOutput:
    tokens, stats, correction = _setup(inputs, config, name, seq_sum)
    log_r = tokens.logprobs.detach() - tokens.old
    low, high = decoupled_clip(log_r.exp(), tokens, config.clip_low, config.clip_high)
    # sg[pi_theta/mu_old] = c_t * r_t, formed in log space so that a rejected token
    # (c_t = 0) stays exactly 0 even if r_t overflows.
    weight = (correction.log_weight + log_r).exp()
    coefficient = torch.where(low | high, torch.zeros_like(weight), weight * tokens.advantages)
    terms = _masked(tokens, -coefficient * tokens.logprobs)
    if length_normalized:
        terms = terms / tokens.lengths
    _clip_stats(stats, tokens, low, high)
    return LossOutput(terms.sum() / inputs.global_num_samples, stats.stats())


def minirl(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """The paper's Eq. 7: -(1/N) sum_i sum_t M_t sg[c_t r_t] A_t log pi_theta(y_t)."""
    return _minirl(inputs, config, seq_sum, name="minirl", length_normalized=False)


def minirl_no_is(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """MiniRL without the training-inference weight (c_t = 1): the paper's ablation."""
    return _minirl(inputs, config, seq_sum, name="minirl_no_is", length_normalized=False)


def minirl_length_norm(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """MiniRL with each response's token sum divided by |y|: the paper's ablation."""
    return _minirl(inputs, config, seq_sum, name="minirl_length_norm", length_normalized=True)


def _clipped_surrogate(
    inputs: LossInputs,
    config: ObjectiveConfig,
    seq_sum: SeqSum | None,
    *,
    name: str,
    eps_low: float,
    eps_high: float,
    length_normalized: bool,
) -> LossOutput:
    tokens, stats, correction = _setup(inputs, config, name, seq_sum)
    ratio = (tokens.logprobs - tokens.old).exp()
    adv = tokens.advantages
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    terms = _masked(tokens, -correction.weight * surrogate)
    if length_normalized:
        terms = terms / tokens.lengths
    _clip_stats(stats, tokens, *decoupled_clip(ratio.detach(), tokens, eps_low, eps_high))
    return LossOutput(terms.sum() / inputs.global_num_samples, stats.stats())


def ppo(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """Decoupled PPO: -(1/N) sum_i sum_t c_t min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A)."""
    return _clipped_surrogate(
        inputs,
        config,
        seq_sum,
        name="ppo",
        eps_low=config.clip_low,
        eps_high=config.clip_high,
        length_normalized=False,
    )


def grpo(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """GRPO: -(1/N) sum_i (1/|y_i|) sum_t min(r_t A, clip(r_t, 1-eps, 1+eps) A)."""
    return _clipped_surrogate(
        inputs,
        config,
        seq_sum,
        name="grpo",
        eps_low=config.grpo_clip,
        eps_high=config.grpo_clip,
        length_normalized=True,
    )


def gspo(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """GSPO: -(1/N) sum_i min(s_i A, clip(s_i) A), s_i = (pi_theta(y)/pi_old(y))^(1/|y|).

    Written in GSPO's token form: token t carries s_i's value with the gradient of its
    own log-probability, s_i * grad log pi_theta(y_t), averaged over the |y| tokens.
    That equals the sequence form's gradient, keeps every term local to the token's
    piece (exact under context parallelism), and lets a token-level correction weigh
    each token."""
    tokens, stats, correction = _setup(inputs, config, "gspo", seq_sum)
    log_r = tokens.logprobs.detach() - tokens.old
    log_s = tokens.sequence_sum(log_r, seq_sum) / inputs.response_lengths.to(log_r)
    log_s_token = tokens.per_token(log_s)
    s = (log_s_token + tokens.logprobs - tokens.logprobs.detach()).exp()
    low_eps, high_eps = config.gspo_clip_low, config.gspo_clip_high
    adv = tokens.advantages
    surrogate = torch.minimum(s * adv, s.clamp(1 - low_eps, 1 + high_eps) * adv)
    terms = _masked(tokens, -correction.weight * surrogate) / tokens.lengths
    _clip_stats(stats, tokens, *decoupled_clip(log_s_token.exp(), tokens, low_eps, high_eps))
    return LossOutput(terms.sum() / inputs.global_num_samples, stats.stats())


def cispo(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """CISPO: -(1/T_all) sum_i sum_t c_t sg[clip(r_t, 1-eps_low, 1+eps_high)] A log pi_theta."""
    tokens, stats, correction = _setup(inputs, config, "cispo", seq_sum)
    ratio = (tokens.logprobs.detach() - tokens.old).exp()
    lower = None if config.cispo_clip_low is None else 1 - config.cispo_clip_low
    upper = 1 + config.cispo_clip_high
    clipped = ratio.clamp(min=lower, max=upper)
    terms = _masked(tokens, -correction.weight * clipped * tokens.advantages * tokens.logprobs)
    # CISPO never zeroes a token; its clip fractions count the weights that were clipped.
    low = tokens.mask & (ratio < lower) if lower is not None else torch.zeros_like(tokens.mask)
    _clip_stats(stats, tokens, low, tokens.mask & (ratio > upper))
    return LossOutput(terms.sum() / inputs.global_num_tokens, stats.stats())


def reinforce(
    inputs: LossInputs, config: ObjectiveConfig, *, seq_sum: SeqSum | None = None
) -> LossOutput:
    """REINFORCE: -(1/N) sum_i sum_t c_t A log pi_theta(y_t) (c_t = 1 unless a correction
    is asked for); no clipping, no pi_theta/pi_old ratio."""
    tokens, stats, correction = _setup(inputs, config, "reinforce", seq_sum)
    terms = _masked(tokens, -correction.weight * tokens.advantages * tokens.logprobs)
    nothing = torch.zeros_like(tokens.mask)
    _clip_stats(stats, tokens, nothing, nothing)
    return LossOutput(terms.sum() / inputs.global_num_samples, stats.stats())


@functools.cache
def _user_objective(path: str) -> Objective:
    # Cached: the loss calls get_objective on every micro-batch.
    objective = load_callable(path, what="objective")
    logger.info("using user objective %s", path)
    return objective


OBJECTIVES: dict[str, Objective] = {
    "minirl": minirl,
    "minirl_no_is": minirl_no_is,
    "minirl_length_norm": minirl_length_norm,
    "grpo": grpo,
    "gspo": gspo,
    "cispo": cispo,
    "ppo": ppo,
    "reinforce": reinforce,
}


def get_objective(name: str) -> Objective:
    """A built-in objective by flag name, or a user's ``package.module:function``."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if is_import_path(name):
        return _user_objective(name)
    raise ValueError(
        f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)} "
        f"or give 'package.module:function'"
    )
