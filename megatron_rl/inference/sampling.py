"""Next-token sampling with SGLang's semantics, reproducible per request.

What SGLang does (``python/sglang/srt/layers/sampler.py``, checked on its main branch):

- ``temperature`` below 1e-5 means greedy: SGLang rewrites it to temperature 1, top-k 1;
- otherwise the logits are divided by the temperature, softmaxed, and top-k / top-p
  truncate the distribution that is sampled from;
- the returned ``output_token_logprobs`` are ``log softmax(logits / temperature)`` -- the
  temperature-scaled distribution BEFORE the top-k / top-p truncation (greedy: ``log
  softmax(logits)``). With ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` SGLang instead returns
  ``log softmax(logits)`` at temperature 1; :func:`sample_next` offers the same switch.

So mu_old from SGLang is comparable to the trainer's log pi only if the trainer scales its
logits by ``1 / temperature`` too (or temperature is 1), and top-k / top-p are off (they
truncate what is sampled without changing the reported logprob).

Reproducibility: each request owns a ``torch.Generator`` seeded with its
``sampling_seed`` and draws exactly one uniform number per generated token, so a request
samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy (SGLang's ``_SAMPLING_EPS``)."""


def effective_params(temperature: float, top_k: int) -> tuple[float, int]:
    """SGLang's normalisation: greedy becomes temperature 1 with top-k 1; ``top_k`` -1 is off."""
    if temperature < GREEDY_EPS:
        return 1.0, 1
    return temperature, top_k


def sample_next(
    logits: torch.Tensor,
    *,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    uniforms: torch.Tensor,
    original_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype; computed in float32).
        temperatures: ``[B]`` effective temperatures (> 0, see :func:`effective_params`).
        top_ks: ``[B]`` int64, ``<= 0`` for no top-k truncation.
        top_ps: ``[B]`` in (0, 1].
        uniforms: ``[B]`` one U[0, 1) draw per row from the row's own generator.
        original_logprobs: report ``log softmax(logits)`` instead of the temperature-scaled
            distribution (SGLANG_RETURN_ORIGINAL_LOGPROB).

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``.
    """
    logits = logits.float()
    scaled = logits / temperatures[:, None]
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    probs = logprobs_all.exp()

    # Truncate in descending-probability order; ties keep their index order so the
    # result does not depend on the sort's treatment of equal values.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1])[None, :]
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    keep &= (top_ks[:, None] <= 0) | (rank < top_ks[:, None])
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= mass_before < top_ps[:, None]
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))

    # Inverse-CDF sampling with the row's uniform draw.
    cdf = kept.cumsum(dim=-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    position = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # Never land on a truncated token (possible only through rounding at the top end).
    position = torch.minimum(position, keep.sum(dim=-1, keepdim=True) - 1)
    tokens = order.gather(-1, position).squeeze(-1)

    reported = torch.log_softmax(logits, dim=-1) if original_logprobs else logprobs_all
    return tokens, reported.gather(-1, tokens[:, None]).squeeze(-1)


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log softmax(logits / temperature)[targets]`` in float32 (``[..., V]`` -> ``[...]``)."""
    scaled = logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
