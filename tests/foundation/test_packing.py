"""Micro-batch layout: alignment of labels and masks, and invariance of the model's
log-probs to padding and sequence packing."""

import pytest
import torch
from torchrun_launch import WORKERS

from megatron_rl.data.packing import Sample, split_microbatches
from megatron_rl.data.routes import padding_routes


def test_alignment_of_inputs_labels_and_masks():
    s = Sample(tokens=[10, 11, 12, 13, 14], prompt_len=2, advantage=0.5,
               old_logprobs=torch.tensor([-1.0, -2.0, -3.0]),
               rollout_logprobs=torch.tensor([-1.5, -2.5, -3.5]), index=7)
    (batch,), length = split_microbatches([s], 1, pad_multiple=8)
    assert length == 8
    assert batch.tokens[0, :4].tolist() == [10, 11, 12, 13]
    assert batch.labels[0, :4].tolist() == [11, 12, 13, 14]
    # Response tokens 12, 13, 14 are predicted at input positions 1, 2, 3.
    assert batch.loss_mask[0].tolist() == [False, True, True, True] + [False] * 4
    assert batch.old_logprobs[0, 1:4].tolist() == [-1.0, -2.0, -3.0]
    assert batch.rollout_logprobs[0, 1:4].tolist() == [-1.5, -2.5, -3.5]
    assert batch.advantages[0, 1:4].tolist() == [0.5] * 3
    assert batch.sample_ids[0].tolist() == [0, 0, 0, 0] + [-1] * 4
    assert batch.sample_index == [7]
    assert batch.response_lengths.tolist() == [3]


def test_packing_masks_block_diagonal_and_restarts_positions():
    a = Sample(tokens=[1, 2, 3], prompt_len=1, index=0)
    b = Sample(tokens=[4, 5, 6, 7], prompt_len=2, index=1)
    (batch,), _ = split_microbatches([a, b], 1, pack=True, max_length=6)
    assert batch.tokens.shape == (1, 6)
    assert batch.position_ids[0].tolist() == [0, 1, 0, 1, 2, 0]
    allowed = ~batch.attention_mask[0, 0]
    # Token 3 (first of b) attends only to itself, not to a.
    assert allowed[2].tolist() == [False, False, True, False, False, False]
    assert allowed[4].tolist() == [False, False, True, True, True, False]


def test_routes_follow_tokens_and_padding_gets_spread_routes():
    routes = torch.tensor([[[1, 2]], [[3, 4]]], dtype=torch.uint8)  # 2 inputs, 1 layer, top-2
    s = Sample(tokens=[5, 6, 7], prompt_len=1, routes=routes, index=0)
    (batch,), _ = split_microbatches([s], 2, pad_multiple=4, route_shape=(1, 2, 8))
    assert batch.routes.shape == (2, 4, 1, 2)
    assert torch.equal(batch.routes[0, :2], routes)
    pad = batch.routes[batch.sample_ids < 0].reshape(-1, 2)
    assert (pad[:, 0] != pad[:, 1]).all()
    # Padding routes cycle through all experts instead of piling onto expert 0.
    counts = torch.bincount(padding_routes(32, 1, 2, 8).flatten().long(), minlength=8)
    assert counts.min() == counts.max()


def test_missing_routes_are_an_error():
    s = Sample(tokens=[5, 6, 7], prompt_len=1, index=3)
    with pytest.raises(ValueError, match="sample 3 has no routes"):
        split_microbatches([s], 1, route_shape=(1, 2, 8))


def test_too_long_sample_is_an_error():
    s = Sample(tokens=list(range(20)), prompt_len=1, index=0)
    with pytest.raises(ValueError, match="above --seq-length 8"):
        split_microbatches([s], 1, max_length=8)


@pytest.mark.slow
def test_logprobs_do_not_depend_on_padding_or_packing(torchrun, tmp_path):
    (result,) = torchrun(WORKERS / "packing_invariance.py", 1, [], tmp_path)
    alone = result["alone"]
    assert len(alone) == 6
    for layout in ("padded", "packed"):
        assert result[layout].keys() == alone.keys()
        for key, values in alone.items():
            assert result[layout][key] == pytest.approx(values, abs=2e-5), (layout, key)
