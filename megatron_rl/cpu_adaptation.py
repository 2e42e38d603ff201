"""Run megatron-core's real modules on a CPU-only machine.

megatron-core has no CPU code path: it assumes a CUDA device in a handful of places
(device arguments, streams, the CUDA RNG, tensor type strings). Every redirection this
project needs lives in this module, each in one named function that says why, and all
of them are applied together by :func:`activate` -- only when CUDA is unavailable, so a
GPU machine runs megatron-core untouched. Nothing here edits installed files; all of it
is reverted by :func:`deactivate` (tests use this to prove the adaptation is the only
difference).

The adaptations, found by running GPTModel (MoE), DistributedDataParallel, the megatron
optimizers, the pipeline schedules and dist_checkpointing under torchrun with gloo:

* ``_redirect_cuda_devices``: tensor factories (``torch.zeros``, ``Tensor.new_zeros``,
  ...) and ``Tensor.to()`` calls that name ``"cuda"`` or a device index are rewritten to
  the CPU, and ``Tensor.cuda()`` returns the tensor itself. Only the functions that take a
  device are wrapped, not every torch call: a process-wide ``TorchFunctionMode`` did the
  same and cost about 8% of every trainer pass, since each operation of the model went
  through it. Each rewrite is counted by call site (:func:`redirected_sites`), which
  shows where megatron-core still names CUDA: with megatron-core 0.16-0.19 only its
  optimiser (construction, gradient norm and clipping) and the pipeline schedules'
  token counter; the model's forward and backward name none (they ask
  ``torch.cuda.current_device()``, answered below).
* ``_cpu_device_queries``: ``torch.cuda.current_device()`` and friends answer as a
  single-device machine would, so the values they feed into factories stay valid.
* ``_cpu_streams_and_events``: streams, events and synchronisation are no-ops (the CPU
  executes in program order).
* ``_cpu_rng``: megatron's CUDA RNG tracker forks the CPU generator instead.
* ``_cuda_type_strings``: ``Tensor.type()`` reports the CUDA type names that megatron's
  optimizers and gradient clipping assert on.

:func:`activate` is called explicitly by the entry points (``pretrain_rl.py``) and, as a
no-op when already active, by :func:`megatron_rl.distributed.init_distributed`, so that
any program that starts megatron's parallel state on a CPU gets it.
* ``_moe_utils_without_transformer_engine``: megatron-core 0.16 references
  ``te_general_gemm`` in router gating without defining it when Transformer Engine is
  missing.
* ``_alltoall_split_sizes_as_lists``: gloo's ``all_to_all_single`` rejects the numpy
  split sizes that the alltoall token dispatcher passes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

# (owner, attribute name, original value) for everything activate() replaced.
_replaced: list[tuple[Any, str, Any]] = []
_active = False
# "file:line function" of each caller whose CUDA device or type name was rewritten.
_sites: collections.Counter[str] = collections.Counter()

# The torch functions and Tensor methods that take a ``device`` keyword (the factories).
# megatron-core 0.16-0.19 calls zeros, tensor and empty with device="cuda"; the others are
# wrapped so that a megatron release that starts using them also runs.
_TORCH_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "range", "linspace",
    "logspace", "eye", "rand", "randn", "randint", "randperm", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "empty_strided",
    "scalar_tensor", "tril_indices", "triu_indices",
)  # fmt: skip
_TENSOR_FACTORIES = ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def is_active() -> bool:
    """Whether the CPU adaptation is currently applied."""
    return _active


def redirected_sites() -> dict[str, int]:
    """How many times each call site (``"path:line function"``, the path from the
    package on) had a CUDA device or type name rewritten since :func:`activate` or the
    last :func:`reset_sites`."""
    return dict(_sites)


def reset_sites() -> None:
    _sites.clear()


def _count_site(depth: int = 2) -> None:
    """Count the caller ``depth`` frames up (only on a rewrite, which is rare)."""
    frame = sys._getframe(depth)
    path = frame.f_code.co_filename
    path = path.rsplit("site-packages/", 1)[-1]
    _sites[f"{path}:{frame.f_lineno} {frame.f_code.co_name}"] += 1


def needed() -> bool:
    """The adaptation applies only where CUDA is absent."""
    return not torch.cuda.is_available()


def _replace(owner: Any, name: str, value: Any) -> None:
    _replaced.append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _factory_on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
            _count_site()
        return factory(*args, **kwargs)

    return on_cpu


def _tensor_to_on_cpu(to: Callable) -> Callable:
    @functools.wraps(to)
    def on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
            _count_site()
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
            _count_site()
        return to(self, *args, **kwargs)

    return on_cpu


def _tensor_type_named_cuda(type_: Callable) -> Callable:
    @functools.wraps(type_)
    def cuda_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # a cast, not a query
            return type_(self, *args, **kwargs)
        name = type_(self)
        if name in _CUDA_TYPE_NAMES:
            _count_site()
            return _CUDA_TYPE_NAMES[name]
        return name

    return cuda_name


def _redirect_cuda_devices() -> None:
    """megatron creates tensors with ``device="cuda"`` / ``torch.cuda.current_device()``
    and moves them with ``.cuda()``; on CPU all of these must land on the CPU."""
    for name in _TORCH_FACTORIES:
        _replace(torch, name, _factory_on_cpu(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        _replace(torch.Tensor, name, _factory_on_cpu(getattr(torch.Tensor, name)))
    _replace(torch.Tensor, "to", _tensor_to_on_cpu(torch.Tensor.to))
    _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    _replace(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)


def _cuda_type_strings() -> None:
    """``Tensor.type()`` with no argument returns the CUDA name, because megatron's
    optimizers and clip_grads assert ``'torch.cuda.FloatTensor'``."""
    _replace(torch.Tensor, "type", _tensor_type_named_cuda(torch.Tensor.type))


def _cpu_device_queries() -> None:
    """Answer device queries as a one-device machine would."""
    # A device object rather than an index: megatron passes it straight to factories,
    # also inside autograd backward functions, where the device mode does not apply.
    _replace(torch.cuda, "current_device", lambda: torch.device("cpu"))
    _replace(torch.cuda, "device_count", lambda: 1)
    _replace(torch.cuda, "set_device", lambda device: None)
    _replace(torch.cuda, "empty_cache", lambda: None)
    _replace(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    _replace(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    _replace(torch.cuda, "get_device_capability", lambda *a, **k: (0, 0))


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: the CPU runs everything in program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _NoEvent:
        return _NoEvent()

    def query(self) -> bool:
        return True


class _NoEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_streams_and_events() -> None:
    """The alltoall dispatcher, DDP's overlapped reduce and p2p use CUDA streams."""
    _replace(torch.cuda, "Stream", _NoStream)
    _replace(torch.cuda, "Event", _NoEvent)
    _replace(torch.cuda, "current_stream", lambda *a, **k: _NoStream())
    _replace(torch.cuda, "default_stream", lambda *a, **k: _NoStream())
    _replace(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _replace(torch.cuda, "synchronize", lambda *a, **k: None)


def _cpu_rng() -> None:
    """megatron's RNG tracker forks the CUDA generator (dropout, initialisation); on CPU
    the tracker forks the CPU generator, which keeps its semantics."""
    from megatron.core.tensor_parallel import random as mrandom

    _replace(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    _replace(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(seed))
    _replace(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(
        mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)
    )


def _moe_utils_without_transformer_engine() -> None:
    """megatron-core 0.16.1 calls ``te_general_gemm`` in ``router_gating_linear`` but only
    defines it when Transformer Engine imports; without TE the router raises NameError."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        _replace(moe_utils, "te_general_gemm", None)


def _alltoall_split_sizes_as_lists() -> None:
    """The alltoall dispatcher passes split sizes as numpy arrays; NCCL's binding accepts
    them, gloo's ``all_to_all_single`` requires lists of ints."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          *args, **kwargs):
        return original(output, input, _as_int_list(output_split_sizes),
                        _as_int_list(input_split_sizes), *args, **kwargs)

    _replace(dist, "all_to_all_single", all_to_all_single)


def _as_int_list(sizes: Any) -> Any:
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


_ADAPTATIONS: tuple[Callable[[], None], ...] = (
    _redirect_cuda_devices,
    _cuda_type_strings,
    _cpu_device_queries,
    _cpu_streams_and_events,
    _cpu_rng,
    _moe_utils_without_transformer_engine,
    _alltoall_split_sizes_as_lists,
)


def activate(force: bool = False) -> bool:
    """Apply every adaptation if CUDA is unavailable (or ``force``). Idempotent.

    Returns whether the adaptation is active afterwards."""
    global _active
    if is_active():
        return True
    if not (force or needed()):
        return False
    for adaptation in _ADAPTATIONS:
        adaptation()
    _active = True
    logger.info("megatron-core CPU adaptation active (%d redirections)", len(_replaced))
    return True


def deactivate() -> None:
    """Undo :func:`activate`."""
    global _active
    if not _active:
        return
    _active = False
    while _replaced:
        owner, name, value = _replaced.pop()
        setattr(owner, name, value)
