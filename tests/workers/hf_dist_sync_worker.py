"""Worker: distributed weight sync from a 2-process trainer (EP=2 or PP=2) to two running
embedded servers, through the RL loop's RolloutService (--rl-weight-sync distributed).

Rank 0 records, after each step, what the servers serve (/weights_checksum, versions):
1. start: the group is built with both servers and version 0 pushed;
2. sync 1 (the weights changed) over the group; then a disk sync of the same weights to
   server B alone, whose checksum must equal what the distributed sync gave;
3. greedy generation with logprobs on both servers;
4. sync 2: B reports another version (the disk sync), so the group is rebuilt;
5. server A loses its group and goes back to its start-up weights, as after a restart:
   sync 3 rebuilds the group and reaches both;
6. a refused update (a wrong shape in the second of two buckets): both servers answer 400
   and keep version 3's bits; sync 4 rebuilds the group and succeeds.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--urls", nargs=2, required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--start-checkpoint", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    args = p.parse_args()

    import httpx
    from hf_common import build_engine, perturb_norms

    from megatron_rl.arguments import parse_args
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.rollout.config import RolloutConfig
    from megatron_rl.training.rollout_service import RolloutService
    from megatron_rl.weight_sync.hf_config import ModelShape
    from megatron_rl.weight_sync.sync import WeightSync

    engine = build_engine(1, args.pp, args.ep, None)
    perturb_norms(engine)
    rank = dist.get_rank()
    a, b = args.urls
    headers = {"Authorization": f"Bearer {args.api_key}"}
    run = parse_args(
        ["--micro-batch-size", "8", "--rl-rollout-url", a, b, "--rl-rollout-api-key", args.api_key,
         "--rl-weight-sync", "distributed", "--rl-sync-dir", os.path.join(args.dir, "w"),
         "--rl-weight-sync-timeout", "60", "--no-rl-rollout-progress"],
        world_size=2,
    )  # fmt: skip
    service = RolloutService(
        engine, run, run.rollout, None, return_routed_experts=False, is_leader=rank == 0,
        sync_dir=run.rl.sync_dir, keep_versions=2,
    )  # fmt: skip
    # Disk sync of the same weights to server B only (its own client), for comparison.
    disk_client = (
        RolloutClient(RolloutConfig(urls=(b,), api_key=args.api_key),
                      ModelShape.from_model_config(run.model)) if rank == 0 else None
    )
    disk = WeightSync(engine, run.model, None, os.path.join(args.dir, "disk"), client=disk_client)
    updater = service.weights.updater
    record: dict = {"rank": rank, "mode": service.weights.mode}

    def served() -> dict:
        if rank != 0:
            return {}
        out = {}
        for url in (a, b):
            info = httpx.get(f"{url}/weights_checksum", headers=headers, timeout=60).json()
            out[url] = (info["weight_version"], info["sha256"])
        return out

    def scale(factor: float) -> None:
        with torch.no_grad():
            for chunk in engine.chunks:
                for param in chunk.parameters():
                    param.mul_(factor)

    record["before"] = served()
    service.start(0)
    record["start"] = served()
    record["files_after_start"] = sorted(os.listdir(args.dir)) if os.path.isdir(args.dir) else []
    scale(1.05)
    result = service.sync(1)
    record["sync1"] = {"served": served(), "metrics": result}
    disk.sync("1d")
    record["disk1"] = served()
    if rank == 0:
        body = {
            "input_ids": [5, 17, 40, 33, 21, 9, 60],
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True},
        }
        record["greedy"] = {}
        for url in (a, b):
            answer = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60).json()
            lps = [lp for lp, _, _ in answer["meta_info"]["output_token_logprobs"]]
            record["greedy"][url] = [answer["output_ids"], lps]
    scale(1.05)
    service.sync(2)
    record["sync2"] = served()
    record["connects_after_sync2"] = updater.connects if rank == 0 else None
    if rank == 0:
        # Server A as after a restart: no group, its start-up weights and version.
        httpx.post(f"{a}/destroy_weights_update_group",
                   json={"group_name": updater.group_name}, headers=headers, timeout=60)  # fmt: skip
        httpx.post(
            f"{a}/update_weights_from_disk",
            json={"model_path": args.start_checkpoint, "weight_version": "start"},
            headers=headers, timeout=120,
        ).raise_for_status()  # fmt: skip
    record["restarted"] = served()
    scale(1.05)
    service.sync(3)
    record["sync3"] = served()
    record["connects"] = updater.connects if rank == 0 else None
    if rank == 0:
        # Two buckets; the second one's shape is wrong: both servers refuse the update.
        updater.bucket_bytes = 1
        bad = [("model.norm.weight", torch.zeros(128)), ("model.norm.weight", torch.zeros(3))]
        try:
            updater.push(iter(bad), "bad")
            record["refusal"] = None
        except RuntimeError as exc:
            record["refusal"] = str(exc)
        updater.bucket_bytes = 512 * 1024**2
        record["group_after_refusal"] = updater.group is not None
    record["after_refusal"] = served()
    scale(1.05)
    service.sync(4)
    record["sync4"] = served()
    record["connects_after_refusal"] = updater.connects if rank == 0 else None
    service.close()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
