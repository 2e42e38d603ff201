"""The embedded server's side of a distributed update, in process (no group): checkpoint
tensors land in the right slices of transformers' fused expert parameters, and bad ones are
refused by name before anything changes."""

import pytest
import torch
from ws_support import hf_tensors

from megatron_rl.model.config import PRESETS


@pytest.fixture(scope="module")
def engine_and_other(tmp_path_factory):
    from megatron_rl.inference.engine import GenerationEngine
    from megatron_rl.weight_sync.hf_config import save_random_checkpoint

    base = tmp_path_factory.mktemp("server_update")
    served = save_random_checkpoint(PRESETS["tiny"], base / "a", seed=0)
    other = save_random_checkpoint(PRESETS["tiny"], base / "b", seed=1)
    engine = GenerationEngine(served, dtype="bf16", load_tokenizer_files=False)
    yield engine, other
    engine.close()


def test_checkpoint_tensors_fill_the_served_parameters(engine_and_other):
    from megatron_rl.inference.hf_model import load_model
    from megatron_rl.inference.weight_update import DistributedUpdates, UpdateRefused

    engine, other = engine_and_other
    updates = DistributedUpdates(engine)
    tensors = sorted(hf_tensors(other).items())
    assert {n for n, _ in tensors} == set(updates.slots)  # every checkpoint tensor has a slot
    before = updates.checksum()["sha256"]
    # Two "buckets", as the trainer sends them; nothing is served until the load.
    updates._hold(tensors[: len(tensors) // 2])
    updates._hold(tensors[len(tensors) // 2 :])
    assert updates.checksum()["sha256"] == before
    assert engine.update_weights_from_tensors(updates.held, "b") == "b"
    # What the disk path loads from the same checkpoint, bit for bit (fp32 -> bf16 alike).
    expected = load_model(str(other), torch.bfloat16).state_dict()
    served = engine.model.state_dict()
    assert served.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name
    # Refusals name the tensor; the served weights stay.
    after = updates.checksum()["sha256"]
    with pytest.raises(UpdateRefused, match=r"model.norm.weight: shape \[3\], the served"):
        DistributedUpdates(engine)._hold([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(UpdateRefused, match="model.layers.1.mlp.experts.99.up_proj.weight: not"):
        DistributedUpdates(engine)._hold([("model.layers.1.mlp.experts.99.up_proj.weight",
                                           torch.zeros(128, 128))])  # fmt: skip
    assert updates.checksum() == {"weight_version": "b", "sha256": after} and after != before


class _NaNGroup:
    """Stands in for the weight-update group: every broadcast delivers NaN."""

    device = torch.device("cpu")

    def broadcast(self, buffer: torch.Tensor):
        buffer.fill_(float("nan"))
        return self

    def wait(self) -> None:
        return None

    def close(self) -> None:
        return None


def test_non_finite_weights_are_refused_as_a_400_not_a_500(engine_and_other):
    """FP8 quantization refuses non-finite weights; through the distributed path that
    is the request's fault (UpdateRefused -> 400), and the served bits stay."""
    from megatron_rl.inference.engine import GenerationEngine
    from megatron_rl.inference.weight_update import (
        DistributedUpdates,
        UpdateFromDistributedIn,
        UpdateRefused,
    )

    _, other = engine_and_other
    engine = GenerationEngine(other, dtype="bf16", quantization="fp8",
                              load_tokenizer_files=False)
    try:
        updates = DistributedUpdates(engine)
        updates.groups["g"] = _NaNGroup()
        before = updates.checksum()
        body = UpdateFromDistributedIn(names=["model.layers.1.mlp.experts.0.up_proj.weight"],
                                       dtypes=["float32"], shapes=[[128, 128]], group_name="g",
                                       weight_version="nan")
        with pytest.raises(UpdateRefused, match="unchanged"):
            updates.update(body)
        assert updates.checksum() == before
    finally:
        engine.close()
