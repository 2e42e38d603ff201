"""Rotary embeddings at given position ids (model.rope_positions), for shared prompts."""

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_rl.model.rope_positions import (
    PositionedRotaryEmbedding,
    rotary_positions,
    use_position_ids,
)


# megatron's RotaryEmbedding moves its frequencies to "the" CUDA device: the tests run
# under the CPU adaptation (the `adapted` fixture of conftest.py).
def _rotary(**kwargs):
    return RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True, **kwargs)


def _positioned(**kwargs):
    """A module holding a rotary embedding, as GPTModel does, switched to position ids."""
    holder = torch.nn.Module()
    holder.rotary_pos_emb = _rotary(**kwargs)
    use_position_ids(holder)
    return holder.rotary_pos_emb


@pytest.mark.parametrize("interleaved", [False, True])
def test_positions_pick_the_rows_of_the_default_embedding(adapted, interleaved):
    reference = _rotary(rotary_interleaved=interleaved)
    default = reference(12)  # [12, 1, 1, 32]: positions 0..11
    positioned = _positioned(rotary_interleaved=interleaved)
    assert type(positioned) is PositionedRotaryEmbedding
    # Outside the context it is the parent class, bit for bit.
    assert torch.equal(positioned(12), default)
    positions = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 0, 0, 0, 0, 0],
                              [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    with rotary_positions(positions):
        emb = positioned(12)
    assert emb.shape == (12, 2, 1, 32)
    for b in range(2):
        assert torch.equal(emb[:, b], default[positions[b], 0])
    assert torch.equal(positioned(12), default)  # the context is gone


def test_positions_must_match_the_sequence(adapted):
    positioned = _positioned()
    with rotary_positions(torch.zeros(1, 5, dtype=torch.long)), \
            pytest.raises(ValueError, match=r"rotary positions \(1, 5\) do not match .* 6"):
        positioned(6)
