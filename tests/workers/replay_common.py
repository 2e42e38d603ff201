"""Helpers shared by the routing-replay workers (run under torchrun, gloo)."""

from __future__ import annotations

import functools

import torch


def samples_with_routes(count: int, seed: int, num_moe_layers: int, topk: int, num_experts: int):
    """Deterministic samples (same on every rank), each with its own random valid routes."""
    from megatron_rl.data.packing import Sample
    from megatron_rl.data.routes import compact

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        prompt = int(torch.randint(4, 12, (1,), generator=gen))
        response = int(torch.randint(2, 9, (1,), generator=gen))
        tokens = torch.randint(4, 100, (prompt + response,), generator=gen).tolist()
        scores = torch.rand(prompt + response - 1, num_moe_layers, num_experts, generator=gen)
        routes = compact(scores.argsort(dim=-1)[..., :topk], num_experts)
        samples.append(Sample(tokens=tokens, prompt_len=prompt, routes=routes, index=i))
    return samples


def _global_layer(router) -> int:
    """A router's global 0-based layer as megatron itself counts it (aux-loss logging):
    megatron-core up to 0.16 numbers an MTP layer's router past the decoder already;
    later releases number it from 1 within the MTP block, flag it ``is_mtp_layer`` and
    add ``num_layers``."""
    number = int(router.layer_number)
    if getattr(router, "is_mtp_layer", False):
        number += router.config.num_layers
    return number - 1


class RouterObserver:
    """The test's own forward hooks on every TopKRouter: what each router returned.

    ``wrap(forward_step)`` taps the data iterator so that a call made while the forward
    step runs knows its micro-batch key; calls made outside it (a forward recomputed in
    backward) carry ``key=None``."""

    def __init__(self, chunks) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        from megatron_rl.replay.binding import unwrap

        self.calls: list[dict] = []
        self.key: int | None = None
        self.in_forward = False
        for chunk in chunks:
            for module in unwrap(chunk).modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(functools.partial(self._hook, module))

    def _hook(self, router, module, inputs, output) -> None:
        self.calls.append({
            "layer": _global_layer(router),
            "key": self.key if self.in_forward else None,
            "map": output[1].detach().clone(),
            "probs": output[0].detach().clone(),
            "input": inputs[0].detach().clone(),
            "router": router,
        })

    def take(self) -> list[dict]:
        calls, self.calls = self.calls, []
        return calls

    def wrap(self, forward_step):
        observer = self

        class Tap:
            def __init__(self, iterator):
                self.iterator = iterator

            def __next__(self):
                batch = next(self.iterator)
                observer.key = batch.key
                return batch

        def step(data_iterator, model):
            observer.in_forward = True
            try:
                return forward_step(Tap(data_iterator), model)
            finally:
                observer.in_forward = False

        return step


def expected_map(routes: torch.Tensor, position: int, num_experts: int, tp_size: int,
                 tp_rank: int) -> torch.Tensor:
    """The ``[S/TP * B, E]`` routing map a router must return when replaying
    ``routes[:, :, position]`` (``routes`` [B, S, L, k]): the rank's contiguous sequence
    slice, flattened sequence-major as megatron's ``[S, B]`` activations are."""
    B, S = routes.shape[:2]
    piece = S // tp_size
    ids = routes[:, tp_rank * piece:(tp_rank + 1) * piece, position].long()  # [B, S/TP, k]
    onehot = torch.zeros(B, piece, num_experts, dtype=torch.bool)
    onehot.scatter_(2, ids, True)
    return onehot.permute(1, 0, 2).reshape(piece * B, num_experts)


def per_sample_loss(store: dict | None = None):
    """Loss of the response tokens that also returns each sample's summed logprob and the
    logits (last pipeline stage)."""
    from megatron_rl.training.token_logprobs import token_logprobs

    def loss_fn(batch, logits):
        logprobs = token_logprobs(logits, batch.labels)
        mask = batch.loss_mask
        loss = -(logprobs * mask).sum() / max(batch.global_num_tokens, 1)
        sums = {}
        for local, index in enumerate(batch.sample_index):
            chosen = (batch.sample_ids == local) & mask
            sums[index] = float((logprobs.detach() * chosen).sum())
        return loss, {"logits": logits.detach().clone(), "per_sample": sums}

    return loss_fn
