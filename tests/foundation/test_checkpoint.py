"""Checkpoints round-trip exactly and reshard across parallel layouts."""

import pytest
import torch
from torchrun_launch import WORKERS

WORKER = WORKERS / "train_layout.py"


@pytest.mark.slow
def test_roundtrip_is_exact_and_resume_continues_identically(torchrun, tmp_path):
    ckpt = tmp_path / "ckpt"
    # Uninterrupted: 3 steps, checkpoint after step 1, the state of step 1 dumped as saved.
    full = torchrun(WORKER, 1, ["--steps", "3", "--save", str(ckpt), "--save-at", "1",
                                "--dump-at", "1"], tmp_path / "full")[0]
    # Another process loads it, dumps what it loaded, and runs steps 2 and 3.
    resumed = torchrun(WORKER, 1, ["--steps", "2", "--start-step", "1", "--load", str(ckpt),
                                   "--dump-at", "0"], tmp_path / "resumed")[0]
    before = torch.load(tmp_path / "full" / "dump0.pt", weights_only=False)
    after = torch.load(tmp_path / "resumed" / "dump0.pt", weights_only=False)
    assert before["params"].keys() == after["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), name
    _assert_same_optimizer_state(before["optimizer"], after["optimizer"])
    # On a CPU the save left no helper process behind (cpu_adaptation's
    # _in_process_save_results: megatron-core's writer would keep a Manager process).
    if full["adapted"]:
        assert full["children"] == []
    # Resuming from the checkpoint reproduces steps 2 and 3 exactly.
    assert resumed["losses"] == full["losses"][1:]
    assert resumed["grad_norms"] == full["grad_norms"][1:]
    # A run with another learning rate (RL after a cold start) continues the same Adam
    # state under its own schedule: megatron >= 0.19 pairs saved and live param groups
    # by their max_lr / min_lr too.
    torchrun(WORKER, 1, ["--steps", "0", "--load", str(ckpt), "--lr", "5e-4",
                         "--own-schedule", "--dump-at", "0"], tmp_path / "own")
    own = torch.load(tmp_path / "own" / "dump0.pt", weights_only=False)["optimizer"]
    saved = {k: v for k, v in _flatten(before["optimizer"]).items() if "/param_groups/" not in k}
    continued = {k: v for k, v in _flatten(own).items() if "/param_groups/" not in k}
    _assert_same_optimizer_state(saved, continued)
    groups = {k: v for k, v in _flatten(own).items() if "/param_groups/" in k}
    assert [v for k, v in groups.items() if k.endswith("/lr")] != []
    for key, value in groups.items():
        if key.endswith(("/lr", "/max_lr", "/min_lr")):
            assert value == (5e-4 if not key.endswith("min_lr") else 0.0), key


def _assert_same_optimizer_state(a, b):
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    tensors = 0
    for key, value in flat_a.items():
        other = flat_b[key]
        if isinstance(value, torch.Tensor):
            tensors += 1
            assert torch.equal(value, other), key
        else:
            assert value == other, key
    assert tensors > 0, "the optimiser state holds no tensors: nothing was compared"


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


@pytest.mark.slow
def test_saved_at_ep2_loads_at_ep1_with_same_loss(torchrun, tmp_path):
    ckpt = tmp_path / "ckpt"
    ep2 = torchrun(WORKER, 2, ["--ep", "2", "--steps", "3", "--save", str(ckpt), "--save-at",
                               "1"], tmp_path / "ep2")
    ep1 = torchrun(WORKER, 1, ["--steps", "2", "--start-step", "1", "--load", str(ckpt)],
                   tmp_path / "ep1")[0]
    # Steps 2 and 3 at EP=1 from the EP=2 checkpoint see the weights and the optimiser state
    # (Adam moments, step count) the EP=2 run had: same losses, same gradient norms.
    assert ep1["losses"] == pytest.approx(ep2[0]["losses"][1:], rel=1e-5)
    assert ep1["grad_norms"] == pytest.approx(ep2[0]["grad_norms"][1:], rel=1e-4)


@pytest.mark.slow
def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    from megatron_rl.training import checkpoint as ckpt

    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / ckpt.TRACKER).write_text("4")
    # A crash while writing step 6 leaves only its .tmp directory behind.
    (tmp_path / "iter_0000006.tmp").mkdir()
    assert ckpt.latest_step(str(tmp_path)) == 4
    assert ckpt.complete_steps(str(tmp_path)) == [4]
    # A tracker pointing at a directory that never completed falls back to the newest
    # complete one.
    (tmp_path / ckpt.TRACKER).write_text("6")
    assert ckpt.latest_step(str(tmp_path)) == 4
