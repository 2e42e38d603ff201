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

* ``_redirect_cuda_devices``: tensor factories and ``.to()`` calls that name ``"cuda"``
  or a device index are rewritten to the CPU by a ``TorchFunctionMode``, and
  ``Tensor.cuda()`` returns the tensor itself. The mode is torch's own mechanism, so it
  composes with ``with torch.device(...)`` contexts (which find factories by identity:
  replacing ``torch.tensor`` & co. by Python wrappers instead left transformers' rotary
  buffers uninitialised when a Hugging Face model was loaded in the same process). Its
  Python hook on every torch call costs ~8% of a trainer pass, so the model's forward
  and the loss run with it suspended (:func:`device_mode_suspended`): they name no CUDA
  device (megatron asks ``torch.cuda.current_device()``, answered below), which the
  parallel-layout tests prove on every layout by running them that way.
* ``_cpu_device_queries``: ``torch.cuda.current_device()`` and friends answer as a
  single-device machine would, so the values they feed into factories stay valid.
* ``_cpu_streams_and_events``: streams, events and synchronisation are no-ops (the CPU
  executes in program order).
* ``_cpu_rng``: megatron's CUDA RNG tracker forks the CPU generator instead.
* ``_cuda_type_strings``: ``Tensor.type()`` reports the CUDA type names that megatron's
  optimizers and gradient clipping assert on.
* ``_moe_utils_without_transformer_engine``: megatron-core 0.16 references
  ``te_general_gemm`` in router gating without defining it when Transformer Engine is
  missing.
* ``_alltoall_split_sizes_as_lists``: gloo's ``all_to_all_single`` rejects the numpy
  split sizes that the alltoall token dispatcher passes.
* ``_in_process_save_results``: dist_checkpointing's writer hands its results over a
  queue served by a spawned ``multiprocessing.Manager`` process, which imports torch to
  unpickle them -- 1.7 s at every process's first save and ~0.3 GB while it lives (a CPU
  machine's short runs and tests pay it on every launch). This project saves
  synchronously, where that queue never leaves the saving process: an in-process queue
  carries the same results.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode

logger = logging.getLogger(__name__)

# (owner, attribute name, original value) for everything activate() replaced.
_replaced: list[tuple[Any, str, Any]] = []
_mode: TorchFunctionMode | None = None
# "module:function" -> calls the device mode rewrote there since activate().
_redirected: collections.Counter[str] = collections.Counter()

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
    return _mode is not None


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


def redirect_sites() -> dict[str, int]:
    """Where the device mode rewrote a call since :func:`activate`, as
    ``{"module:function": calls}``: the places that still need it (megatron-core naming a
    CUDA device or type). Everything else pays only the mode's hook."""
    return dict(_redirected)


def _count_redirect() -> None:
    """Charge a rewrite to the first caller outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == __name__ or module == "torch" or module.startswith("torch.")):
            break
        frame = frame.f_back
    site = f"{frame.f_globals.get('__name__')}:{frame.f_code.co_name}" if frame else "?"
    _redirected[site] += 1


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
            _count_redirect()
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
            _count_redirect()
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name in _CUDA_TYPE_NAMES:
                _count_redirect()
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Run a block without the device-redirect mode (a no-op where the adaptation is not
    active or another mode was entered above it). For code known not to name CUDA
    devices: the model's forward and the loss. A CUDA device named there anyway fails
    loudly ("Torch not compiled with CUDA enabled"), it is never silently mis-placed."""
    mode = _mode
    if mode is None or _get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def _redirect_cuda_devices() -> None:
    """megatron creates tensors with ``device="cuda"`` / ``torch.cuda.current_device()``
    and moves them with ``.cuda()``; on CPU all of these must land on the CPU."""
    global _mode
    _mode = _CpuDeviceMode()
    _redirected.clear()
    _mode.__enter__()
    _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    _replace(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)


def _cuda_type_strings() -> None:
    """Handled inside the device mode: ``Tensor.type()`` with no argument returns the CUDA
    name, because megatron's optimizers and clip_grads assert ``'torch.cuda.FloatTensor'``.
    Kept as a named step so the list above stays the complete inventory."""


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


def _in_process_save_results() -> None:
    """Synchronous saves put and take the write results in the saving process itself
    (``AsyncRequest.execute_sync`` runs the writer, then the finalisation that reads the
    queue): a ``queue.Queue`` replaces the Manager-served one megatron-core creates on
    first use (``_results_queue``, 0.16 and 0.19 alike). An asynchronous save
    (``async_sharded_save=True``, which megatron_rl never asks for) would need the real
    one; :func:`megatron_rl.training.checkpoint.save_checkpoint` saves synchronously."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        _replace(filesystem_async, "_results_queue", queue.Queue())


_ADAPTATIONS: tuple[Callable[[], None], ...] = (
    _redirect_cuda_devices,
    _cuda_type_strings,
    _cpu_device_queries,
    _cpu_streams_and_events,
    _cpu_rng,
    _moe_utils_without_transformer_engine,
    _alltoall_split_sizes_as_lists,
    _in_process_save_results,
)


def activate(force: bool = False) -> bool:
    """Apply every adaptation if CUDA is unavailable (or ``force``). Idempotent.

    Returns whether the adaptation is active afterwards."""
    if is_active():
        return True
    if not (force or needed()):
        return False
    for adaptation in _ADAPTATIONS:
        adaptation()
    logger.info("megatron-core CPU adaptation active (%d redirections)", len(_replaced))
    return True


def deactivate() -> None:
    """Undo :func:`activate`."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _replaced:
        owner, name, value = _replaced.pop()
        setattr(owner, name, value)
