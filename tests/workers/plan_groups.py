"""Worker: the groups megatron-core's parallel_state builds, and the parameters each rank
holds, for several layouts in one launch (compared with megatron_rl.plan's dry-run plan).

Each rank writes, per layout, the global ranks of its groups and its parameter counts.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", required=True, help="JSON {name: [ParallelConfig kwargs, build]}")
    args = p.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_rl.distributed import (
        ParallelConfig,
        data_group,
        init_distributed,
        reset_data_group,
    )
    from megatron_rl.model.config import PRESETS
    from megatron_rl.model.provider import build_model

    model = PRESETS["tiny"]
    getters = {
        "tp": ps.get_tensor_model_parallel_group,
        "pp": ps.get_pipeline_model_parallel_group,
        "cp": ps.get_context_parallel_group,
        "dp": lambda: ps.get_data_parallel_group(with_context_parallel=False),
        "dp-cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        "ep": ps.get_expert_model_parallel_group,
        "expert-tp": ps.get_expert_tensor_parallel_group,
        "expert-dp": ps.get_expert_data_parallel_group,
    }
    record = {}
    for name, (kwargs, build) in json.loads(args.layouts).items():
        parallel = ParallelConfig(**kwargs)
        init_distributed(parallel, model.num_layers, seed=1)
        groups = {k: dist.get_process_group_ranks(get()) for k, get in getters.items()}
        groups["data-group"] = data_group()[2]
        entry = {"groups": groups}
        if build:
            chunks = build_model(model, parallel)
            named = [(n, t) for c in chunks for n, t in c.named_parameters()]
            entry["params"] = sum(t.numel() for _, t in named)
            entry["expert"] = sum(t.numel() for n, t in named if ".experts." in n)
            del chunks
        record[name] = entry
        reset_data_group()
        ps.destroy_model_parallel()
    rank = dist.get_rank()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
