"""Weight sync, disk vs distributed: measured on the tiny preset, modelled for Qwen3-30B-A3B.

Measured: one trainer process (tiny preset, random init) and ``--servers`` embedded rollout
servers on this machine. Each round changes the weights and syncs them once by disk
(safetensors written, ``/update_weights_from_disk``) and once by distributed update
(gloo broadcast, ``/update_weights_from_distributed``), all disk rounds first, and checks
that every server serves the same bits afterwards. Prints the median seconds of each path; the
distributed path's first sync, which builds the process group, is shown apart.

Modelled: the bytes one sync of Qwen3-30B-A3B moves (bf16, from the preset's shapes) and
the seconds of both paths at the layouts of examples/qwen3_30b_a3b_minirl.sh (trainer: 4
nodes x 8 GPUs, TP2 PP2 EP8) and examples/slurm/qwen3_30b_a3b.sbatch (4 rollout nodes, 2
SGLang servers of TP4 each), at the bandwidths given by the flags (stated in the output).

    python benchmarks/bench_weight_sync.py [--rounds 5] [--servers 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch


def build_engine():
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine

    model = PRESETS["tiny"]
    parallel = ParallelConfig()
    init_distributed(parallel, model.num_layers, seed=1234)
    training = TrainingConfig(micro_batch_size=1, global_batch_size=8, train_iters=1)
    return model, MegatronEngine(model, parallel, training, build_optimizer=False)


def checksums(urls: list[str]) -> list[str]:
    return [httpx.get(f"{u}/weights_checksum", timeout=60).json()["sha256"] for u in urls]


def measure(args) -> dict:
    from megatron_rl.inference.launcher import start_server_process
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.rollout.config import RolloutConfig
    from megatron_rl.weight_sync.broadcast import DistributedWeightUpdater
    from megatron_rl.weight_sync.hf_config import ModelShape
    from megatron_rl.weight_sync.sync import WeightSync

    model, engine = build_engine()
    with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp:
        disk = WeightSync(engine, model, None, Path(tmp) / "weights", keep=2)
        start = disk.export("0")
        servers = [
            start_server_process(start, dtype=args.dtype, threads=1, weight_version="0")
            for _ in range(args.servers)
        ]
        try:
            urls = [s.url for s in servers]
            client = RolloutClient(RolloutConfig(urls=tuple(urls)),
                                   ModelShape.from_model_config(model))
            disk.client = client
            updater = DistributedWeightUpdater()
            network = WeightSync(
                engine, model, None, Path(tmp) / "weights", client=client,
                mode="distributed", updater=updater,
            )  # fmt: skip
            times: dict[str, list] = {"disk": [], "distributed": []}
            first = None
            # One path after the other: a disk update between two distributed ones changes
            # the servers' version, which the updater takes for a restart (and rebuilds).
            for mode, sync in (("disk", disk), ("distributed", network)):
                for i in range(args.rounds + 1):
                    with torch.no_grad():
                        for param in engine.chunks[0].parameters():
                            param.mul_(1.01)
                    result = sync.sync(f"{mode[:4]}{i}")
                    sums = checksums(urls)
                    if len(set(sums)) != 1:
                        raise RuntimeError(f"servers serve different weights after {mode}: {sums}")
                    if mode == "distributed" and i == 0:
                        first = result
                    elif i > 0:
                        times[mode].append(result)
            updater.close()
        finally:
            for server in servers:
                server.stop()
    return {"times": times, "first": first, "bytes": first.bytes, "connects": updater.connects}


def print_measured(out: dict, args) -> None:
    import platform

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    print(f"\nMeasured: tiny preset ({out['bytes'] / 1e6:.1f} MB fp32), {args.servers} embedded "
          f"server(s) ({args.dtype}), {args.rounds} rounds, median seconds")  # fmt: skip
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{'path':<12} {'total':>8} {'export/gather':>14} {'update':>8}")
    for mode, results in out["times"].items():
        med = {k: statistics.median(getattr(r, k) for r in results)
               for k in ("total_s", "export_s", "update_s")}  # fmt: skip
        print(f"{mode:<12} {med['total_s']:>8.3f} {med['export_s']:>14.3f} {med['update_s']:>8.3f}")
    first = out["first"]
    print(f"distributed, first sync (builds the group): {first.total_s:.3f} s; the group was "
          f"built {out['connects']} time(s) over {args.rounds + 1} syncs")  # fmt: skip


def model_qwen(args) -> None:
    from megatron_rl.model.config import PRESETS
    from megatron_rl.weight_sync.hf_mapping import hf_tensor_shapes

    config = PRESETS["qwen3-30b-a3b"]
    shapes = hf_tensor_shapes(config)
    numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    total = sum(numel.values()) * 2  # bf16
    half = config.num_layers // 2  # PP2: layers 0-23 on stage 0, 24-47 on stage 1

    def stage(name: str) -> int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) >= half
        return name != "model.embed_tokens.weight"  # final norm and LM head: last stage

    # Megatron puts PP outermost: stage 0 is ranks 0-15 (nodes 0-1), stage 1 ranks 16-31.
    # Stage 0's experts spread over its 16 ranks (EP8 x expert-TP2): half on node 1.
    def remote_share(name: str) -> float:
        if stage(name):
            return 1.0
        return 0.5 if ".mlp.experts." in name else 0.0

    remote = sum(2 * n * remote_share(name) for name, n in numel.items())  # to rank 0 over IB
    local = total - remote  # over NVLink within rank 0's node (its own share counted too)
    gather = remote / (args.ib_gbps * 1e9) + local / (args.nvlink_gbps * 1e9)
    gather += len(shapes) * args.tensor_latency_ms / 1e3
    write = total / (args.fs_write_gbps * 1e9)
    read = total / (args.fs_read_gbps * 1e9)  # every rollout node reads it once, in parallel
    buckets = -(-total // (args.bucket_mb * 1024**2))
    broadcast = total / (args.broadcast_gbps * 1e9) + buckets * args.bucket_overhead_ms / 1e3
    print(f"\nModelled: Qwen3-30B-A3B, one sync moves {total / 1e9:.1f} GB (bf16, {len(shapes)} "
          f"tensors, {sum(numel.values()) / 1e9:.2f} B parameters) out of the trainer")  # fmt: skip
    print("trainer (examples/qwen3_30b_a3b_minirl.sh): 4 nodes x 8 GPUs, TP2 PP2 EP8; "
          f"gathering to rank 0: {remote / 1e9:.1f} GB from other nodes at "
          f"{args.ib_gbps} GB/s, {local / 1e9:.1f} GB within its node at {args.nvlink_gbps} GB/s, "
          f"{args.tensor_latency_ms} ms per tensor: {gather:.1f} s (both paths)")  # fmt: skip
    print("rollout (examples/slurm/qwen3_30b_a3b.sbatch): 4 nodes, 2 SGLang servers of TP4 "
          "each: 8 servers, a weight-update group of 1 + 32 ranks")
    print(f"{'path':<12} {'gather':>7} {'move':>7} {'total':>7}  how")
    print(f"{'disk':<12} {gather:>7.1f} {write + read:>7.1f} {gather + write + read:>7.1f}  "
          f"write {total / 1e9:.0f} GB at {args.fs_write_gbps} GB/s, each node reads it at "
          f"{args.fs_read_gbps} GB/s (in parallel)")  # fmt: skip
    print(f"{'distributed':<12} {gather:>7.1f} {broadcast:>7.1f} {gather + broadcast:>7.1f}  "
          f"broadcast at {args.broadcast_gbps} GB/s (NCCL, rank 0's NIC), {buckets} buckets of "
          f"{args.bucket_mb} MB at {args.bucket_overhead_ms} ms each (one server of --tp 4 "
          "--dp 2 per node would be refused: SGLang numbers both replicas' ranks alike)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="measured syncs per path")
    p.add_argument("--servers", type=int, default=2, help="embedded servers to update")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="served dtype")
    p.add_argument("--no-measure", action="store_true", help="only the Qwen3-30B-A3B model")
    p.add_argument("--ib-gbps", type=float, default=25.0, help="inter-node GB/s (200 Gb/s IB)")
    p.add_argument("--nvlink-gbps", type=float, default=150.0, help="intra-node GB/s")
    p.add_argument("--tensor-latency-ms", type=float, default=0.1, help="per gathered tensor")
    p.add_argument("--fs-write-gbps", type=float, default=2.0, help="one writer, shared FS")
    p.add_argument("--fs-read-gbps", type=float, default=4.0, help="per reading node")
    p.add_argument("--broadcast-gbps", type=float, default=25.0, help="NCCL broadcast GB/s")
    p.add_argument("--bucket-mb", type=int, default=512, help="--rl-weight-sync-bucket-mb")
    p.add_argument("--bucket-overhead-ms", type=float, default=5.0, help="HTTP per bucket")
    args = p.parse_args(argv)
    if not args.no_measure:
        started = time.perf_counter()
        print_measured(measure(args), args)
        print(f"(measured in {time.perf_counter() - started:.0f} s)")
    model_qwen(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
