"""The engine's bf16 products (inference.bf16_gemm): correctly rounded, batch-invariant,
a GPU's numerics to the last bit, scoped to the thread that entered the mode and to the
modules that compute products, with weights widened once per version."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

from megatron_rl.inference.bf16_gemm import Bf16Products, scope
from megatron_rl.inference.engine import GenerationEngine, GenerationRequest


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_products_are_the_exact_product_rounded_once():
    x, w, b = bf16(7, 96), bf16(40, 96, seed=1), bf16(40, seed=2)
    q, k = bf16(2, 4, 5, 16, seed=3), bf16(2, 4, 9, 16, seed=4)
    a, experts = bf16(10, 96, seed=5), bf16(3, 96, 24, seed=6)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # group 1 gets no row
    mode = Bf16Products()
    with mode:
        linear, attention = F.linear(x, w, b), torch.matmul(q, k.transpose(2, 3))
        grouped = torch._grouped_mm(a, experts, offs=offs)
    assert mode.products == 3
    assert linear.dtype == attention.dtype == grouped.dtype == torch.bfloat16
    assert torch.equal(linear, (x.double() @ w.double().T + b.double()).bfloat16())
    # A batch of independent products (attention): fp32, a GPU's accumulation.
    assert torch.equal(attention, (q.float() @ k.float().transpose(2, 3)).bfloat16())
    expected = torch.cat([a[:4].double() @ experts[0].double(),
                          a[4:].double() @ experts[2].double()]).bfloat16()
    assert torch.equal(grouped, expected)


def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    x, w = bf16(33, 256), bf16(200, 256, seed=1)
    with Bf16Products():
        full = F.linear(x, w)
        for rows in (1, 2, 5, 17):
            assert torch.equal(F.linear(x[:rows], w), full[:rows])
        assert torch.equal(F.linear(x[-1:], w), full[-1:])


def test_like_a_gpu_fp32_accumulation_to_one_rounding_step():
    """Where fp32 accumulation rounds differently, it is by one bf16 step, rarely."""
    x, w = bf16(64, 512), bf16(256, 512, seed=1)
    with Bf16Products():
        ours = F.linear(x, w).float()
    fp32 = (x.float() @ w.float().T).bfloat16().float()
    step = torch.finfo(torch.bfloat16).eps * fp32.abs().clamp(min=1e-30)
    differs = ours != fp32
    assert differs.float().mean() < 0.02
    assert ((ours - fp32).abs() <= step)[differs].all()


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
        hidden = torch.nn.functional.gelu(
            (x.double() @ model[0].weight.double().T + model[0].bias.double()).bfloat16())
        expected = (hidden.double() @ model[2].weight.double().T
                    + model[2].bias.double()).bfloat16()
        assert torch.equal(out, expected)
        # A weight loaded in place is widened again, not served from the cache.
        model[2].weight.copy_(bf16(8, 16, seed=9))
        again = model(x)
        assert torch.equal(again, (hidden.double() @ model[2].weight.double().T
                                   + model[2].bias.double()).bfloat16())
    # Outside the scoped modules nothing is intercepted.
    torch.nn.functional.linear(x, model[0].weight)
    assert mode.products == 4
    with pytest.raises(ValueError, match="no module that computes products"):
        scope(torch.nn.GELU())
