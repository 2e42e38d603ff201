"""Worker: the tiny model with GroupedExperts against the same model with megatron-core's
SequentialMLP: same parameters, outputs and gradients, bit for bit."""

import argparse
import json
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from model_variants import build_tiny_pair, same_parameters

    from megatron_rl.distributed import ParallelConfig, init_distributed
    from megatron_rl.model.config import PRESETS

    model = PRESETS["tiny"]
    init_distributed(ParallelConfig(), model.num_layers, seed=1)
    sequential, grouped = build_tiny_pair("supports_grouped_experts")
    result = {"classes": [type(m.decoder.layers[1].mlp.experts).__name__
                          for m in (sequential, grouped)],
              **same_parameters(sequential, grouped)}
    gen = torch.Generator().manual_seed(5)
    # A batch of 160 tokens, and one of 3 tokens (12 expert slots for 16 experts: some
    # experts get no token).
    for name, (rows, length) in {"batch": (4, 40), "few_tokens": (1, 3)}.items():
        tokens = torch.randint(4, 100, (rows, length), generator=gen)
        positions = torch.arange(length).expand(rows, length)
        mask = ~torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        outputs, grads = [], []
        for m in (sequential, grouped):
            m.zero_grad(set_to_none=True)
            logits = m(tokens, positions, mask)
            logits.float().pow(2).mean().backward()
            outputs.append(logits.detach())
            grads.append({n: p.grad for n, p in m.named_parameters()})
        result[name] = {
            "output_equal": torch.equal(*outputs),
            "grads_equal": all(
                (grads[0][n] is None and grads[1][n] is None)
                or (grads[0][n] is not None and grads[1][n] is not None
                    and torch.equal(grads[0][n], grads[1][n]))
                for n in grads[0]),
            "expert_grads": sum(1 for n, g in grads[1].items() if ".experts." in n and g is not None
                                and bool(g.abs().sum() > 0)),
        }
    # The experts alone: no token for this rank's experts (expert parallelism routed them
    # all elsewhere), and a gradient that arrives broadcast (a sum's).
    for name, rows in {"no_tokens": 0, "broadcast_grad": 40}.items():
        hidden = torch.randn(rows, model.hidden_size, generator=gen)
        counts = torch.zeros(model.num_experts, dtype=torch.long)
        counts[: max(rows, 1)] = 0 if rows == 0 else 1
        counts[0] += rows - int(counts.sum())
        probs = torch.rand(rows, generator=gen)
        outs, grads = [], []
        for m in (sequential, grouped):
            experts = m.decoder.layers[1].mlp.experts
            experts.zero_grad(set_to_none=True)
            x = hidden.clone().requires_grad_(True)
            out, _ = experts(x, counts, probs)
            out.sum().backward()
            outs.append(out.detach())
            grads.append([x.grad] + [p.grad for p in experts.parameters()])
        result[name] = {
            "shape": list(outs[1].shape),
            "output_equal": torch.equal(*outs),
            "grads_equal": all((a is None and b is None) or (a is not None and b is not None
                                                             and torch.equal(a, b))
                               for a, b in zip(*grads, strict=True)),
        }
    with open(os.path.join(args.out, "rank0.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
