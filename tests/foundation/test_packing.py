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
    # Routes of another length than the sample's inputs (2 here) name the sample.
    s.routes = torch.zeros(3, 1, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sample 3: routes for 3 input tokens, the sample has 2"):
        split_microbatches([s], 1, route_shape=(1, 2, 8))


def test_too_long_sample_is_an_error():
    s = Sample(tokens=list(range(20)), prompt_len=1, index=0)
    with pytest.raises(ValueError, match="above --seq-length 8"):
        split_microbatches([s], 1, max_length=8)


@pytest.mark.slow
def test_logprobs_do_not_depend_on_padding_packing_or_prompt_sharing(torchrun, tmp_path):
    (result,) = torchrun(WORKERS / "packing_invariance.py", 1, [], tmp_path)
    alone = result["alone"]
    assert len(alone) == 14
    for layout in ("padded", "packed", "shared", "shared_packed"):
        assert result[layout].keys() == alone.keys()
        for key, values in alone.items():
            assert result[layout][key] == pytest.approx(values, abs=2e-5), (layout, key)
    # Sharing the prompts saves positions: fewer than one padded row per sample.
    assert sum(result["rows"]["shared"]) < sum(result["rows"]["padded"])
    # The gradient of the summed log-probs is the same with prompts shared.
    assert result["grad_norm"] > 1.0
    assert result["grad_max_diff"] < 1e-5


def _group(prompt, responses, start=0, routes=False):
    samples = []
    for i, response in enumerate(responses):
        tokens = prompt + response
        r = None
        if routes:  # one route per input; the prompt's the same in every sample
            r = torch.tensor([[[t % 8, (t + 1) % 8]] for t in tokens[:-1]], dtype=torch.uint8)
            r[len(prompt) - 1:] += i
            r %= 8
        samples.append(Sample(tokens=tokens, prompt_len=len(prompt), advantage=float(i),
                              rollout_logprobs=torch.full((len(response),), -float(i + 1)),
                              routes=r, index=start + i))
    return samples


def test_shared_prompt_is_laid_out_once_with_a_block_per_response():
    samples = _group([10, 11, 12], [[20, 21], [30, 31, 32]])
    (batch,), length = split_microbatches(samples, 2, pad_multiple=8, share_prompts=True)
    assert length == 8 and batch.tokens.shape == (1, 8)
    # prefix 10 11 | block 1: 12 20 | block 2: 12 30 31 | padding
    assert batch.tokens[0, :7].tolist() == [10, 11, 12, 20, 12, 30, 31]
    assert batch.labels[0, :7].tolist() == [11, 12, 20, 21, 30, 31, 32]
    assert batch.position_ids[0, :7].tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert batch.loss_mask[0].tolist() == [False, False, True, True, True, True, True, False]
    assert batch.advantages[0, :7].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert batch.rollout_logprobs[0, 2:7].tolist() == [-1, -1, -2, -2, -2]
    assert batch.sample_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert batch.copies[0].tolist() == [2, 2, 1, 1, 1, 1, 1, 0]
    allowed = ~batch.attention_mask[0, 0]
    # The second response sees the prefix and itself, never the first response.
    assert allowed[5].tolist() == [True, True, False, False, True, True, False, False]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False, False]
    # Each sample's inputs, in order, through the shared prefix.
    values = torch.arange(8)[None]
    assert batch.sample_inputs(values, 0).tolist() == [0, 1, 2, 3]
    assert batch.sample_inputs(values, 1).tolist() == [0, 1, 4, 5, 6]


def test_prompt_sharing_changes_nothing_without_groups():
    samples = [Sample(tokens=[1, 2, 3, 4], prompt_len=2, index=0),
               Sample(tokens=[5, 6, 7], prompt_len=2, index=1)]
    (plain,), _ = split_microbatches(samples, 2, pad_multiple=8)
    (shared,), _ = split_microbatches(samples, 2, pad_multiple=8, share_prompts=True)
    for name in ("tokens", "labels", "position_ids", "loss_mask", "sample_ids",
                 "attention_mask"):
        assert torch.equal(getattr(plain, name).expand_as(getattr(shared, name)),
                           getattr(shared, name)), name
    assert shared.input_index is None and shared.copies is None


def test_shared_prompt_routes_and_recorded_routes_come_back_per_sample():
    samples = _group([3, 4, 5], [[6, 7], [1, 2, 3]], routes=True)
    (batch,), _ = split_microbatches(samples, 2, pad_multiple=4, share_prompts=True,
                                     route_shape=(1, 2, 8))
    assert batch.input_index is not None
    for local, sample in enumerate(samples):
        assert torch.equal(batch.sample_inputs(batch.routes, local), sample.routes)


def test_prompts_with_different_routes_or_tokens_are_not_shared():
    a, b = _group([3, 4, 5], [[6], [7]], routes=True)
    b.routes[0, 0, 0] = (int(b.routes[0, 0, 0]) + 1) % 8  # the prefill routed differently
    (batch,), _ = split_microbatches([a, b], 2, pad_multiple=4, share_prompts=True,
                                     route_shape=(1, 2, 8))
    assert batch.input_index is None and batch.tokens.shape == (2, 4)
    c = Sample(tokens=[3, 4, 9, 6], prompt_len=3, index=2)
    d = Sample(tokens=[3, 4, 5, 6], prompt_len=3, index=3)
    (batch,), _ = split_microbatches([c, d], 2, pad_multiple=4, share_prompts=True)
    assert batch.input_index is None


def test_shared_rows_are_cut_at_the_row_length_and_micro_batches_hold_samples():
    group = _group([1, 2, 3, 4], [[5, 6, 7]] * 5)  # a prefix of 3, then 3 per response
    batches, length = split_microbatches(group, 4, max_length=9, share_prompts=True,
                                         pad_multiple=1)
    # 4 samples a micro-batch; rows of at most 9 positions: 3 + 2 x 3 each.
    assert [b.num_samples for b in batches] == [4, 1]
    assert length == 9 and batches[0].tokens.shape == (2, 9) == batches[1].tokens.shape
    assert batches[0].sample_ids.tolist() == [[0] * 6 + [1] * 3, [2] * 6 + [3] * 3]
    assert batches[0].position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    # A micro-batch with fewer rows is padded to the step's shape with empty rows.
    assert (batches[1].sample_ids[1] == -1).all()
