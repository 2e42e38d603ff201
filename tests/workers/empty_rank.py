"""Worker: a data-parallel rank without samples takes part in a scoring pass.

Two ranks (DP = 2, EP = 2: the experts' all-to-all is collective per micro-batch). The
pi_old pass runs twice: once with samples on both ranks, once with rank 1 holding none.
Each rank writes the log-probs it computed, the row length and micro-batch count it
agreed on, so the test can check that the second pass neither hangs nor changes rank 0's
results, and that the empty rank did not impose --seq-length as the row length.
"""

import argparse
import json
import os


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch.distributed as dist
    from replay_common import samples_with_routes

    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS
    from megatron_rl.training import rl_passes
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.rl_passes import BatchLayout, old_logprobs

    model = PRESETS["tiny"].replace(seq_length=64)
    parallel = ParallelConfig(expert_model_parallel_size=2)
    training = TrainingConfig(micro_batch_size=2, global_batch_size=8, lr=1e-3,
                              lr_decay_style="constant", train_iters=10)
    init_distributed(parallel, model.num_layers, seed=1234)
    engine = MegatronEngine(model, parallel, training)
    layout = BatchLayout(micro_batch_size=2, seq_length=64, pack=False, pad_id=0,
                         route_shape=None)
    rank = dist.get_rank()
    agreed = []
    make_batches = rl_passes.make_batches

    def recording(samples, lay, **kw):
        batches, length, rows = make_batches(samples, lay, **kw)
        agreed.append({"length": length, "microbatches": len(batches)})
        return batches, length, rows

    rl_passes.make_batches = recording
    report = {}
    for variant in ("both", "rank0_only"):
        moe = model.moe_layer_indices()
        samples = samples_with_routes(4, 21 + rank, len(moe), model.moe_router_topk,
                                      model.num_experts)
        if variant == "rank0_only" and rank == 1:
            samples = []
        old_logprobs(engine, samples, layout)
        report[variant] = {"logprobs": [s.old_logprobs.tolist() for s in samples],
                           "agreed": agreed[-1]}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
