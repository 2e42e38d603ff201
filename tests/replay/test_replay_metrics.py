"""Agreement and fidelity counters: set semantics, padding excluded, exact reduction."""

from __future__ import annotations

import torch

from megatron_rl.metrics.stats import merge_stats
from megatron_rl.replay.metrics import (
    AGREEMENT,
    RouterMetrics,
    expert_map,
    same_sets,
    used_exactly,
)


def test_same_sets_ignores_order():
    given = expert_map(torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6]]), 8)
    own = torch.tensor([[3, 1, 2], [1, 2, 4], [6, 5, 4]])
    assert same_sets(given, own).tolist() == [True, False, True]


def test_used_exactly_needs_all_and_only_the_target():
    target = expert_map(torch.tensor([[0, 2], [1, 3], [0, 1]]), 4)
    routing_map = torch.zeros(3, 4, dtype=torch.bool)
    routing_map[0, [0, 2]] = True  # exact
    routing_map[1, [1]] = True  # one missing
    routing_map[2, [0, 1, 3]] = True  # one extra
    assert used_exactly(routing_map, target).tolist() == [True, False, False]


def test_counts_skip_padding_and_merge_exactly():
    gen = torch.Generator().manual_seed(0)
    own = torch.rand(40, 8, generator=gen).argsort(-1)[:, :2]
    given = own.clone()
    for row in range(0, 40, 3):  # every third token: one expert the router did not pick
        given[row, 0] = next(e for e in range(8) if e not in own[row].tolist())
    mask = torch.ones(40, dtype=torch.bool)
    mask[-7:] = False  # padding
    hits = same_sets(expert_map(given, 8), own)
    whole = RouterMetrics()
    whole.add(AGREEMENT, 3, hits, mask, mask.sum())
    pieces = []
    for part in (slice(0, 13), slice(13, 40)):
        m = RouterMetrics()
        m.add(AGREEMENT, 3, hits[part], mask[part], mask[part].sum())
        pieces.append(m.take())
    stats = whole.take()
    assert stats[AGREEMENT].count == 33
    expected = (33 - len(range(0, 33, 3))) / 33  # disagreeing rows among the real tokens
    assert stats[f"{AGREEMENT}/layer_3"].result() == expected < 1
    assert merge_stats(pieces)[AGREEMENT].value == stats[AGREEMENT].value
    assert whole.take() == {}  # take() resets
