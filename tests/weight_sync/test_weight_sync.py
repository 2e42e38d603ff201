"""WeightSync: the trainer's weights reach rollout servers, versions and refusals.

The end-to-end test drives a real embedded rollout server (a subprocess on 127.0.0.1,
stopped at the end) from an EP=2 trainer; the others are in-process with a mock transport.
"""

import json

import httpx
import pytest
import torch
from ws_support import SERVER_API_KEY, WORKERS

from megatron_rl.model.config import PRESETS
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.config import RolloutConfig
from megatron_rl.weight_sync.broadcast import (
    DistributedWeightUpdater,
    group_requests,
    server_ranks,
    update_request,
)
from megatron_rl.weight_sync.hf_config import ModelShape
from megatron_rl.weight_sync.sync import WeightSync, WeightSyncError, check_version

API_KEY = SERVER_API_KEY


@pytest.fixture(scope="module")
def server(rollout_servers):
    return rollout_servers.handles[0]


@pytest.mark.slow
def test_sync_to_embedded_server(server, run_torchrun, tmp_path):
    records = run_torchrun(
        WORKERS / "hf_sync_worker.py",
        2,
        ["--url", server.url, "--api-key", API_KEY, "--dir", str(tmp_path / "run")],
        tmp_path / "out",
    )
    for record in records:
        assert record["export_complete"]  # export() returns once the directory is complete
        assert [r["version"] for r in record["results"]] == ["1", "2", "3"]
        assert all(r["servers"] == 1 for r in record["results"])
        # keep=2: older versions (v0 from export(), v1) are deleted.
        assert record["dirs"] == ["v2", "v3"]
        # The trainer's and the server's log-probabilities of the server's sample agree:
        # the server serves exactly the synced weights (both fp32).
        assert record["logprob_max_diff"] < 1e-4
        # A config that does not fit the model fails on every rank, naming tensor and shapes.
        assert (
            "model.layers.1.mlp.experts.0.gate_proj.weight: the megatron model gives "
            "shape [128, 128], the HF config expects [64, 128]" in record["bad_export_error"]
        )
        # The server refuses a model of another shape: every rank raises, with the server's
        # URL and answer; the served version's directory stays.
        assert "weight sync of version 4" in record["refusal"]
        assert server.url in record["refusal"] and "num_experts: 8" in record["refusal"]
        assert "keep serving 3" in record["refusal"]
        assert record["dirs_after_refusal"] == ["v3", "v4"]
    rank0 = records[0]
    assert rank0["served_version"] == "3" and rank0["client_version"] == "3"
    assert rank0["served_after_refusal"] == "3"


def _client(handler, urls=("http://a:1", "http://b:2"), workers=()) -> RolloutClient:
    return RolloutClient(
        RolloutConfig(urls=urls, worker_urls=workers, retries=0),
        ModelShape.from_model_config(PRESETS["tiny"]),
        network=httpx.MockTransport(handler),
    )


def test_refusal_names_server_and_keeps_version(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "b":
            return httpx.Response(400, json={"success": False, "message": "disk full"})
        return httpx.Response(200, json={"success": True, "message": "ok"})

    sync = WeightSync([], PRESETS["tiny"], None, tmp_path, client=_client(handler))
    sync.version = "6"
    with pytest.raises(WeightSyncError) as info:
        sync.update_servers(str(tmp_path / "weights" / "v7"), "7")
    message = str(info.value)
    assert "version 7" in message and "http://b:2" in message and "disk full" in message
    assert "succeeded on: ['http://a:1']" in message and "keep serving 6" in message


def test_update_request_carries_version_and_flush(tmp_path):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={"success": True, "message": "ok"})

    sync = WeightSync([], PRESETS["tiny"], None, tmp_path, client=_client(handler))
    assert sync.update_servers("/ckpt/v3", "3") == 2
    assert sorted(host for host, _, _ in seen) == ["a", "b"]
    for _, path, body in seen:
        assert path == "/update_weights_from_disk"
        assert body == {"model_path": "/ckpt/v3", "weight_version": "3", "flush_cache": True}
    # Through a router the update goes to, and counts, the workers behind it.
    seen.clear()
    routed = _client(handler, urls=("http://router:3",), workers=("http://a:1", "http://b:2"))
    sync = WeightSync([], PRESETS["tiny"], None, tmp_path, client=routed)
    assert sync.update_servers("/ckpt/v4", "4") == 2
    assert sorted(host for host, _, _ in seen) == ["a", "b"]


def test_prune_keeps_newest_and_served(tmp_path):
    import os
    import time

    sync = WeightSync([], PRESETS["tiny"], None, tmp_path, keep=2)
    sync.version = "1"  # the servers still serve v1 (later syncs were refused)
    for i, name in enumerate(["v1", "v2", "v3", "v4", "v5.partial"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (time.time() + i, time.time() + i))
    removed = sync.prune(keep=tmp_path / "v4")
    assert [p.name for p in removed] == ["v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v3", "v4", "v5.partial"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "v 1", "-1"])
def test_versions_must_be_plain(bad):
    with pytest.raises(ValueError, match="weight version"):
        check_version(bad)
    assert check_version("step-12.1") == "step-12.1"


def test_distributed_group_ranks_follow_sglang():
    """A server brings its tp_size ranks at rank_offset (SGLang: rank_offset + tp_rank);
    layouts whose ranks SGLang would number twice are refused, naming the server."""
    servers = [
        server_ranks("http://s1:1", {"tp_size": 2, "pp_size": 1, "dp_size": 1}),
        # DP attention: the tp ranks span the replicas, each numbered once.
        server_ranks("http://s2:2", {"tp_size": 4, "dp_size": 2, "enable_dp_attention": True}),
    ]
    (u1, b1), (u2, b2) = group_requests(
        servers, master_address="10.0.0.1", master_port=2345, group_name="g", backend="nccl"
    )
    assert (u1, b1["rank_offset"], b1["world_size"]) == ("http://s1:1", 1, 7)
    assert (u2, b2["rank_offset"], b2["world_size"]) == ("http://s2:2", 3, 7)
    assert b1["master_address"] == "10.0.0.1" and b1["master_port"] == 2345
    assert b1["backend"] == "nccl" and b1["group_name"] == "g"
    with pytest.raises(ValueError, match="http://p:1 runs pp_size 2.*collide"):
        server_ranks("http://p:1", {"tp_size": 2, "pp_size": 2})
    with pytest.raises(ValueError, match="http://d:1 runs dp_size 2 without DP attention"):
        server_ranks("http://d:1", {"tp_size": 4, "dp_size": 2})
    with pytest.raises(ValueError, match="no tp_size: is it a router"):
        server_ranks("http://router:1", {"version": "x"})


def test_distributed_update_request_body():
    tensors = [("a.weight", torch.zeros(3, 4, dtype=torch.bfloat16)), ("b.weight", torch.zeros(5))]
    body = update_request(tensors, group_name="g", version="9", last=True)
    assert body["names"] == ["a.weight", "b.weight"]
    assert body["dtypes"] == ["bfloat16", "float32"]
    assert body["shapes"] == [[3, 4], [5]]
    assert body["weight_version"] == "9" and body["flush_cache"] is True
    middle = update_request(tensors, group_name="g", version="9", last=False)
    assert "weight_version" not in middle and middle["flush_cache"] is False


def test_distributed_update_buckets_in_order():
    from types import SimpleNamespace

    updater = DistributedWeightUpdater(bucket_bytes=100)
    sent = []

    def send(bucket, version, last):
        sent.append(([n for n, _ in bucket], version, last))
        return 0.0

    updater._send = send
    updater.group = SimpleNamespace(device=torch.device("cpu"))  # the collective: elsewhere
    tensors = [(f"t{i}", torch.zeros(10)) for i in range(6)]  # 40 bytes each
    stats = updater.push(iter(tensors), "5")
    assert sent == [
        (["t0", "t1"], None, False),
        (["t2", "t3"], None, False),
        (["t4", "t5"], "5", True),
    ]
    assert (stats.tensors, stats.bytes, stats.buckets) == (6, 240, 3)
    assert updater.version == "5"


def test_distributed_mode_needs_an_updater(tmp_path):
    with pytest.raises(ValueError, match="DistributedWeightUpdater"):
        WeightSync([], PRESETS["tiny"], None, tmp_path, mode="distributed")


@pytest.mark.gpu
@pytest.mark.sglang
def test_distributed_update_with_sglang(tmp_path):
    """Real NCCL path: SGLang serves checkpoint A; the tensors of checkpoint B are pushed
    over the weight-update group; SGLang then holds B's weights and version. NCCL needs
    the two sides on different GPUs: this process uses GPU 0, the server GPU 1."""
    import subprocess
    import sys

    from ws_support import hf_tensors

    from megatron_rl.inference.launcher import free_port, wait_healthy
    from megatron_rl.weight_sync.hf_config import save_random_checkpoint

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (NCCL refuses two ranks on one device)")
    torch.cuda.set_device(0)
    first = save_random_checkpoint(PRESETS["tiny"], tmp_path / "a", seed=0)
    second = save_random_checkpoint(PRESETS["tiny"], tmp_path / "b", seed=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(first),
               "--host", "127.0.0.1", "--port", str(port), "--base-gpu-id", "1",
               "--mem-fraction-static", "0.5"]  # fmt: skip
    process = subprocess.Popen(command)
    updater = DistributedWeightUpdater(master_address="127.0.0.1")
    try:
        wait_healthy(url, api_key=None, timeout_s=600, process=process)
        updater.connect([url])
        tensors = {k: v.cuda() for k, v in hf_tensors(second).items()}
        updater.push(iter(sorted(tensors.items())), "7")
        info = httpx.get(f"{url}/get_model_info", timeout=30).json()
        assert info["weight_version"] == "7"
        name = "model.layers.1.mlp.gate.weight"
        got = httpx.post(
            f"{url}/get_weights_by_name", json={"name": name, "truncate_size": 4}, timeout=30
        ).json()
        expected = tensors[name][:4].float().cpu()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), expected, atol=1e-2)
    finally:
        updater.close()
        process.terminate()
        process.wait(timeout=60)


class _Backend:
    def __init__(self):
        self.shut = False

    def shutdown(self):
        self.shut = True


def test_a_refused_update_names_every_server_and_releases_the_group(monkeypatch):
    """One server refuses at once, one answers within the grace, one never answers: the
    error names all three (the silent one as not answering), the trainer does not wait
    for the silent one, and the abandoned group's backends are shut down."""
    import threading
    import time

    from megatron_rl.weight_sync import broadcast
    from megatron_rl.weight_sync.group import UpdateGroup

    monkeypatch.setattr(broadcast, "REFUSAL_GRACE_S", 0.5)
    release = threading.Event()

    def post(url, path, body):
        if url == "http://b":
            time.sleep(0.1)
            return "http://b/update: HTTP 400: shape"
        if url == "http://c":
            release.wait(30)
            return None
        return "http://a/update: HTTP 400: shape"

    updater = DistributedWeightUpdater()
    monkeypatch.setattr(updater, "_post", post)
    group = UpdateGroup.__new__(UpdateGroup)
    backend = _Backend()
    group._backends, group.group_name = [backend], "g"
    updater.group = group
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as info:
            try:
                updater._collective(
                    [(u, "/update", {}) for u in ("http://a", "http://b", "http://c")],
                    lambda: lambda: False,  # this side's broadcast never finishes
                )
            except BaseException:
                updater.close()  # what push() does on any failure
                raise
        elapsed = time.monotonic() - started
    finally:
        release.set()
    message = str(info.value)
    assert "http://a/update: HTTP 400" in message and "http://b/update: HTTP 400" in message
    assert "http://c: no answer 0.5 s after another server refused" in message
    assert elapsed < 5, elapsed
    assert backend.shut and updater.group is None
