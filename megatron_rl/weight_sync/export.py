"""Gather a sharded megatron model into Hugging Face Qwen3-MoE tensors and write them.

:func:`gather_hf_tensors` is collective: every rank describes its parameters (canonical
names, tensor-parallel shard, shape, dtype), all ranks agree on one owner per shard (the
lowest rank holding it, so data-parallel replicas send nothing) and check the plan
against the expected checkpoint *before* any transfer, so a mismatch fails on every rank
alike instead of leaving some waiting. Then, one parameter at a time in checkpoint order,
the owners send their shards to the destination rank, which converts them
(:mod:`~megatron_rl.weight_sync.hf_mapping`) and yields full HF tensors. The destination
holds one parameter at a time; :class:`SafetensorsWriter` holds at most one file's worth.

:func:`export_hf` writes the result as a Hugging Face directory: ``config.json`` (from
:func:`~megatron_rl.weight_sync.hf_config.to_hf_config`), safetensors files (with an index
when there are several) and the tokenizer. It is written under ``<dir>.partial`` and
renamed when complete, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_rl.model.config import ModelConfig
from megatron_rl.model.tokenizer import load_tokenizer
from megatron_rl.weight_sync.hf_config import add_legacy_config_keys, to_hf_config
from megatron_rl.weight_sync.hf_mapping import (
    LocalParam,
    TensorMap,
    assemble_hf,
    hf_tensor_shapes,
    local_params,
    map_megatron_name,
    order_key,
)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass
class _Entry:
    """All shards of one canonical parameter, across ranks."""

    tmap: TensorMap
    num_shards: int
    owners: dict[int, tuple[int, tuple[int, ...], str]]
    """shard index -> (owner rank, shard shape, dtype name)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _plan(mine: list[LocalParam]) -> dict[str, _Entry]:
    """Every rank's parameters, gathered; the same dict on every rank."""
    described = [
        (p.name, p.shard, p.num_shards, tuple(p.tensor.shape), str(p.tensor.dtype)) for p in mine
    ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, described)
    else:
        everyone = [described]
    plan: dict[str, _Entry] = {}
    for rank, items in enumerate(everyone):
        for name, shard, count, shape, dtype in items:
            entry = plan.setdefault(name, _Entry(map_megatron_name(name), count, {}))
            if entry.num_shards != count:
                raise ValueError(
                    f"{name}: ranks disagree on its shard count "
                    f"({entry.num_shards} vs {count} on rank {rank})"
                )
            entry.owners.setdefault(shard, (rank, shape, dtype))  # lowest rank wins
    return plan


def _check_plan(plan: dict[str, _Entry], config: ModelConfig) -> None:
    """The model's parameters must produce exactly the expected HF tensors and shapes."""
    expected = hf_tensor_shapes(config)
    produced: dict[str, tuple[int, ...]] = {}
    problems = []
    for name, entry in plan.items():
        missing = sorted(set(range(entry.num_shards)) - set(entry.owners))
        if missing:
            problems.append(f"{name}: no rank holds shard(s) {missing} of {entry.num_shards}")
            continue
        # Shapes only: run the conversion on meta tensors.
        shards = [torch.empty(entry.owners[i][1], device="meta") for i in range(entry.num_shards)]
        for hf_name, tensor in assemble_hf(entry.tmap, shards, config):
            if hf_name in produced:
                problems.append(f"{hf_name} comes from two megatron parameters")
            produced[hf_name] = tuple(tensor.shape)
    for hf_name, shape in produced.items():
        if hf_name not in expected:
            problems.append(f"{hf_name} {list(shape)} is not in the HF model of this config")
        elif shape != expected[hf_name]:
            problems.append(
                f"{hf_name}: the megatron model gives shape {list(shape)}, the HF "
                f"config expects {list(expected[hf_name])}"
            )
    problems += [f"{n}: no megatron parameter provides it" for n in expected if n not in produced]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"the megatron model does not match its HF Qwen3-MoE layout:\n  {shown}{more}"
        )


def gather_hf_tensors(
    chunks: Sequence[torch.nn.Module],
    config: ModelConfig,
    *,
    dst: int = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over all ranks: yields ``(hf_name, full tensor)`` on rank ``dst`` (on the
    model's device, cast to ``dtype`` if given) and nothing elsewhere. Every rank must
    exhaust the iterator, in step."""
    rank = _rank()
    mine = local_params(chunks)
    local = {(p.name, p.shard): p.tensor for p in mine}
    plan = _plan(mine)
    _check_plan(plan, config)
    device = mine[0].tensor.device if mine else torch.device("cpu")
    for name in sorted(plan, key=order_key):
        entry = plan[name]
        shards = []
        for index in range(entry.num_shards):
            owner, shape, dtype_name = entry.owners[index]
            if rank == dst:
                if owner == dst:
                    shards.append(local[(name, index)].detach())
                else:
                    buffer = torch.empty(shape, dtype=_dtype(dtype_name), device=device)
                    dist.recv(buffer, src=owner)
                    shards.append(buffer)
            elif rank == owner:
                dist.send(local[(name, index)].detach().contiguous(), dst=dst)
        if rank == dst:
            for hf_name, tensor in assemble_hf(entry.tmap, shards, config):
                yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


class SafetensorsWriter:
    """Writes tensors into safetensors files of at most ``max_shard_bytes`` each (a tensor
    never straddles files) and, on :meth:`close`, names them like ``save_pretrained``:
    ``model.safetensors`` alone, or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.files):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # safetensors wants contiguous CPU tensors that own their memory.
        self.pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        path = self.directory / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush and rename the files; returns their final names."""
        if self.pending or not self.files:
            self._flush()
        for path, _ in self.files:
            os.chmod(path, 0o644)  # safetensors creates 0600 files; servers may run as others
        if len(self.files) == 1:
            final = self.directory / "model.safetensors"
            os.replace(self.files[0][0], final)
            return [final.name]
        count = len(self.files)
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.files):
            final_name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / final_name)
            names.append(final_name)
            weight_map.update(dict.fromkeys(tensors, final_name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
        return names


@dataclass
class ExportStats:
    path: str
    num_tensors: int
    bytes: int
    files: list[str]
    seconds: float


def export_hf(
    chunks: Sequence[torch.nn.Module],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dst: int = 0,
) -> ExportStats | None:
    """Collective: write the model as a Hugging Face checkpoint directory from rank ``dst``.

    ``tokenizer`` is a tokenizer object, 'char' or a tokenizer directory (default:
    ``config.tokenizer``).
    An existing ``out_dir`` is replaced. Returns the stats on rank ``dst``, None elsewhere."""
    started = time.perf_counter()
    final = Path(out_dir)
    partial = final.with_name(final.name + ".partial")
    writer = None
    if _rank() == dst:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        writer = SafetensorsWriter(partial, max_shard_bytes)
    count = 0
    for name, tensor in gather_hf_tensors(chunks, config, dst=dst, dtype=dtype):
        writer.add(name, tensor)
        count += 1
    if writer is None:
        return None
    files = writer.close()
    _write_config_and_tokenizer(partial, config, dtype or _model_dtype(chunks), tokenizer)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    stats = ExportStats(str(final), count, writer.total_bytes, files, time.perf_counter() - started)
    logger.info(
        "exported %d tensors (%.1f MB) to %s in %.2f s",
        count,
        stats.bytes / 1e6,
        final,
        stats.seconds,
    )
    return stats


def _model_dtype(chunks: Sequence[torch.nn.Module]) -> torch.dtype:
    for chunk in chunks:
        for param in chunk.parameters():
            return param.dtype
    return torch.float32


def _write_config_and_tokenizer(
    directory: Path, config: ModelConfig, dtype: torch.dtype, tokenizer: Any
) -> None:
    if not hasattr(tokenizer, "save_pretrained"):
        tokenizer = load_tokenizer(tokenizer or config.tokenizer, config.vocab_size)
    hf_config = to_hf_config(
        config,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf_config.dtype = dtype
    hf_config.save_pretrained(directory)
    add_legacy_config_keys(directory)
    tokenizer.save_pretrained(directory)
