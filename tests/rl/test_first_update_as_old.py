"""The first update of a step scoring its own pi_old (--rl-old-logprobs-from-first-update)
trains exactly as a separate pi_old pass does, reports the same statistics, and skips
that pass's forward of the first mini-batch (see tests/workers/first_update_as_old.py)."""

import pytest
from torchrun_launch import WORKERS, run_torchrun

RTOL = 1e-5  # pi_old from a forward of other padding/batch composition: a few ulps


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_torchrun(WORKERS / "first_update_as_old.py", 1, [],
                        tmp_path_factory.mktemp("first_update_as_old"))[0]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mode", ["observe", "replay"])
def test_shortcut_trains_and_reports_like_the_full_pass(report, mode, n):
    full, short = report[f"{mode}/N{n}/full"], report[f"{mode}/N{n}/shortcut"]
    # 8 samples in micro-batches of 2: the full pass scores 4, the shortcut only the
    # mini-batches after the first (none at N = 1).
    assert full["old_pass_microbatches"] == [4]
    assert short["old_pass_microbatches"] == ([] if n == 1 else [2])
    assert short["loss"] == pytest.approx(full["loss"], rel=RTOL, abs=1e-7)
    assert short["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-4)
    assert full["grad_norm"][0] > 0
    assert short["weights_sum"] == pytest.approx(full["weights_sum"], rel=1e-6)
    assert short["weights_abs_sum"] == pytest.approx(full["weights_abs_sum"], rel=1e-6)
    assert set(short["stats"]) == set(full["stats"])
    for name, value in full["stats"].items():
        assert short["stats"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # What the pi_old pass measures is there, from the first update where it was skipped.
    assert "logprob/entropy" in short["stats"] and "mismatch/kl" in short["stats"]
    # (The samples carry random routes, so the agreement itself is 0 in both.)
    assert "mismatch/router_agreement/layer_1" in short["stats"]
    if mode == "replay":
        assert short["stats"]["replay/fidelity"] == 1.0
        assert "replay/target_agreement" in short["stats"]
