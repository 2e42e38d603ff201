"""Worker: export the tiny model to Hugging Face format at one layout, and load it back.

Steps, each optional, in this order (every rank takes part; results come from the rank
that holds the full logits):

1. build the model at the layout (random init, norms perturbed); ``--train-step`` runs one
   SFT step so the weights and Adam's state are a trained model's;
2. ``--save-ckpt DIR``: training/checkpoint.py's save_checkpoint (step 1);
3. ``--export DIR`` + ``--logits FILE``: export, and the megatron logits of the fixed batch;
4. ``--load-hf DIR``: load an HF checkpoint into the same model, then
   ``--loaded-logits FILE`` and ``--reexport DIR``.
"""

import argparse
import json
import os

import torch


def sft_step(engine):
    from hf_common import MICRO

    from megatron_rl.data.packing import Sample, set_global_counts, split_microbatches
    from megatron_rl.training.forward_step import make_forward_step, sft_loss

    gen = torch.Generator().manual_seed(3)
    samples = [
        Sample(tokens=torch.randint(4, 100, (12,), generator=gen).tolist(), prompt_len=5, index=i)
        for i in range(8)
    ]
    from megatron.core import parallel_state as ps

    mine = samples[ps.get_data_parallel_rank() :: ps.get_data_parallel_world_size()]
    batches, length = split_microbatches(mine, MICRO, pad_multiple=4, length_of=samples)
    set_global_counts(batches, len(samples), sum(s.response_len for s in samples))
    result = engine.train_step(
        make_forward_step(sft_loss()),
        batches,
        seq_length=length,
        micro_batch_size=MICRO,
        loss_of=lambda o: o["loss"],
    )
    assert not result.skipped


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vpp-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-step", action="store_true")
    p.add_argument("--save-ckpt")
    p.add_argument("--export")
    p.add_argument("--logits")
    p.add_argument("--load-hf")
    p.add_argument("--loaded-logits")
    p.add_argument("--reexport")
    args = p.parse_args()

    from hf_common import build_engine, fixed_tokens, is_writer, megatron_logits, perturb_norms

    from megatron_rl.model.config import PRESETS
    from megatron_rl.training.checkpoint import save_checkpoint
    from megatron_rl.weight_sync.export import export_hf
    from megatron_rl.weight_sync.load_hf import load_hf_weights

    model = PRESETS["tiny"]
    engine = build_engine(
        args.tp, args.pp, args.ep, args.vpp_layers, optimizer=args.train_step, seed=args.seed
    )
    perturb_norms(engine)
    if args.train_step:
        engine.optimizer.reload_model_params()
        sft_step(engine)
    record = {"rank": torch.distributed.get_rank()}
    if args.save_ckpt:
        save_checkpoint(engine, args.save_ckpt, 1, {})
    tokens = fixed_tokens(model.vocab_size)
    if args.export:
        stats = export_hf(engine.chunks, model, args.export, max_shard_bytes=3_000_000)
        if stats is not None:
            record["export"] = {"files": stats.files, "tensors": stats.num_tensors}
    if args.logits:
        logits = megatron_logits(engine, tokens)
        if is_writer():
            torch.save({"tokens": tokens, "logits": logits}, args.logits)
    if args.load_hf:
        record["loaded"] = load_hf_weights(engine.chunks, engine.model_config, args.load_hf)
        if engine.optimizer is not None:  # the optimiser's fp32 main copies follow
            engine.optimizer.reload_model_params()
        if args.loaded_logits:
            logits = megatron_logits(engine, tokens)
            if is_writer():
                torch.save({"tokens": tokens, "logits": logits}, args.loaded_logits)
        if args.reexport:
            export_hf(engine.chunks, model, args.reexport)
    with open(os.path.join(args.out, f"rank{record['rank']}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
