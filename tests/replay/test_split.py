"""Routes are cut exactly like tokens: stage layers (against megatron's layer offsets),
context-parallel chunks (against megatron's own get_batch_on_this_cp_rank), sequence
parallel slices and the router's token order, packing and padding."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.data.packing import Sample, split_microbatches
from megatron_rl.data.routes import compact, padding_routes
from megatron_rl.parallel_layout import (
    cp_positions,
    from_router_order,
    moe_layers,
    pipeline_layers,
    router_order,
    sp_share,
    split_for_cp,
    stage_moe_positions,
)
from megatron_rl.replay.split import (
    rank_share_of_microbatch,
    rank_share_of_sample,
    routes_by_sample,
)

E, K, LAYERS = 16, 4, 3


def samples(count: int = 5, seed: int = 0) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt, response = int(torch.randint(3, 9, (1,), generator=gen)), int(
            torch.randint(2, 7, (1,), generator=gen))
        routes = torch.rand(prompt + response - 1, LAYERS, E, generator=gen).argsort(-1)[..., :K]
        tokens = torch.randint(4, 100, (prompt + response,), generator=gen).tolist()
        out.append(Sample(tokens=tokens, prompt_len=prompt, index=i, routes=compact(routes, E)))
    return out


@pytest.mark.parametrize("num_layers, pattern, pp, vpp", [
    (4, "[0,1,1,1]", 2, None),
    (4, "[0,1,1,1]", 2, 1),
    (8, "[0,1,1,0,1,1,1,1]", 2, 2),
    (8, "[1,1,1,1,1,1,1,1]", 4, 1),
])
def test_pipeline_layers_match_megatron(num_layers, pattern, pp, vpp):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_rl.distributed import ParallelConfig
    from megatron_rl.model.config import PRESETS
    from megatron_rl.model.provider import transformer_config

    model = PRESETS["tiny"].replace(num_layers=num_layers, moe_layer_freq=pattern)
    config = transformer_config(model, ParallelConfig(
        pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=vpp), use_te=False)
    assert moe_layers(config) == moe_layers(model) == model.moe_layer_indices()
    held_by_all = []
    for rank in range(pp):
        theirs = []
        for stage in range(num_layers // pp // vpp if vpp else 1):
            vp = stage if vpp else None
            start = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=rank)
            theirs += range(start, start + get_num_layers_to_build(config, vp_stage=vp, pp_rank=rank))
        assert pipeline_layers(num_layers, pp, rank, vpp) == theirs
        held_by_all += stage_moe_positions(moe_layers(model), theirs)
    assert sorted(held_by_all) == list(range(model.num_moe_layers))  # every MoE layer once


def test_rank_share_of_sample_keeps_only_the_stage_layers():
    routes = samples(1)[0].routes
    share = rank_share_of_sample(routes, [0, 2])
    assert share.shape == (routes.shape[0], 2, K) and share.is_contiguous()
    assert torch.equal(share, routes[:, [0, 2]])
    assert share.untyped_storage().data_ptr() != routes.untyped_storage().data_ptr()


class _Group:
    """A stand-in CP process group for megatron's get_pg_size / get_pg_rank (0.16) or
    torch.distributed.get_world_size / get_rank (0.19, patched in the test to ask it)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _megatron_cp_split(batch: dict, group: _Group) -> dict:
    """megatron's ``get_batch_on_this_cp_rank`` with plain (not hybrid) CP in every
    release: megatron-core 0.19 added a required ``is_hybrid_cp`` argument; without
    ``cu_seqlens`` in the batch it then takes the same per-sequence split as before."""
    import inspect

    import megatron.core.utils as mutils

    split = mutils.get_batch_on_this_cp_rank
    if "is_hybrid_cp" in inspect.signature(split).parameters:
        return split(batch, is_hybrid_cp=False, cp_group=group)
    return split(batch, cp_group=group)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_split_matches_megatron_get_batch_on_this_cp_rank(monkeypatch, pack, cp):
    """megatron's local attention cannot run CP > 1 on CPU: the split is tested as data.
    Every micro-batch tensor, routes included, is cut by megatron's function and by ours."""
    import megatron.core.utils as mutils

    # megatron consults the group only when torch.distributed is initialised.
    dist = mutils.torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    # megatron-core 0.19 asks torch.distributed for the group's size and rank directly.
    size_of, rank_of = dist.get_world_size, dist.get_rank
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: group.size()
                        if isinstance(group, _Group) else size_of(group))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.rank()
                        if isinstance(group, _Group) else rank_of(group))
    batches, length = split_microbatches(samples(6), 2, pad_multiple=8, max_length=32,
                                         pack=pack, route_shape=(LAYERS, K, E))
    assert length % (2 * cp) == 0
    for batch in batches:
        fields = {
            "tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
            "position_ids": batch.position_ids, "routes": batch.routes,
            "attention_mask": batch.attention_mask.expand(2, -1, -1, -1),
        }
        held = []
        for rank in range(cp):
            theirs = _megatron_cp_split({n: t.clone() for n, t in fields.items()},
                                        _Group(cp, rank))
            for name, tensor in fields.items():
                seq_dim = 2 if name == "attention_mask" else 1
                assert torch.equal(theirs[name], split_for_cp(tensor, seq_dim, cp, rank)), name
            assert torch.equal(theirs["routes"], rank_share_of_microbatch(batch.routes, None, cp, rank))
            # Stage cut and CP cut together; each token keeps its own routes.
            where = cp_positions(length, cp, rank)
            both = rank_share_of_microbatch(batch.routes, [2, 0], cp, rank)
            assert torch.equal(both, batch.routes[:, where][:, :, [2, 0]])
            assert torch.equal(theirs["tokens"], batch.tokens[:, where])
            held.append(where)
        assert torch.equal(torch.cat(held).sort().values, torch.arange(length))


def test_cp_split_needs_a_divisible_length():
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 2"):
        cp_positions(10, 2, 0)


def test_sp_share_and_router_order_follow_megatron_layout():
    """Under sequence parallelism TP rank r routes rows [r*S/TP, (r+1)*S/TP) of the
    ``[S, B, H]`` activations, flattened sequence-major (token (b, s) -> s*B + b)."""
    B, S, TP = 3, 8, 2
    ids = torch.arange(B * S).view(B, S)
    hidden = ids.t().contiguous()  # megatron's [S, B] layout of the same tokens
    for rank in range(TP):
        piece = hidden[rank * S // TP:(rank + 1) * S // TP]  # _split_along_first_dim
        seen = piece.reshape(-1)  # what the router's logits.view(-1, E) enumerates
        assert torch.equal(router_order(sp_share(ids, TP, rank)), seen)
        assert torch.equal(from_router_order(seen, B), sp_share(ids, TP, rank))
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        sp_share(ids, 3, 0)


def shared_prompt_samples() -> list[Sample]:
    """Two groups of three responses, each group with one prompt and its prompt's routes."""
    out = []
    for group, base in enumerate(samples(2, seed=5)):
        p = base.prompt_len
        for extra in samples(3, seed=10 + group):
            tokens = base.tokens[:p] + extra.tokens[extra.prompt_len:]
            routes = torch.cat([base.routes[: p - 1], extra.routes[extra.prompt_len - 1:]])
            out.append(Sample(tokens=tokens, prompt_len=p, index=len(out), routes=routes))
    return out


@pytest.mark.parametrize("layout", ["rows", "packed", "shared prompts"])
def test_packing_places_routes_with_their_tokens_and_pads_uniformly(layout):
    batch_samples = shared_prompt_samples() if layout == "shared prompts" else samples(5, seed=3)
    batches, length = split_microbatches(batch_samples, 2, pad_multiple=8, max_length=32,
                                         pack=layout == "packed", route_shape=(LAYERS, K, E),
                                         share_prompts=layout == "shared prompts")
    if layout == "shared prompts":
        assert any(batch.input_index is not None for batch in batches)
    seen = {}
    for batch in batches:
        per_sample = routes_by_sample(batch, batch.routes)
        seen.update(per_sample)
        pad = batch.sample_ids < 0
        rows = batch.routes.shape[0]
        expected = padding_routes(rows * length, LAYERS, K, E).view(rows, length, LAYERS, K)
        assert pad.any() and torch.equal(batch.routes[pad], expected[pad])
    # The last token of every sample is never fed: routes cover prompt + response - 1.
    for sample in batch_samples:
        assert torch.equal(seen[sample.index], sample.routes)
        assert seen[sample.index].shape[0] == len(sample.tokens) - 1
