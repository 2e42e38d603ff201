"""Binding by layer identity, MTP and dense layers, refusals (one real process)."""

import pytest
from torchrun_launch import WORKERS

EXPECTED = {
    "provider_leaves_global_list_clean", "bound_by_layer", "bound_not_in_global_list",
    "dense_layer_unbound", "second_binding_refused", "two_models_own_routes",
    "stats_per_model", "wrong_layer_count_refused", "missing_routes_refused",
    "duplicate_ids_refused_before_use", "forward_outside_pass_refused",
    "unknown_chunk_refused", "take_unrecorded_refused", "unknown_mode_refused",
    "record_then_take", "take_inside_record_pass", "take_in_replay_pass_refused",
    "close_restores", "rebind_after_close", "mtp_found_and_unbound",
    "mtp_decoder_forced", "mtp_routes_freely", "mtp_not_in_stats", "dense_has_no_sites",
    "dense_replay_refused", "fused_replay_refused", "fused_observe_refused",
}


@pytest.fixture(scope="module")
def binding(tmp_path_factory):
    from torchrun_launch import run_torchrun

    return run_torchrun(WORKERS / "replay_binding.py", 1, [],
                        tmp_path_factory.mktemp("replay_binding"))[0]


@pytest.mark.slow
def test_every_binding_check_passes(binding):
    assert set(binding["checks"]) == EXPECTED
    assert [name for name, ok in binding["checks"].items() if not ok] == []


@pytest.mark.slow
def test_errors_say_what_and_where(binding):
    errors = binding["errors"]
    assert "routes have 2 MoE layers; the model has 3 (global layers [1, 2, 3])" in errors[
        "wrong_layer_count_refused"]
    assert "at sample 0, token 3, decoder layer 2 (MoE layer 1)" in errors[
        "duplicate_ids_refused_before_use"]
    assert "already driven by another RoutingReplay" in errors["second_binding_refused"]
    assert "no MoE layers" in errors["dense_replay_refused"]
    assert "moe_router_fusion" in errors["fused_replay_refused"]
    assert "pass_mode" in errors["forward_outside_pass_refused"]
