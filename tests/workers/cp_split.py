"""Worker (CP=2): the forward step's context-parallel cut of a micro-batch, the reassembly
of per-sample results, and the CP-joined RL loss against the whole micro-batch."""

import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from megatron.core import parallel_state as ps

    from megatron_rl import cpu_adaptation
    from megatron_rl.data.packing import Sample, set_global_counts, split_microbatches
    from megatron_rl.loss import ObjectiveConfig, compute_loss
    from megatron_rl.training.forward_step import context_parallel_share, cp_gather
    from megatron_rl.training.rl_losses import _cp_seq_sum, policy_inputs

    cpu_adaptation.activate()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(context_parallel_size=2)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(3):
        n, p_len = int(torch.randint(8, 15, (1,), generator=gen)), 3
        r = n - p_len
        samples.append(Sample(tokens=torch.randint(4, 90, (n,), generator=gen).tolist(),
                              prompt_len=p_len, advantage=float(i) - 1.0,
                              old_logprobs=-torch.rand(r, generator=gen),
                              rollout_logprobs=-torch.rand(r, generator=gen), index=i,
                              routes=torch.randint(0, 16, (n - 1, 3, 4), generator=gen)))
    (whole,), _ = split_microbatches(samples, 3, pad_multiple=4, route_shape=(3, 4, 16))
    set_global_counts([whole], 3, sum(s.response_len for s in samples))
    local = context_parallel_share(whole)
    # A stand-in for the model's log-probs: a deterministic function of the position.
    logprobs_whole = -(whole.tokens.float() + whole.position_ids.float()) / 100
    logprobs_local = -(local.tokens.float() + local.position_ids.float()) / 100
    rebuilt, again = cp_gather(logprobs_local, local)
    config = ObjectiveConfig(objective="gspo")
    whole_loss = compute_loss(policy_inputs(whole, logprobs_whole, None), config).loss
    local_loss = compute_loss(policy_inputs(local, logprobs_local, None), config,
                              seq_sum=_cp_seq_sum()).loss
    total = local_loss.detach().clone()
    dist.all_reduce(total)
    record = {
        "local_len": local.tokens.shape[1], "whole_len": whole.tokens.shape[1],
        "rebuilt_equal": bool(torch.equal(rebuilt, logprobs_whole)),
        "same_batch": again is whole,
        "routes_len": local.routes.shape[1],
        "whole_loss": float(whole_loss), "cp_loss_sum": float(total),
    }
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
