"""Rotary embeddings at the micro-batch's own position ids (for prompt sharing).

megatron-core's ``GPTModel`` rotates queries and keys by their index in the row
(``RotaryEmbedding(seq_len)`` builds positions 0..S-1) and ignores ``position_ids``.
For one sample per row, or samples packed end to end under a block-diagonal mask, that
is exact: RoPE scores depend only on the distance between two positions, and every
sample's tokens are contiguous. A prompt shared by several responses
(``data.packing``, ``share_prompts``) is not: a response's block sits after the blocks
of the responses before it, so its distance to the prompt in the row is not its distance
in the sample.

:class:`PositionedRotaryEmbedding` is megatron-core's ``RotaryEmbedding`` (same
frequencies, same layout of the embedding) that, inside :func:`rotary_positions`, builds
the embedding from the given ``[B, S]`` positions instead: ``[S, B, 1, dim]``, which
megatron's rotary application broadcasts over heads as it does the ``[S, 1, 1, dim]``
default. Outside that context it is the parent class, bit for bit. The trainer's forward
step enters the context only for micro-batches laid out with shared prompts (which run
without context parallelism, whose per-rank slicing of the embedding this does not
do). :func:`use_position_ids` switches a built model's rotary module to this class (no
state of its own: checkpoints are unchanged).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

_positions: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "megatron_rl_rotary_positions", default=None)


class PositionedRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding that uses the positions of :func:`rotary_positions` when set."""

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        positions = _positions.get()
        if positions is None:
            return super().forward(max_seq_len, *args, **kwargs)
        if positions.dim() != 2 or positions.shape[1] != max_seq_len:
            raise ValueError(f"rotary positions {tuple(positions.shape)} do not match the "
                             f"sequence length {max_seq_len} of the forward")
        if self.inv_freq.device.type == "cpu" and torch.cuda.is_available():
            # As RotaryEmbedding.get_emb: the frequencies move to the GPU at first use.
            self.inv_freq = self.inv_freq.to(device=torch.cuda.current_device())
        # As RotaryEmbedding.get_freqs_non_repeated, per (token, row): position x inv_freq.
        seq = positions.t().to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = seq[..., None] * self.inv_freq  # [S, B, dim / 2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return emb[:, :, None, :]


def use_position_ids(model: torch.nn.Module) -> None:
    """Make ``model``'s rotary embedding (every GPTModel chunk has its own) a
    :class:`PositionedRotaryEmbedding`; a no-op for a model without one."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    if type(rotary) is not RotaryEmbedding:
        raise TypeError(f"rotary positions: {type(rotary).__name__} is not megatron-core's "
                        "RotaryEmbedding")
    rotary.__class__ = PositionedRotaryEmbedding


@contextlib.contextmanager
def rotary_positions(positions: torch.Tensor | None) -> Iterator[None]:
    """Rotate by ``positions`` (``[B, S]``) in the forwards inside; None: by row index."""
    token = _positions.set(positions)
    try:
        yield
    finally:
        _positions.reset(token)
