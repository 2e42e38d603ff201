"""The tiny model trains identically at every parallel layout (real processes, gloo).

A single process creates the model and saves it (step 0); each layout loads those
weights, runs two SFT steps on the same fixed global batch, and must reproduce the
single-process loss and gradient norm of both steps. The second step also checks that
the optimiser update itself is layout-independent.
"""

import pytest
from torchrun_launch import WORKERS

WORKER = WORKERS / "train_layout.py"
# fp32 on CPU: reductions in a different order differ by a few ulps.
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4

LAYOUTS = {
    "dp2": (2, []),
    "ep2": (2, ["--ep", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp-layers", "1"]),
    "tp2_sp": (2, ["--tp", "2"]),
    "dp2_distributed_optimizer": (2, ["--dist-opt"]),
    "ep2_alltoall_recompute": (2, ["--ep", "2", "--dispatcher", "alltoall", "--recompute"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from torchrun_launch import run_torchrun

    base = tmp_path_factory.mktemp("reference")
    ckpt = base / "ckpt"
    records = run_torchrun(WORKER, 1, ["--save", str(ckpt), "--save-at", "0", "--steps", "2"],
                           base / "out")
    return ckpt, records[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, torchrun, tmp_path):
    ckpt, ref = reference
    nproc, args = LAYOUTS[layout]
    records = torchrun(WORKER, nproc, ["--load", str(ckpt), "--steps", "2", *args], tmp_path)
    for record in records:
        assert record["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
        assert record["grad_norms"] == pytest.approx(ref["grad_norms"], rel=NORM_RTOL)
    # The reference itself must have learned something, or equal losses prove little.
    assert ref["losses"][1] < ref["losses"][0]


@pytest.mark.slow
def test_device_redirects_are_few_and_all_in_megatron_core(reference):
    """The CPU adaptation's device mode hooks every torch call of the trainer, but rewrites
    only where megatron-core names a CUDA device or type: its optimiser (construction,
    gradient norm, the fp32 type checks of clipping) and its schedule's token counter.
    A new site (or one in this project's own code) fails here, with the list."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU adaptation is inactive with CUDA")
    _, ref = reference
    sites = ref["redirect_sites"]
    assert sites, "two SFT steps needed no redirect at all: is the mode still installed?"
    assert all(site.startswith("megatron.core.") for site in sites), sites
    modules = {site.split(":")[0] for site in sites}
    assert modules <= {"megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                       "megatron.core.utils", "megatron.core.pipeline_parallel.schedules"}, sites
    assert len(sites) <= 6, sites
