"""Worker: the tiny model with FusedCoreAttention against the same model with megatron-core's
DotProductAttention: same parameters; outputs and gradients within fp32 rounding on a
causal batch and on rows of shared prompts (the trainer's tree masks, with padding)."""

import argparse
import json
import os

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from model_variants import build_tiny_pair, same_parameters

    from megatron_rl.data.packing import Sample, make_microbatch
    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS

    model = PRESETS["tiny"]
    init_distributed(ParallelConfig(), model.num_layers, seed=1)
    unfused, fused = build_tiny_pair("computes")
    result = {"classes": [type(m.decoder.layers[0].self_attention.core_attention).__name__
                          for m in (unfused, fused)],
              **same_parameters(unfused, fused)}

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 100, (3, 48), generator=gen)
    causal = (tokens, torch.arange(48).expand(3, 48),
              ~torch.ones(48, 48, dtype=torch.bool).tril()[None, None])
    # Two groups of 3 responses sharing their prompt, one unshared sample, padding.
    samples = []
    for g, prompt_len in enumerate((7, 5)):
        prompt = torch.randint(4, 100, (prompt_len,), generator=gen).tolist()
        for r in range(3):
            response = torch.randint(4, 100, (4 + 3 * r,), generator=gen).tolist()
            samples.append(Sample(tokens=prompt + response, prompt_len=prompt_len,
                                  index=3 * g + r))
    samples.append(Sample(tokens=torch.randint(4, 100, (9,), generator=gen).tolist(),
                          prompt_len=3, index=6))
    batch = make_microbatch([samples[:3], samples[3:6], samples[6:]], pad_to=40,
                            share_prompts=True)
    shared = (batch.tokens, batch.position_ids, batch.attention_mask)
    result["shared_rows_padded"] = bool((batch.sample_ids < 0).any())
    unmasked = (tokens, causal[1], None)  # megatron's causal type builds the mask itself
    for name, inputs in {"causal": causal, "shared": shared, "no_mask": unmasked}.items():
        outputs, grads = [], []
        for m in (unfused, fused):
            m.zero_grad(set_to_none=True)
            logits = m(*inputs)
            logits.float().pow(2).mean().backward()
            outputs.append(logits.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        real = batch.sample_ids >= 0 if name == "shared" else inputs[0] != -1
        result[name] = {
            "finite": bool(torch.isfinite(outputs[1]).all()),
            "output_rel": _rel(outputs[1][real], outputs[0][real]),
            "same_grads": sorted(grads[0]) == sorted(grads[1]),
            "grad_rel": max(_rel(grads[1][n], grads[0][n]) for n in grads[0]),
            "grads": len(grads[0]),
        }
    with open(os.path.join(args.out, "rank0.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
