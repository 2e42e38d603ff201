"""Training-inference corrections: how the ratio pi_old/mu_old weighs each token.

The inference engine (mu_old) and the training engine (pi_old) disagree even with the
same weights (kernels, precision, MoE routing). Objectives that correct for it multiply
each token's term by a detached weight built from rho = pi_old/mu_old:

- ``none``:   1
- ``tis``:    min(rho, C)                       (truncated IS, C = --rl-is-cap)
- ``mis``:    rho if C_low <= rho <= C_high else 0   (masked IS)
- ``icepop``: rho if alpha <= rho <= beta else 0     (IcePop)

At ``sequence`` level rho is the whole response's ratio prod_t pi_old/mu_old (summed in
log space across context-parallel chunks) and every token of the response gets its
weight. Everything is computed in log space so that long responses neither overflow
nor underflow before the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rl.loss.config import Correction, ObjectiveConfig
from megatron_rl.loss.stat_collector import StatCollector
from megatron_rl.loss.tokens import Tokens
from megatron_rl.loss.types import SeqSum


@dataclass
class CorrectionWeights:
    weight: torch.Tensor
    """[T] detached weight of each token (0 where masked out or rejected)."""
    log_weight: torch.Tensor
    """[T] log of ``weight`` (-inf where the weight is 0)."""


def log_ratio(tokens: Tokens, level: str, seq_sum: SeqSum | None) -> torch.Tensor:
    """[T] log pi_old/mu_old of each token, or of its whole response at sequence level."""
    token_log_ratio = tokens.old - tokens.rollout
    if level == "token":
        return token_log_ratio
    return tokens.per_token(tokens.sequence_sum(token_log_ratio, seq_sum))


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def correction_weights(
    tokens: Tokens,
    config: ObjectiveConfig,
    kind: Correction,
    stats: StatCollector,
    *,
    seq_sum: SeqSum | None = None,
) -> CorrectionWeights:
    """Weights of ``kind`` for the piece; adds ``mismatch/correction_*`` statistics."""
    mask = tokens.mask
    no = torch.zeros_like(mask)
    if kind == "none":
        log_w = torch.zeros_like(tokens.old)
        truncated = rejected = no
    else:
        log_rho = log_ratio(tokens, config.correction_level, seq_sum)
        if kind == "tis":
            rejected = no
            if config.is_cap is None:
                log_w, truncated = log_rho, no
            else:
                log_cap = math.log(config.is_cap)
                truncated = mask & (log_rho > log_cap)
                log_w = log_rho.clamp(max=log_cap)
        elif kind in ("mis", "icepop"):
            low, high = (
                (config.mis_low, config.mis_high)
                if kind == "mis"
                else (config.icepop_alpha, config.icepop_beta)
            )
            keep = (log_rho >= _log(low)) & (log_rho <= _log(high))
            rejected = mask & ~keep
            truncated = no
            log_w = torch.where(keep, log_rho, torch.full_like(log_rho, -math.inf))
        else:
            raise ValueError(f"unknown training-inference correction {kind!r}")
    log_w = torch.where(mask, log_w, torch.full_like(log_w, -math.inf))
    weight = log_w.exp()
    stats.mean("mismatch/correction_masked_frac", rejected, mask)
    stats.mean("mismatch/correction_truncated_frac", truncated, mask)
    stats.mean("mismatch/correction_weight_mean", weight, mask)
    return CorrectionWeights(weight=weight, log_weight=log_w)
