"""Context parallelism of the data path (CP=2, real gloo processes).

megatron-core's local attention cannot run CP > 1 on CPU, so the model runs at CP=1
elsewhere; here the forward step's cut of a micro-batch into CP chunks, the reassembly of
per-token results and the CP-joined objective are checked as data."""

import pytest
from torchrun_launch import WORKERS


@pytest.mark.slow
def test_cp_split_reassembles_and_joined_loss_equals_whole(torchrun, tmp_path):
    records = torchrun(WORKERS / "cp_split.py", 2, [], tmp_path)
    for r in records:
        assert r["local_len"] * 2 == r["whole_len"] == r["routes_len"] * 2
        assert r["rebuilt_equal"] and r["same_batch"]
        # GSPO needs whole-response sums: the CP all-reduce joins the chunks exactly.
        assert r["cp_loss_sum"] == pytest.approx(r["whole_loss"], rel=1e-6, abs=1e-9)
