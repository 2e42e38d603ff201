"""A data-parallel rank without samples takes part in the pi_old pass's collectives
instead of leaving the others waiting (see tests/workers/empty_rank.py)."""

import pytest
import torch
from torchrun_launch import WORKERS, run_torchrun


@pytest.mark.slow
def test_a_rank_without_samples_joins_the_pass(tmp_path):
    rank0, rank1 = run_torchrun(WORKERS / "empty_rank.py", 2, [], tmp_path, timeout=240)
    both, alone = rank0["both"], rank0["rank0_only"]
    assert rank1["rank0_only"]["logprobs"] == []
    # The empty rank ran as many (empty) micro-batches as rank 0, at rank 0's row length,
    # not at --seq-length.
    assert rank1["rank0_only"]["agreed"] == alone["agreed"]
    assert alone["agreed"]["microbatches"] == 2 and alone["agreed"]["length"] < 64
    for a, b in zip(alone["logprobs"], both["logprobs"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
