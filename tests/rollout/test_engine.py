"""Generation engine (in process, bf16): batching is invisible to each request, seeds
reproduce, logprobs and routed experts are those of the model, SGLang's sampling rules."""

from __future__ import annotations

import time

import pytest
import torch
from transformers.utils import logging as hf_logging

from megatron_rl.inference.engine import GenerationEngine, GenerationRequest
from megatron_rl.inference.sampling import sample_next

hf_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = GenerationEngine(checkpoints.main, dtype="bf16", max_batch_size=16, seed=0)
    yield engine
    engine.close()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, 128, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def requests(n: int, **kw) -> list[GenerationRequest]:
    kw.setdefault("max_new_tokens", 12)
    return [
        GenerationRequest(rid=f"r{i}", input_ids=p, sampling_seed=1000 + i, return_logprob=True,
                          return_routed_experts=True, **kw)
        for i, p in enumerate(prompts(n))
    ]  # fmt: skip


def test_batched_equals_one_at_a_time(engine):
    # Mixed prompt lengths (left padding) and finish times (rows leave the batch).
    batch = requests(10, stop_token_ids=(7, 9, 11))
    together = engine.generate(batch)
    assert len({len(r.output_ids) for r in together}) > 1, (
        "want rows that finish at different steps"
    )
    for request, joint in zip(batch, together, strict=True):
        (alone,) = engine.generate([request])
        assert joint.output_ids == alone.output_ids
        assert joint.output_logprobs == alone.output_logprobs
        assert torch.equal(joint.routed_experts, alone.routed_experts)


def test_rows_of_one_prompt_share_a_prefill_and_get_what_they_would_alone(engine, monkeypatch):
    # A group of 4 samples of each of 2 prompts, plus a prompt of its own, with input
    # logprobs: prefill rows are shared (SGLang's prefix-cache hit) and nothing changes.
    group = [p for p in prompts(2, seed=7) for _ in range(4)] + prompts(1, seed=8)
    batch = [
        GenerationRequest(rid=f"g{i}", input_ids=p, sampling_seed=50 + i, max_new_tokens=6,
                          return_logprob=True, logprob_start_len=1, return_routed_experts=True)
        for i, p in enumerate(group)
    ]  # fmt: skip
    prefill_rows = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefill_rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting)
    together = engine.generate(batch)
    assert prefill_rows == [3], "one prefill row per distinct prompt"
    assert [r.cached_tokens for r in together] == [
        0 if i in (0, 4, 8) else len(group[i]) for i in range(9)
    ]
    assert len({tuple(r.output_ids) for r in together}) > 3, "samples of a prompt differ"
    for request, joint in zip(batch, together, strict=True):
        (alone,) = engine.generate([request])
        assert alone.cached_tokens == 0
        assert joint.output_ids == alone.output_ids
        assert joint.output_logprobs == alone.output_logprobs
        assert joint.input_logprobs == alone.input_logprobs
        assert torch.equal(joint.routed_experts, alone.routed_experts)


def test_a_burst_of_requests_forms_one_batch(checkpoints):
    # Requests arriving 5 ms apart for four times batch_wait_s (50 ms): the batch stays
    # open while they keep coming, so all of them run together.
    engine = GenerationEngine(checkpoints.main, dtype="bf16", max_batch_size=64, seed=0,
                              batch_wait_s=0.05, batch_max_wait_s=5.0)
    try:
        sizes = []
        run = engine._run_batch
        engine._run_batch = lambda rows: (sizes.append(len(rows)), run(rows))
        futures = []
        for request in requests(40, max_new_tokens=2):
            futures.append(engine.submit(request))
            time.sleep(0.005)
        for future in futures:
            future.result()
        assert sizes == [40]
    finally:
        engine.close()


def test_seeds_reproduce_and_differ(engine):
    first = engine.generate(requests(4))
    again = engine.generate(requests(4)[::-1])[::-1]  # another order, other batch neighbours
    assert [r.output_ids for r in first] == [r.output_ids for r in again]
    other = engine.generate(
        [GenerationRequest(rid="x", input_ids=prompts(1)[0], sampling_seed=5, max_new_tokens=12)]
    )
    assert other[0].output_ids != first[0].output_ids
    unseeded = [
        engine.generate([GenerationRequest(rid="u", input_ids=[5, 6], max_new_tokens=12)])[0]
        for _ in range(2)
    ]
    assert unseeded[0].output_ids != unseeded[1].output_ids


def test_logprobs_and_routes_match_a_forward_pass(engine, reference):
    for request, result in zip(batch := requests(6), engine.generate(batch), strict=True):
        ids = request.input_ids + result.output_ids
        logits, routes = reference(ids[:-1])  # the tokens fed forward: prompt + response - 1
        p = len(request.input_ids)
        expected = torch.log_softmax(logits[p - 1 :], -1).gather(
            -1, torch.tensor(result.output_ids)[:, None]
        )[:, 0]
        torch.testing.assert_close(
            torch.tensor(result.output_logprobs), expected, atol=1e-5, rtol=0
        )
        captured = result.routed_experts
        assert captured.shape == (len(ids) - 1, 4, 4) and captured.dtype == torch.int32
        assert not captured[:, 0].any(), "dense layer 0 is filled with zeros"
        assert torch.equal(captured[:, [1, 2, 3]].long(), routes.long())


def test_temperature_scaled_logprobs_like_sglang(engine, reference):
    (hot,) = engine.generate(requests(1, temperature=0.5))
    ids = hot.output_ids
    prompt = requests(1)[0].input_ids
    logits, _ = reference(prompt + ids[:-1])
    scaled = torch.log_softmax(logits[len(prompt) - 1 :] / 0.5, -1).gather(
        -1, torch.tensor(ids)[:, None]
    )[:, 0]
    torch.testing.assert_close(torch.tensor(hot.output_logprobs), scaled, atol=1e-5, rtol=0)
    engine.original_logprobs = True  # SGLANG_RETURN_ORIGINAL_LOGPROB: temperature-1 logprobs
    try:
        (orig,) = engine.generate(requests(1, temperature=0.5))
    finally:
        engine.original_logprobs = False
    assert orig.output_ids == ids
    plain = torch.log_softmax(logits[len(prompt) - 1 :], -1).gather(-1, torch.tensor(ids)[:, None])[
        :, 0
    ]
    torch.testing.assert_close(torch.tensor(orig.output_logprobs), plain, atol=1e-5, rtol=0)


def test_greedy_top_k_and_top_p(engine, reference):
    prompt = prompts(1, seed=3)[0]
    greedy = engine.generate(
        [GenerationRequest(rid="g", input_ids=prompt, temperature=0.0, max_new_tokens=8)]
    )[0]
    logits, _ = reference(prompt + greedy.output_ids[:-1])
    tail = logits[len(prompt) - 1 :]
    assert greedy.output_ids == tail.argmax(-1).tolist()
    # SGLang's greedy logprob is log_softmax of the raw logits.
    torch.testing.assert_close(
        torch.tensor(greedy.output_logprobs),
        torch.log_softmax(tail, -1).max(-1).values,
        atol=1e-5,
        rtol=0,
    )
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = engine.generate(
            [GenerationRequest(rid="k", input_ids=prompt, sampling_seed=3, max_new_tokens=8, **kw)]
        )
        assert out[0].output_ids == greedy.output_ids, kw


def test_stops_and_lengths(engine):
    prompt = prompts(1, seed=4)[0]
    base = GenerationRequest(
        rid="s", input_ids=prompt, sampling_seed=9, max_new_tokens=16, return_routed_experts=True
    )
    (free,) = engine.generate([base])
    assert free.finish_reason == {"type": "length", "length": 16} and len(free.output_ids) == 16
    stop = free.output_ids[5]
    first = free.output_ids.index(stop)
    (stopped,) = engine.generate(
        [GenerationRequest(**{**base.__dict__, "stop_token_ids": (stop,)})]
    )
    assert stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": stop}
    assert stopped.routed_experts.shape[0] == len(prompt) + first  # P + R - 1
    (empty,) = engine.generate([GenerationRequest(**{**base.__dict__, "max_new_tokens": 0})])
    assert empty.output_ids == [] and empty.routed_experts.shape[0] == len(prompt) - 1
    eos = next(iter(engine.eos_token_ids))
    (ended,) = engine.generate(
        [GenerationRequest(**{**base.__dict__, "stop_token_ids": (), "max_new_tokens": 400})]
    )
    assert (
        eos in ended.output_ids
        and ended.output_ids[-1] == eos
        and ended.finish_reason["type"] == "stop"
    )
    (ignored,) = engine.generate(
        [
            GenerationRequest(
                **{**base.__dict__, "max_new_tokens": len(ended.output_ids) + 3, "ignore_eos": True}
            )
        ]
    )
    assert ignored.output_ids[: len(ended.output_ids)] == ended.output_ids and len(
        ignored.output_ids
    ) > len(ended.output_ids)


def test_input_logprobs_from_start_len(engine, reference):
    prompt = prompts(1, seed=5)[0]
    (out,) = engine.generate(
        [
            GenerationRequest(
                rid="i",
                input_ids=prompt,
                max_new_tokens=1,
                return_logprob=True,
                logprob_start_len=2,
            )
        ]
    )
    logits, _ = reference(prompt)
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert out.input_logprobs[0] == pytest.approx(lp[1].item(), abs=1e-5)
    assert len(out.input_logprobs) == len(prompt) - 2


def test_sampler_never_leaves_the_truncated_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(4000)
    tokens, logprobs = sample_next(
        logits, temperatures=ones, top_ks=torch.full((4000,), 2), top_ps=ones, uniforms=uniforms
    )
    assert set(tokens.tolist()) == {0, 1}
    assert (
        abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    )  # renormalised over the kept two
    torch.testing.assert_close(
        logprobs, torch.log(torch.tensor([0.5, 0.3]))[tokens]
    )  # untruncated logprob
    tokens, _ = sample_next(
        logits, temperatures=ones, top_ks=-ones.long(), top_ps=ones * 0.7, uniforms=uniforms
    )
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = sample_next(
        logits, temperatures=ones, top_ks=-ones.long(), top_ps=ones, uniforms=uniforms
    )
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_bad_requests_are_refused_with_names(engine):
    cases = {
        "outside the vocabulary": dict(input_ids=[1, 128]),
        "input_ids is empty": dict(input_ids=[]),
        "max_new_tokens must be >= 0": dict(input_ids=[1], max_new_tokens=-1),
        "exceeds the context length": dict(input_ids=[1] * 4000, max_new_tokens=100),
        "top_k must be": dict(input_ids=[1], top_k=0),
        "top_p must be": dict(input_ids=[1], top_p=0.0),
        "temperature must be": dict(input_ids=[1], temperature=-0.1),
    }
    for phrase, kw in cases.items():
        with pytest.raises(ValueError, match=f"request 'bad'.*{phrase}"):
            engine.submit(GenerationRequest(rid="bad", **kw))
