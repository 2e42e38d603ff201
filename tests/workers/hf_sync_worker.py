"""Worker: WeightSync from an EP=2 trainer to a running embedded rollout server.

Syncs three versions (the model changes between them), then checks on rank 0 that the
server reports the last version and that its logprobs of a sampled response equal the
trainer's own (the server runs fp32). Then two failures: an export whose config does not
fit the model, and a sync the server refuses (a model of another shape); both must raise
on every rank. Each rank writes what it saw.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


def server_logprobs(url: str, api_key: str, prompt: list[int]) -> dict:
    import httpx

    body = {
        "input_ids": prompt,
        "return_logprob": True,
        "sampling_params": {
            "max_new_tokens": 9,
            "temperature": 1.0,
            "sampling_seed": 5,
            "ignore_eos": True,
        },
    }
    response = httpx.post(
        f"{url}/generate", json=body, timeout=60, headers={"Authorization": f"Bearer {api_key}"}
    )
    response.raise_for_status()
    meta = response.json()["meta_info"]
    return {
        "output_ids": response.json()["output_ids"],
        "logprobs": [lp for lp, _, _ in meta["output_token_logprobs"]],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--dir", required=True)
    args = p.parse_args()

    import httpx
    from hf_common import build_engine, megatron_logits, perturb_norms

    from megatron_rl.model.config import PRESETS
    from megatron_rl.model.provider import build_model
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.rollout.config import RolloutConfig
    from megatron_rl.weight_sync.export import export_hf
    from megatron_rl.weight_sync.hf_config import ModelShape
    from megatron_rl.weight_sync.sync import WeightSync, WeightSyncError

    model = PRESETS["tiny"]
    engine = build_engine(1, 1, 2, None)
    perturb_norms(engine)
    rank = dist.get_rank()
    client = (
        RolloutClient(RolloutConfig(urls=(args.url,), api_key=args.api_key),
                      ModelShape.from_model_config(model))
        if rank == 0 else None
    )  # fmt: skip
    weights_dir = os.path.join(args.dir, "weights")
    sync = WeightSync(engine, model, None, weights_dir, keep=2, client=client)
    record = {"rank": rank, "results": []}
    # As at start-up (before any server holds these weights): export only.
    path = sync.export("0")
    record["export_complete"] = os.path.isfile(os.path.join(path, "config.json"))
    for version in ("1", "2", "3"):
        with torch.no_grad():  # a different model for every version
            for param in engine.chunks[0].parameters():
                param.mul_(1.05)
        result = sync.sync(version)
        record["results"].append(
            {
                "version": result.version,
                "path": result.path,
                "export_s": result.export_s,
                "update_s": result.update_s,
                "servers": result.servers,
            }
        )
    record["dirs"] = sorted(os.listdir(weights_dir))
    headers = {"Authorization": f"Bearer {args.api_key}"}
    # The server now serves the trainer's weights: same logprobs for a sampled response.
    sampled = [None]
    if rank == 0:
        info = httpx.get(f"{args.url}/get_model_info", headers=headers, timeout=10).json()
        record["served_version"] = info["weight_version"]
        record["client_version"] = client.servers.weight_version
        sampled = [server_logprobs(args.url, args.api_key, [5, 17, 40, 33, 21, 9, 60])]
    dist.broadcast_object_list(sampled, src=0)
    prompt = [5, 17, 40, 33, 21, 9, 60]
    tokens = torch.tensor([prompt + sampled[0]["output_ids"]])
    logits = megatron_logits(engine, tokens[:, :-1], micro=1)[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = tokens[0, len(prompt) :]
    trainer = logprobs[len(prompt) - 1 :].gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    record["logprob_max_diff"] = float((trainer - torch.tensor(sampled[0]["logprobs"])).abs().max())
    # A config that does not fit the model: refused before anything is sent or written.
    try:
        export_hf(
            engine.chunks, model.replace(moe_ffn_hidden_size=64), os.path.join(args.dir, "bad")
        )
        record["bad_export_error"] = None
    except ValueError as exc:
        record["bad_export_error"] = str(exc)
    # A model of another shape: the server refuses it and keeps serving version 3.
    other_config = model.replace(num_experts=8)
    other = build_model(other_config, engine.parallel)
    other_sync = WeightSync(other, other_config, None, weights_dir, keep=2, client=client)
    other_sync.version = sync.version
    try:
        other_sync.sync("4")
        record["refusal"] = None
    except WeightSyncError as exc:
        record["refusal"] = str(exc)
    if rank == 0:
        info = httpx.get(f"{args.url}/get_model_info", headers=headers, timeout=10).json()
        record["served_after_refusal"] = info["weight_version"]
    record["dirs_after_refusal"] = sorted(os.listdir(weights_dir))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
