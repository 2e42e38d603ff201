"""The engine's bf16 products (inference.bf16_gemm): a GPU's fp32 accumulation rounded once,
batch-invariant (checked per shape on this machine, fp64 where fp32 fails the check),
scoped to the thread that entered the mode and to the modules that compute products, with
weights widened once per version."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

from megatron_rl.inference import bf16_gemm
from megatron_rl.inference.bf16_gemm import Bf16Products, padded_rows, scope
from megatron_rl.inference.engine import GenerationEngine, GenerationRequest


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def in_a_batch(x, w, b=None):
    """``x``'s rows times ``w`` in fp32, computed at the head of a 64-row batch (64 rows is
    past every padding the mode applies), rounded once to bf16."""
    batch = torch.cat([x, bf16(64 - x.shape[0], x.shape[1], seed=99)]).float()
    out = F.linear(batch, w.float(), None if b is None else b.float())
    return out[: x.shape[0]].bfloat16()


def exact(x, w, b=None):
    """The correctly rounded bf16 product (fp64 sums of exact products, rounded once)."""
    return bf16_gemm.to_bf16(F.linear(x.double(), w.double(), None if b is None else b.double()))


def nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Brute force: of the bf16 neighbours of fp64 ``x``, the nearest."""
    guess = x.float().bfloat16()
    bits = guess.view(torch.int16)
    candidates = torch.stack([(bits + d).view(torch.bfloat16) for d in (-1, 0, 1)])
    error = (candidates.double() - x).abs()
    best = error.argmin(0)  # random data has no ties
    return candidates.gather(0, best[None])[0]


def test_products_accumulate_in_fp32_and_round_once():
    x, w, b = bf16(7, 96), bf16(40, 96, seed=1), bf16(40, seed=2)
    q, k = bf16(2, 4, 5, 16, seed=3), bf16(2, 4, 9, 16, seed=4)
    a, experts = bf16(10, 96, seed=5), bf16(3, 96, 24, seed=6)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # group 1 gets no row
    mode = Bf16Products()
    with mode:
        linear, attention = F.linear(x, w, b), torch.matmul(q, k.transpose(2, 3))
        grouped = torch._grouped_mm(a, experts, offs=offs)
        stacked = torch._grouped_mm(bf16(3, 5, 96, seed=7), experts)
    assert mode.products == 4
    assert {t.dtype for t in (linear, attention, grouped, stacked)} == {torch.bfloat16}
    # fp32 where the shape passed its check on this machine (fp64 where it did not).
    widened = {key[1] for key in mode.fp64_shapes}
    product = exact if (40, 96) in widened else in_a_batch
    assert torch.equal(linear, product(x, w, b))
    # A batch of independent products (attention, 3D x 3D grouped): fp32 as called.
    assert torch.equal(attention, (q.float() @ k.float().transpose(2, 3)).bfloat16())
    assert torch.equal(stacked, torch.bmm(bf16(3, 5, 96, seed=7).float(), experts.float()).bfloat16())
    product = exact if (96, 24) in widened else in_a_batch
    expected = torch.cat([product(a[:4], experts[0].T), product(a[4:], experts[2].T)])
    assert torch.equal(grouped, expected)


def test_fp64_results_are_rounded_to_bf16_once():
    tricky = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 3.0, float("inf"),
                           float("-inf"), 0.0], dtype=torch.float64)
    assert bf16_gemm.to_bf16(tricky).tolist() == [1.0078125, -1.0078125, 3.0, float("inf"),
                                                  float("-inf"), 0.0]
    assert tricky.bfloat16()[0].item() == 1.0  # torch's own conversion rounds twice
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = x * torch.exp2(torch.randint(-20, 20, (20000,)).double())
    assert torch.equal(bf16_gemm.to_bf16(x), nearest_bf16(x))


def test_a_shape_whose_fp32_rows_fail_the_check_is_computed_in_fp64(monkeypatch, caplog):
    checked = []
    monkeypatch.setattr(bf16_gemm, "row_invariant", lambda *a: checked.append(a) or False)
    x, w = bf16(33, 256), bf16(200, 256, seed=1)
    a, experts = bf16(10, 96, seed=5), bf16(3, 96, 24, seed=6)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    mode = Bf16Products()
    with caplog.at_level("WARNING", logger=bf16_gemm.__name__), mode:
        full = F.linear(x, w)
        alone = F.linear(x[:1], w)
        grouped = torch._grouped_mm(a, experts, offs=offs)
    assert len(checked) == 2  # once per shape, not per call
    assert [key[1] for key in mode.fp64_shapes] == [(200, 256), (96, 24)]
    assert "200x256" in caplog.text and "computed in fp64" in caplog.text
    assert torch.equal(full, exact(x, w)) and torch.equal(alone, full[:1])
    assert torch.equal(grouped, torch.cat([exact(a[:4], experts[0].T), exact(a[4:], experts[2].T)]))


def test_the_check_runs_the_products_rows_alone_and_in_batches():
    w = bf16(64, 128, seed=1).float()
    verdict = bf16_gemm.row_invariant(w, None, linear=True)  # this machine's kernels
    # Where the check passes, rows hold their bits at offsets and sizes it did not sample.
    rows = bf16(700, 128, seed=4).float()
    full = bf16_gemm._row_product(rows, w, None, linear=True)
    unsampled = all(torch.equal(bf16_gemm._row_product(rows[s:s + m], w, None, linear=True),
                                full[s:s + m]) for m in (45, 50, 77, 99, 333) for s in (3, 101))
    assert unsampled or not verdict
    assert [padded_rows(m) for m in (1, 11, 12, 13, 16, 130)] == [12, 12, 12, 16, 16, 132]

    calls = []

    def varies(rows, right, bias, linear):  # sums in another order for every batch size
        calls.append(rows.shape[0])
        return F.linear(rows, right) + rows.shape[0] * 1e-3

    original = bf16_gemm._row_product
    try:
        bf16_gemm._row_product = varies
        assert not bf16_gemm.row_invariant(w, None, linear=True)
    finally:
        bf16_gemm._row_product = original
    assert calls[0] == bf16_gemm.CHECK_ROWS and 1 in calls


def test_wide_products_are_checked_and_computed_in_chunks_of_the_checked_size():
    x, w = bf16(600, 32), bf16(65536, 32, seed=1)  # 65,536 outputs: chunks of 256 rows
    assert bf16_gemm.check_rows(65536) == 256 and bf16_gemm.check_rows(128) == 2048
    mode = Bf16Products()
    with mode:
        full = F.linear(x, w)
        alone = F.linear(x[300:301], w)
    assert torch.equal(alone, full[300:301])
    if not mode.fp64_shapes:
        chunks = [in_a_batch(x[i:i + 32], w) for i in range(512, 600, 32)]
        assert torch.equal(full[512:], torch.cat(chunks)[:88])


def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    x, w = bf16(33, 256), bf16(200, 256, seed=1)
    with Bf16Products():
        full = F.linear(x, w)
        for rows in (1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 17):
            assert torch.equal(F.linear(x[:rows], w), full[:rows])
        assert torch.equal(F.linear(x[-1:], w), full[-1:])


def test_like_a_gpu_fp32_accumulation_rounded_once(monkeypatch):
    """fp32 accumulation rounded once: a GPU's bf16 GEMM. Where a shape is computed in fp64
    instead, the result differs from fp32 accumulation by one bf16 step, rarely."""
    x, w = bf16(64, 512), bf16(256, 512, seed=1)
    fp32 = (x.float() @ w.float().T).bfloat16().float()
    mode = Bf16Products()
    with mode:
        ours = F.linear(x, w).float()
    if not mode.fp64_shapes:
        assert torch.equal(ours, fp32)
    monkeypatch.setattr(bf16_gemm, "row_invariant", lambda *a: False)
    with Bf16Products():
        wide = F.linear(x, w).float()
    step = torch.finfo(torch.bfloat16).eps * fp32.abs().clamp(min=1e-30)
    differs = wide != fp32
    assert differs.float().mean() < 0.02
    assert ((wide - fp32).abs() <= step)[differs].all()


def test_other_dtypes_and_other_threads_run_as_called():
    x, w = bf16(6, 32), bf16(16, 32, seed=1)
    mode = Bf16Products()
    seen = []
    with mode:
        fp32 = F.linear(x.float(), w.float())
        mixed_out = torch.empty(6, 16, dtype=torch.bfloat16)
        torch.mm(x, w.T, out=mixed_out)
        worker = threading.Thread(target=lambda: seen.append(F.linear(x, w)))
        worker.start()
        worker.join()
    assert mode.products == 0
    assert torch.equal(fp32, x.float() @ w.float().T)
    assert len(seen) == 1 and seen[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_engine_computes_its_bf16_products_this_way(checkpoints, dtype):
    engine = GenerationEngine(checkpoints.main, dtype=dtype, max_batch_size=4, seed=0)
    try:
        engine.generate([GenerationRequest(rid="r", input_ids=[5, 6, 7], max_new_tokens=3)])
        products = getattr(engine._products, "products", 0)
        assert (products > 0) == (dtype == "bf16")
    finally:
        engine.close()


def test_scope_covers_the_products_and_follows_weight_updates():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 8)).bfloat16()
    mode = scope(model)
    x = bf16(5, 32)
    with torch.no_grad():
        out = model(x)
        assert mode.products == 2
        hidden = F.gelu(in_a_batch(x, model[0].weight, model[0].bias))
        assert torch.equal(out, in_a_batch(hidden, model[2].weight, model[2].bias))
        # A weight loaded in place is widened again, not served from the cache.
        model[2].weight.copy_(bf16(8, 16, seed=9))
        again = model(x)
        assert torch.equal(again, in_a_batch(hidden, model[2].weight, model[2].bias))
    # Outside the scoped modules nothing is intercepted.
    torch.nn.functional.linear(x, model[0].weight)
    assert mode.products == 4
    with pytest.raises(ValueError, match="no module that computes products"):
        scope(torch.nn.GELU())
