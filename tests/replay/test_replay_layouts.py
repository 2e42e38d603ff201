"""Routing replay is exact at every parallel layout (real processes, gloo).

A single process saves the tiny model and runs the replay worker as the reference; each
layout loads the same weights and runs the same passes (see
tests/workers/replay_layout.py). In every layout, on every rank:

* forcing: every router call -- forward, and the forward activation recompute re-runs in
  backward -- returned exactly the experts of its own micro-batch (distinct random
  routes per micro-batch), for record, replay, training and R2 passes;
* consistency: replaying the routes the model just recorded gives bitwise the logits of
  free routing; replaying other routes changes them; gates are the softmax over the
  replayed experts' live logits; router weights get gradients;

and across layouts, per sample: the recorded routes, the log-probabilities under
replay, the training loss, gradient norm and the reduced statistics equal the
single-process reference -- which a wrong token order, stage layer or micro-batch
would break.
"""

import pytest
from torchrun_launch import WORKERS

WORKER = WORKERS / "replay_layout.py"
LOSS_RTOL = 1e-5  # fp32 reductions in another order differ by a few ulps
NORM_RTOL = 1e-4

LAYOUTS = {
    "ep2_alltoall_recompute": ["--ep", "2", "--dispatcher", "alltoall", "--recompute"],
    "pp2_vpp2_recompute": ["--pp", "2", "--vpp-layers", "1", "--recompute"],
    "pp2_packed_stage_routes": ["--pp", "2", "--pack", "--stage-routes"],
    "tp2_sp_packed": ["--tp", "2", "--pack"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from torchrun_launch import run_torchrun

    base = tmp_path_factory.mktemp("replay_reference")
    ckpt = base / "ckpt"
    record = run_torchrun(WORKER, 1, ["--save", str(ckpt)], base / "out")[0]
    return ckpt, record


def _failed(record: dict) -> list[str]:
    return [name for name, ok in record["checks"].items() if not ok]


@pytest.mark.slow
def test_single_process(reference):
    _, ref = reference
    assert not _failed(ref)
    assert len(ref["checks"]) >= 13 and ref["bound_layers"] == [1, 2, 3]
    stats = ref["stats"]
    # Replaying what was just recorded: the trainer agrees with itself everywhere.
    assert stats["replay_recorded"]["mismatch/router_agreement"] == 1.0
    for name in ("replay_recorded", "replay_random", "train", "r2_update"):
        assert stats[name]["replay/fidelity"] == 1.0
        assert all(stats[name][f"replay/fidelity/layer_{i}"] == 1.0 for i in (1, 2, 3))
    # Random routes are (almost) never what the router would pick.
    assert stats["record"]["mismatch/router_agreement"] < 0.05
    # R2 after an update: the recorded experts were used (fidelity 1 above), although the
    # router would now choose differently for some tokens.
    assert 0 < stats["observe"]["mismatch/router_agreement"] < 1
    assert "replay/fidelity" not in stats["observe"] and "replay/fidelity" not in stats["record"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, torchrun, tmp_path):
    ckpt, ref = reference
    records = torchrun(WORKER, 2, ["--load", str(ckpt), *LAYOUTS[layout]], tmp_path)
    recorded: dict = {}
    losses = 0.0
    for record in records:
        assert not _failed(record), (record["rank"], _failed(record))
        for sample, layers in record["recorded"].items():
            for layer, routes in layers.items():
                assert routes == ref["recorded"][sample][layer], (sample, layer)
                recorded.setdefault(sample, set()).add(layer)
        for sample, value in record["replay_logprobs"].items():
            assert value == pytest.approx(ref["replay_logprobs"][sample], rel=LOSS_RTOL)
        assert record["grad_norm"] == pytest.approx(ref["grad_norm"], rel=NORM_RTOL)
        for name, stats in record["stats"].items():
            assert stats == pytest.approx(ref["stats"][name], abs=1e-12), name
        if record["last_stage"] and record["tp_rank"] == 0:
            losses += record["train_loss"]
    # Between them the ranks recorded every MoE layer of every sample.
    assert recorded == {s: {"1", "2", "3"} for s in ref["recorded"]}
    assert losses == pytest.approx(ref["train_loss"], rel=LOSS_RTOL)
    if "--vpp-layers" in LAYOUTS[layout]:
        assert [r["chunks"] for r in records] == [2, 2]
        assert sorted(layer for r in records for layer in r["bound_layers"]) == [1, 2, 3]
