"""Every route validation error, for one sample (rollout side) and for the share of a
micro-batch a rank's routers are about to use; each message names sample, token, layer."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.data.packing import Sample, split_microbatches
from megatron_rl.data.routes import (
    RouteError,
    compact,
    moe_layer_names,
    padding_routes,
    route_dtype,
    validate,
    validate_microbatch,
)

E, K, LAYERS = 16, 4, 3
NAMES = moe_layer_names([1, 2, 3])


def random_routes(tokens: int, seed: int = 0, layers: int = LAYERS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return compact(torch.rand(tokens, layers, E, generator=gen).argsort(-1)[..., :K], E)


def check_sample(routes: torch.Tensor, tokens: int = 10) -> None:
    validate(routes, num_tokens=tokens, num_moe_layers=LAYERS, topk=K, num_experts=E,
             sample="sample 5", layer_names=NAMES)


# -- one sample ------------------------------------------------------------------------------

def test_valid_sample_passes():
    check_sample(random_routes(10))


@pytest.mark.parametrize("routes, message", [
    (random_routes(9), "cover 9 tokens, expected 10"),
    (random_routes(10, layers=2), "2 MoE layers, the model has 3"),
    (random_routes(10)[..., :3], "top-k 3, the model routes to 4"),
    (random_routes(10).float(), "integer expert ids, got dtype torch.float32"),
    (random_routes(10).bool(), "integer expert ids, got dtype torch.bool"),
    (random_routes(10)[0], "shape [tokens, moe_layers, topk]"),
])
def test_sample_shape_and_dtype_errors(routes, message):
    with pytest.raises(RouteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_sample(routes)


def test_sample_id_out_of_range_names_token_and_layer():
    routes = random_routes(10).long()
    routes[7, 2, 1] = E
    with pytest.raises(RouteError) as err:
        check_sample(routes)
    assert "sample 5: expert id 16 at token 7, decoder layer 3 (MoE layer 2)" in str(err.value)
    routes[7, 2, 1] = -1
    with pytest.raises(RouteError, match="expert id -1 at token 7"):
        check_sample(routes)


def test_sample_duplicates_name_token_and_layer():
    routes = random_routes(10)
    routes[4, 0, 3] = routes[4, 0, 0]
    with pytest.raises(RouteError) as err:
        check_sample(routes)
    assert "duplicate expert ids" in str(err.value)
    assert "token 4, decoder layer 1 (MoE layer 0)" in str(err.value)


def test_sample_all_zero_layer_is_a_lost_capture():
    routes = random_routes(10)
    routes[:, 1] = 0
    with pytest.raises(RouteError, match="every route of decoder layer 2 .* is expert 0"):
        check_sample(routes)


def test_narrow_dtype_cannot_hold_the_ids():
    # 300 experts do not fit uint8: ids above 255 were wrapped when stored.
    routes = torch.zeros(4, 1, 2, dtype=torch.uint8)
    with pytest.raises(RouteError, match="uint8 cannot hold expert ids up to 299"):
        validate(routes, num_tokens=4, num_moe_layers=1, topk=2, num_experts=300, sample="s")
    assert route_dtype(300) == torch.int16 and route_dtype(256) == torch.uint8


# -- a micro-batch share -----------------------------------------------------------------------

def make_batch(pack: bool = True):
    samples = []
    for i, (prompt, response) in enumerate([(5, 4), (7, 3), (4, 6)]):
        tokens = list(range(10, 10 + prompt + response))
        samples.append(Sample(tokens=tokens, prompt_len=prompt, index=10 + i,
                              routes=random_routes(prompt + response - 1, seed=i)))
    batches, _ = split_microbatches(samples, 2, pad_multiple=8, max_length=24, pack=pack,
                                    route_shape=(LAYERS, K, E))
    return batches[0]


def check_batch(batch, routes=None) -> None:
    validate_microbatch(
        batch.routes if routes is None else routes, sample_ids=batch.sample_ids,
        position_ids=batch.position_ids, sample_index=batch.sample_index, topk=K,
        num_experts=E, layer_names=NAMES, where=f"micro-batch {batch.key}",
    )


def test_valid_microbatch_passes_padding_included():
    batch = make_batch()
    assert (batch.sample_ids < 0).any()  # there is padding, and it is valid too
    check_batch(batch)


def test_microbatch_out_of_range_names_sample_and_token():
    batch = make_batch()
    # Row 0 packs samples 10 and 11; token 2 of sample 11 sits at position 8 + 2.
    b, s = 0, 10
    assert batch.sample_index[int(batch.sample_ids[b, s])] == 11
    batch.routes[b, s, 1, 2] = 200
    with pytest.raises(RouteError) as err:
        check_batch(batch)
    assert ("micro-batch 0: expert id 200 at sample 11, token 2, decoder layer 2 "
            "(MoE layer 1) is out of range [0, 16)") in str(err.value)


def test_microbatch_duplicate_in_padding_is_refused():
    batch = make_batch()
    b, s = (batch.sample_ids < 0).nonzero()[0].tolist()
    batch.routes[b, s, 2, 1] = batch.routes[b, s, 2, 0]
    with pytest.raises(RouteError, match=rf"padding token \(row {b}, position {s}\), decoder layer 3"):
        check_batch(batch)


def test_microbatch_all_zero_layer_of_one_sample():
    batch = make_batch()
    batch.routes[batch.sample_ids == 1, 0] = 0
    with pytest.raises(RouteError, match="sample 11: every route of decoder layer 1"):
        check_batch(batch)


def test_microbatch_shape_and_dtype_errors():
    batch = make_batch()
    with pytest.raises(RouteError, match="dtype torch.int64; micro-batches carry the compact"):
        check_batch(batch, batch.routes.long())
    with pytest.raises(RouteError, match="integer expert ids"):
        check_batch(batch, batch.routes.float())
    with pytest.raises(RouteError, match="do not cover the micro-batch"):
        check_batch(batch, batch.routes[:, :-1])
    with pytest.raises(RouteError, match="routes have 2 MoE layers, expected 3"):
        check_batch(batch, batch.routes[:, :, :2])
    with pytest.raises(RouteError, match="top-k 3, the model routes to 4"):
        check_batch(batch, batch.routes[..., :3])


def test_padding_routes_are_distinct_and_spread_over_all_experts():
    pad = padding_routes(64, 2, K, E)
    assert pad.dtype == torch.uint8
    assert (pad.sort(-1).values.diff(dim=-1) > 0).all()  # no duplicates
    load = torch.bincount(pad[:, 0].reshape(-1).long(), minlength=E)
    assert (load == load[0]).all()  # uniform: 64 tokens x 4 / 16 experts each


def test_microbatch_top1_zero_layer_needs_sixteen_tokens():
    """With top-k 1 expert 0 is a legitimate choice: a sample is judged only from 16
    tokens on (as for whole samples), and then an all-zero layer is a lost capture."""
    def top1_batch(tokens: int):
        sample = Sample(tokens=list(range(4, 4 + tokens + 1)), prompt_len=3, index=0,
                        routes=torch.zeros(tokens, LAYERS, 1, dtype=torch.uint8))
        sample.routes[:, 0] = 5
        return split_microbatches([sample], 1, pad_multiple=8, route_shape=(LAYERS, 1, E))[0][0]

    def check(batch):
        validate_microbatch(batch.routes, sample_ids=batch.sample_ids,
                            position_ids=batch.position_ids, sample_index=batch.sample_index,
                            topk=1, num_experts=E, layer_names=NAMES, where="micro-batch 0")

    check(top1_batch(15))
    with pytest.raises(RouteError, match="sample 0: every route of decoder layer 2"):
        check(top1_batch(16))


def test_microbatch_with_256_experts_fills_uint8():
    """Expert 255 is valid with 256 experts; uint8 compared with 256 would wrap to 0."""
    routes = compact(torch.rand(9, 1, 256).argsort(-1)[..., :K], 256)
    routes[0, 0, 0] = 255
    assert routes.dtype == torch.uint8
    sample = Sample(tokens=list(range(10)), prompt_len=4, index=0, routes=routes)
    batch = split_microbatches([sample], 1, pad_multiple=8, route_shape=(1, K, 256))[0][0]
    validate_microbatch(batch.routes, sample_ids=batch.sample_ids,
                        position_ids=batch.position_ids, sample_index=batch.sample_index,
                        topk=K, num_experts=256, layer_names=["decoder layer 0"], where="mb")
