"""Worker: per-token log-probs of the same samples laid out unpadded, padded and packed."""

import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from megatron_rl.data.packing import Sample, split_microbatches
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS
    from megatron_rl.training.config import TrainingConfig
    from megatron_rl.training.engine import MegatronEngine
    from megatron_rl.training.forward_step import make_forward_step
    from megatron_rl.training.token_logprobs import token_logprobs

    model = PRESETS["tiny"]
    init_distributed(ParallelConfig(), model.num_layers, seed=7)
    engine = MegatronEngine(model, ParallelConfig(), TrainingConfig(), build_optimizer=False)
    gen = torch.Generator().manual_seed(3)
    samples = []
    for i in range(6):
        n = int(torch.randint(6, 20, (1,), generator=gen))
        samples.append(Sample(tokens=torch.randint(4, 100, (n,), generator=gen).tolist(),
                              prompt_len=3, index=i))

    def collect(batch, logits):
        lp = token_logprobs(logits, batch.labels)
        per_sample = {}
        for local, index in enumerate(batch.sample_index):
            sel = (batch.sample_ids == local) & batch.loss_mask
            per_sample[index] = lp[sel].tolist()
        return logits.sum() * 0, {"lp": per_sample}

    step = make_forward_step(collect)
    layouts = {
        "alone": [split_microbatches([s], 1, pad_multiple=1) for s in samples],
        "padded": [split_microbatches(samples, 3, pad_multiple=32)],
        "packed": [split_microbatches(samples, 2, pack=True, max_length=40)],
    }
    result = {}
    for name, parts in layouts.items():
        merged = {}
        for batches, length in parts:
            mbs = batches[0].tokens.shape[0]
            for out in engine.forward_only(step, batches, seq_length=length, micro_batch_size=mbs):
                merged.update({str(k): v for k, v in out["lp"].items()})
        result[name] = merged
    with open(os.path.join(args.out, "rank0.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
