"""Distributed weight sync end to end: a 2-process trainer (EP=2, then PP=2) under torchrun
with gloo pushes its weights to two embedded servers over a weight-update group, through
the RL loop's RolloutService with --rl-weight-sync distributed; the served bits are
compared with what the disk path serves (tests/workers/hf_dist_sync_worker.py)."""

import pytest
from ws_support import SERVER_API_KEY, WORKERS


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"ep": 2, "pp": 1}, {"ep": 1, "pp": 2}], ids=["ep2", "pp2"])
def test_distributed_sync_matches_disk(layout, rollout_servers, run_torchrun, tmp_path):
    a, b = rollout_servers.urls
    records = run_torchrun(
        WORKERS / "hf_dist_sync_worker.py",
        2,
        ["--urls", a, b, "--api-key", SERVER_API_KEY, "--dir", str(tmp_path / "run"),
         "--start-checkpoint", str(rollout_servers.initial),
         "--ep", str(layout["ep"]), "--pp", str(layout["pp"])],
        tmp_path / "out",
        timeout=400,
    )  # fmt: skip
    assert all(r["mode"] == "distributed" for r in records)
    r = records[0]

    def version(step: str, url: str) -> str:
        return r[step][url][0]

    def bits(step: str, url: str) -> str:
        return r[step][url][1]

    # Start-up pushed version 0 to both servers over the group; nothing was written.
    assert [version("start", u) for u in (a, b)] == ["0", "0"]
    assert bits("start", a) == bits("start", b) != bits("before", a)
    assert r["files_after_start"] == []
    # Sync 1 reached both; the disk path gives server B exactly the same bits.
    sync1 = r["sync1"]["served"]
    assert sync1[a][0] == sync1[b][0] == "1" and sync1[a][1] == sync1[b][1] != bits("start", a)
    assert version("disk1", b) == "1d" and bits("disk1", b) == sync1[a][1]
    assert r["sync1"]["metrics"]["sync/megabytes"] > 10  # the whole tiny model, fp32
    # Greedy generation on both servers: same tokens, same logprobs, bit for bit.
    assert r["greedy"][a] == r["greedy"][b] and len(r["greedy"][a][0]) == 8
    # Sync 2: B served another version (the disk sync), so the group was rebuilt once.
    assert [version("sync2", u) for u in (a, b)] == ["2", "2"]
    assert bits("sync2", a) == bits("sync2", b) != sync1[a][1]
    assert r["connects_after_sync2"] == 2
    # A lost its group and its weights, as after a restart: sync 3 rebuilds and reaches it.
    assert version("restarted", a) == "start" and bits("restarted", a) != bits("sync2", a)
    assert [version("sync3", u) for u in (a, b)] == ["3", "3"]
    assert bits("sync3", a) == bits("sync3", b) != bits("sync2", a)
    assert r["connects"] == 3
    # A refused update names both servers and the tensor; neither server's bits change.
    for url in (a, b):
        assert url in r["refusal"] and "model.norm.weight: shape [3]" in r["refusal"]
        assert r["after_refusal"][url] == r["sync3"][url]
    assert r["group_after_refusal"] is False
    # The next sync rebuilds the group and succeeds.
    assert [version("sync4", u) for u in (a, b)] == ["4", "4"]
    assert bits("sync4", a) == bits("sync4", b) != bits("sync3", a)
    assert r["connects_after_refusal"] == 4
