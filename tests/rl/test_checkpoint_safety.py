"""Loading a checkpoint never runs code from it, and a damaged one is named, not obeyed.

The refusals happen at start-up, before any process group: each launch here costs the
interpreter's imports only."""

import builtins
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rl_fixtures import TINY_RL
from torchrun_launch import ROOT

from megatron_rl.training import checkpoint as ckpt

ITER = "iter_0000003"


class _WritesMarker:
    """Unpickling this runs ``exec``: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",)


def _copy(coldstart: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    target = tmp_path / name
    shutil.copytree(coldstart, target)
    return target


def _run_plain(args: list[str]) -> subprocess.CompletedProcess:
    """pretrain_rl.py as one process without torchrun (what a refusal needs)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "pretrain_rl.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def _legacy_bytes(obj) -> bytes:
    """torch.save's pre-zip format: small enough to replace an item in place."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _malicious_common_state(path: Path, marker: Path) -> None:
    torch.save({"step": 3, "stage": "sft", "payload": _WritesMarker(marker)}, path)
    # The payload is real: an unrestricted load of the file does run it.
    probe = marker.with_suffix(".probe")
    torch.save(_WritesMarker(probe), path.with_suffix(".probe"))
    torch.load(path.with_suffix(".probe"), weights_only=False)
    assert probe.exists()
    path.with_suffix(".probe").unlink()


@pytest.mark.slow
def test_malicious_common_state_is_refused_before_it_runs(coldstart, tmp_path):
    ckpt_dir = _copy(coldstart, tmp_path)
    marker = tmp_path / "marker"
    _malicious_common_state(ckpt_dir / ITER / "common_state.pt", marker)
    proc = _run_plain(TINY_RL + ["--load", str(ckpt_dir), "--save", str(tmp_path / "rl")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{ckpt_dir / ITER / 'common_state.pt'} holds more than data" in proc.stderr
    assert "Unsupported global: GLOBAL exec" in proc.stderr
    assert not marker.exists()
    # The library call refuses it as well, before touching the (absent) engine.
    with pytest.raises(ckpt.CheckpointError, match="holds more than data"):
        ckpt.load_checkpoint(None, str(ckpt_dir))
    assert not marker.exists()


def test_malicious_metadata_and_items_are_refused(coldstart, tmp_path):
    """megatron and torch.distributed.checkpoint unpickle ``.metadata`` and the non-tensor
    items of the ``.distcp`` files without restriction: both are checked first."""
    marker = tmp_path / "marker"
    # .metadata: the real metadata with a payload riding along.
    bad_meta = _copy(coldstart, tmp_path, "meta")
    path = bad_meta / ITER / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.storage_meta.modules = [_WritesMarker(marker)]
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata holds more than checkpoint"):
        ckpt.verify_checkpoint(str(bad_meta / ITER))
    # A non-tensor item (an _extra_state) replaced in place by a payload of the same size.
    bad_item = _copy(coldstart, tmp_path, "item")
    info = next(info for index, info in metadata.storage_data.items()
                if "_extra_state" in index.fqn)
    payload = _legacy_bytes(_WritesMarker(marker)).ljust(info.length, b"\0")
    assert len(payload) == info.length
    # Read the way torch.distributed.checkpoint reads non-tensor items, it would run.
    probe = tmp_path / "probe"
    torch.load(io.BytesIO(_legacy_bytes(_WritesMarker(probe)).ljust(info.length, b"\0")),
               weights_only=False)
    assert probe.exists()
    with open(bad_item / ITER / info.relative_path, "r+b") as handle:
        handle.seek(info.offset)
        handle.write(payload)
    with pytest.raises(ckpt.CheckpointError, match=f"{info.relative_path} .item .*_extra_state"):
        ckpt.verify_checkpoint(str(bad_item / ITER))
    # The rank file (RNG states) is read as data too; numpy's RNG state stays loadable.
    rank_file = bad_item / ITER / "rank_00000.pt"
    assert "numpy" in ckpt._load_data(str(rank_file), "rank", numpy_rng=True)["rng"]
    torch.save({"rng": _WritesMarker(marker)}, rank_file)
    with pytest.raises(ckpt.CheckpointError, match="rank_00000.pt holds more than data"):
        ckpt._load_data(str(rank_file), str(rank_file), numpy_rng=True)
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_shard_is_named_at_startup(coldstart, tmp_path):
    ckpt_dir = _copy(coldstart, tmp_path)
    # The largest shard: file names differ between megatron-core versions and layouts.
    shard = max((ckpt_dir / ITER).glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = _run_plain(["--stage", "sft", "--micro-batch-size", "8", "--load", str(ckpt_dir),
                       "--save", str(tmp_path / "o")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"pretrain_rl.py: error: {shard} is truncated: 1000 bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_without_a_checkpoint_is_refused_unless_it_is_save(tmp_path):
    """Through pretrain_rl.py this is the same start-up refusal as the truncated shard's."""
    from megatron_rl.training.config import CheckpointConfig

    missing = tmp_path / "no-such-dir"
    with pytest.raises(ckpt.CheckpointError, match=f"--load {missing}: no such directory"):
        ckpt.find_load_source(CheckpointConfig(load=str(missing)), "rl")
    empty = tmp_path / "empty"
    (empty / "iter_0000006.tmp").mkdir(parents=True)
    for stage in ("sft", "rl"):
        with pytest.raises(ckpt.CheckpointError, match=f"--load {empty} holds no complete "
                           r"checkpoint .*found \['iter_0000006.tmp'\]"):
            ckpt.find_load_source(CheckpointConfig(load=str(empty), save=str(tmp_path / "o")),
                                  stage)
        # --load = --save: the first launch of a job that resumes itself starts afresh.
        assert ckpt.find_load_source(CheckpointConfig(load=str(empty), save=str(empty)),
                                     stage) is None


def test_common_state_without_a_step_is_damaged(tmp_path):
    (tmp_path / "common_state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="common_state.pt is damaged"):
        ckpt.read_common_state(str(tmp_path))
    torch.save({}, tmp_path / "common_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="common_state.pt is damaged: no step"):
        ckpt.read_common_state(str(tmp_path))
    torch.save({"step": 2, "stage": "rl"}, tmp_path / "common_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="RL checkpoint without"):
        ckpt.read_common_state(str(tmp_path))


@pytest.mark.slow
def test_garbage_tracker_falls_back_to_the_newest_intact_checkpoint(coldstart, tmp_path):
    ckpt_dir = _copy(coldstart, tmp_path)
    # A newer checkpoint that is itself damaged must be skipped, not loaded.
    shutil.copytree(ckpt_dir / ITER, ckpt_dir / "iter_0000005")
    shard = ckpt_dir / "iter_0000005" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    tracker = ckpt_dir / ckpt.TRACKER
    tracker.write_text("\x00garbage")
    # SFT resumed at its last step: the load is the whole run.
    proc = _run_plain(["--stage", "sft", "--micro-batch-size", "8", "--train-iters", "3",
                       "--load", str(ckpt_dir),
                       "--save", str(tmp_path / "out"), "--no-progress"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"{tracker} is damaged (it holds '\\x00garbage', not a step number)" in log
    assert f"skipping iter_0000005: {shard} is truncated" in log
    assert f"falling back to the newest intact checkpoint, {ckpt_dir / ITER}" in log
    assert f"loaded checkpoint of step 3 from {ckpt_dir / ITER}" in log


def test_both_megatron_checkpoint_layouts_are_recognised(tmp_path):
    """megatron-core <= 0.16 keeps the common state in common.pt (common_backend torch);
    0.17+ writes no common_backend and keeps it among the torch_dist items."""
    import json

    where = tmp_path / "metadata.json"
    where.write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                 "common_backend": "torch", "common_backend_version": 1}))
    assert ckpt._check_backend(str(tmp_path)) is True
    where.write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    assert ckpt._check_backend(str(tmp_path)) is False
    for other in ({"sharded_backend": "zarr"},
                  {"sharded_backend": "torch_dist", "common_backend": "pickle"}, ["x"]):
        where.write_text(json.dumps(other))
        with pytest.raises(ckpt.CheckpointError, match="names backends"):
            ckpt._check_backend(str(tmp_path))
