"""Worker: per-token log-probs of the same samples laid out unpadded, padded, packed and
with prompts shared (and, alone vs shared, the gradients of their summed log-probs)."""

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
    from megatron_rl.model.rope_positions import rotary_positions
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
    # Groups of responses to one prompt (prompt sharing lays each group out as a tree),
    # one of them cut by the row length, and a group of one.
    for size, prompt_len in ((3, 7), (4, 5), (1, 6)):
        prompt = torch.randint(4, 100, (prompt_len,), generator=gen).tolist()
        for _ in range(size):
            n = int(torch.randint(2, 9, (1,), generator=gen))
            response = torch.randint(4, 100, (n,), generator=gen).tolist()
            samples.append(Sample(tokens=prompt + response, prompt_len=prompt_len,
                                  index=len(samples)))

    def collect(batch, logits):
        lp = token_logprobs(logits, batch.labels)
        per_sample = {}
        for local, index in enumerate(batch.sample_index):
            sel = (batch.sample_ids == local) & batch.loss_mask
            per_sample[index] = lp[sel].tolist()
        return (lp * batch.loss_mask).sum(), {"lp": per_sample}

    step = make_forward_step(collect)
    layouts = {
        "alone": [split_microbatches([s], 1, pad_multiple=1) for s in samples],
        "padded": [split_microbatches(samples, 3, pad_multiple=32)],
        "packed": [split_microbatches(samples, 2, pack=True, max_length=40)],
        "shared": [split_microbatches(samples, 5, share_prompts=True, max_length=20)],
        "shared_packed": [split_microbatches(samples, 2, pack=True, max_length=40,
                                             share_prompts=True)],
    }
    result = {}
    for name, parts in layouts.items():
        merged = {}
        for batches, length in parts:
            mbs = batches[0].tokens.shape[0]
            for out in engine.forward_only(step, batches, seq_length=length, micro_batch_size=mbs):
                merged.update({str(k): v for k, v in out["lp"].items()})
        result[name] = merged
    result["rows"] = {name: [b.tokens.shape[0] * b.tokens.shape[1] for b, _ in
                             [(b, n) for batches, n in parts for b in batches]]
                      for name, parts in layouts.items()}
    # Gradient of the summed log-probs of every sample: one row each vs prompts shared.
    (model,) = engine.model  # DDP: gradients land in each parameter's main_grad
    grads = {}
    for name in ("alone", "shared"):
        model.zero_grad_buffer()
        for batches, _ in layouts[name]:
            for batch in batches:
                positions = batch.position_ids if batch.input_index is not None else None
                with rotary_positions(positions):
                    logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
                (token_logprobs(logits, batch.labels) * batch.loss_mask).sum().backward()
        grads[name] = torch.cat([p.main_grad.flatten().clone() for p in model.parameters()])
    scale = grads["alone"].abs().max()
    result["grad_max_diff"] = float((grads["alone"] - grads["shared"]).abs().max() / scale)
    result["grad_norm"] = float(grads["alone"].norm())
    with open(os.path.join(args.out, "rank0.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
