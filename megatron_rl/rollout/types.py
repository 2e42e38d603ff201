"""The records of rollout: a response to generate, and the generated response as it travels
from rollout to the loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(kw_only=True)
class RolloutRequest:
    """One response to generate: which prompt, which sample of its group, the prompt ids."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task data, copied into the sample."""


@dataclass(kw_only=True)
class RolloutSample:
    """One response to one prompt, with what the inference engine knew when it made it."""

    prompt_index: int
    """Index of the prompt within its rollout batch."""
    sample_index: int
    """Index of this response within the prompt's group (0 .. G-1)."""
    prompt_ids: list[int]
    """Prompt token ids."""
    response_ids: list[int]
    """Generated token ids (including a stop token if one ended the response)."""
    rollout_logprobs: torch.Tensor
    """mu_old: the inference engine's log-probability of each generated token, float32 [R]."""
    routes: torch.Tensor | None = None
    """Experts the inference engine routed each token to, compact integer dtype,
    ``[len(prompt) + len(response) - 1, moe_layers, topk]`` (see data.routes); None
    unless routed experts were requested."""
    loss_mask: torch.Tensor | None = None
    """bool [R]: which response tokens are trained on (multi-turn rollouts: the model's
    own tokens, not tool output); None: all of them."""
    finish_reason: str = "length"
    """'stop', 'length' or 'abort', as the server reported it."""
    weight_version: str | None = None
    """Version of the weights that generated the response."""
    prompt_tokens: int = 0
    """Prompt length the server reports."""
    completion_tokens: int = 0
    """Response length the server reports."""
    latency_s: float = 0.0
    """Seconds from sending the request to receiving the response."""
    server_url: str = ""
    """Server that generated the response."""
    request_id: str = ""
    """Request id sent to the server (unique per sample and rollout)."""
    reward: float | None = None
    """Sequence-level reward R(x, y), filled by the reward step."""
    advantage: float | None = None
    """A(x, y), filled by the advantage step from the group's rewards."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task data: reference answer, scorer inputs, parse failures."""

    @property
    def num_tokens(self) -> int:
        """Tokens the trainer feeds to score the response: prompt + response - 1."""
        return len(self.prompt_ids) + len(self.response_ids) - 1
