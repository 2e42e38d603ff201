"""Process groups: torch.distributed and megatron-core's parallel_state.

Launch with torchrun (or SLURM, which sets the same variables through
``examples/slurm``); a single process without a launcher also works.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megatron_rl import cpu_adaptation
from megatron_rl.config.flags import ConfigError
from megatron_rl.config.run_view import RunView

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """How the model and the batch are split over processes. Megatron-LM's flag names."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP). With MoE layers, TP > 1 needs --sequence-parallel."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP)."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual pipeline stage (interleaved schedule); None disables it."""
    expert_model_parallel_size: int = 1
    """Expert parallel size (EP)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallel size of the experts; None uses --tensor-model-parallel-size."""
    context_parallel_size: int = 1
    """Context parallel size (CP). Needs Transformer Engine attention (GPU)."""
    sequence_parallel: bool = False
    """Split activations along the sequence over tensor-parallel ranks."""
    distributed_backend: Literal["nccl", "gloo"] | None = None
    """Collective backend; default nccl with CUDA, gloo without."""
    distributed_timeout_minutes: int = 10
    """Timeout of collectives."""

    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def validate(self, run: RunView) -> None:
        self.check_layout(run.world_size, run.model.num_layers, run.model.num_experts)
        self.check_model_split(run.model)

    def check_model_split(self, model) -> None:
        """Refuse a model whose heads, FFN or vocabulary do not split evenly over the tensor
        parallel ranks (megatron-core asserts it while building the model)."""
        tp = self.tensor_model_parallel_size
        etp = self.expert_tensor_parallel_size or tp
        for size, flag, parts, by in (
            (model.num_attention_heads, "--num-attention-heads", tp, "--tensor-model-parallel-size"),
            (model.num_query_groups, "--num-query-groups", tp, "--tensor-model-parallel-size"),
            (model.ffn_hidden_size, "--ffn-hidden-size", tp, "--tensor-model-parallel-size"),
            (model.vocab_size, "--vocab-size", tp, "--tensor-model-parallel-size"),
            (model.moe_ffn_hidden_size, "--moe-ffn-hidden-size", etp, "--expert-tensor-parallel-size"),
        ):
            if size % parts:
                raise ConfigError(f"{flag} {size} is not divisible by {by} {parts}")

    def check_layout(self, world_size: int, num_layers: int, num_experts: int) -> None:
        """Refuse a layout that does not tile ``world_size`` ranks or the model's layers
        and experts."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        mp = self.model_parallel_size()
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {mp}"
            )
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        expert_mp = etp * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % expert_mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by expert TP x EP x PP = "
                f"{etp} x {self.expert_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size} = {expert_mp}"
            )
        if num_experts % self.expert_model_parallel_size:
            raise ConfigError(
                f"--num-experts {num_experts} is not divisible by "
                f"--expert-model-parallel-size {self.expert_model_parallel_size}"
            )
        if num_layers % self.pipeline_model_parallel_size:
            raise ConfigError(
                f"--num-layers {num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size}"
            )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            per_stage = num_layers // self.pipeline_model_parallel_size
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size >= 2"
                )
            if per_stage % self.num_layers_per_virtual_pipeline_stage:
                raise ConfigError(
                    f"{per_stage} layers per pipeline stage are not divisible by "
                    f"--num-layers-per-virtual-pipeline-stage "
                    f"{self.num_layers_per_virtual_pipeline_stage}"
                )
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ConfigError(
                "--tensor-model-parallel-size > 1 with MoE layers needs --sequence-parallel "
                "(megatron-core's MoE layer requires it)"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def check_hardware(self) -> None:
        """Refuse what this machine cannot run. Kept out of :meth:`validate` because a
        dry run on a login node validates a launch meant for GPU nodes."""
        if self.context_parallel_size > 1 and not torch.cuda.is_available():
            raise ConfigError(
                "--context-parallel-size > 1 needs Transformer Engine attention on GPU; "
                "megatron-core's local attention (CPU) supports only CP=1"
            )

    def virtual_pipeline_size(self, num_layers: int) -> int | None:
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_stage = num_layers // self.pipeline_model_parallel_size
        return per_stage // self.num_layers_per_virtual_pipeline_stage


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_world_size(
    given: int | None, nproc_per_node: int | None, environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """World size of a launch checked before it starts (``--dry-run``), and where it came
    from: ``--world-size``, else the launcher's environment as torchrun or SLURM sets it
    (WORLD_SIZE; SLURM_NNODES x --nproc-per-node for torchrun on each node; SLURM_NTASKS for
    one task per rank), else 1."""
    env = os.environ if environ is None else environ

    def number(name: str) -> int:
        text = env[name]
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} in the environment is not an integer") from None
        if value < 1:
            raise ConfigError(f"{name}={value} in the environment must be >= 1")
        return value

    if given is not None:
        if given < 1:
            raise ConfigError(f"--world-size must be >= 1, got {given}")
        return given, "--world-size"
    if nproc_per_node is not None and nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if "WORLD_SIZE" in env:
        return number("WORLD_SIZE"), "WORLD_SIZE"
    if nproc_per_node is not None and "SLURM_NNODES" in env:
        nodes = number("SLURM_NNODES")
        return nodes * nproc_per_node, f"SLURM_NNODES {nodes} x --nproc-per-node {nproc_per_node}"
    if "SLURM_NTASKS" in env:
        return number("SLURM_NTASKS"), "SLURM_NTASKS"
    if nproc_per_node is not None:
        return nproc_per_node, "--nproc-per-node (one node)"
    return 1, "default: no --world-size, WORLD_SIZE or SLURM_NTASKS"


def init_distributed(parallel: ParallelConfig, num_layers: int, seed: int) -> None:
    """Start torch.distributed and megatron's parallel_state; seed every RNG.

    Also activates the CPU adaptation of megatron-core when CUDA is unavailable."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    cpu_adaptation.activate()
    backend = parallel.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--distributed-backend nccl needs CUDA; use gloo on CPU")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(num_layers),
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        )
    model_parallel_cuda_manual_seed(seed)
    logger.info(
        "rank %d/%d: TP=%d PP=%d EP=%d CP=%d DP=%d backend=%s",
        dist.get_rank(), dist.get_world_size(), parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size, parallel.expert_model_parallel_size,
        parallel.context_parallel_size, ps.get_data_parallel_world_size(), backend,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    reset_data_group()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


_DATA_GROUP: tuple | None = None


def data_group():
    """(group, leader global rank, member ranks) of the ranks that share this rank's
    data-parallel index -- the TP x PP x CP ranks that see the same samples.

    The leader talks to the rollout servers for the group and hands each member its
    share. Collective the first time it is called (every rank creates every group)."""
    global _DATA_GROUP
    if _DATA_GROUP is not None:
        return _DATA_GROUP
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    dp_ranks: list[int] = [0] * world
    dist.all_gather_object(dp_ranks, ps.get_data_parallel_rank())
    by_dp: dict[int, list[int]] = {}
    for rank, dp in enumerate(dp_ranks):
        by_dp.setdefault(dp, []).append(rank)
    mine = None
    for dp in sorted(by_dp):
        ranks = by_dp[dp]
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if dist.get_rank() in ranks:
            mine = (group, ranks[0], ranks)
    _DATA_GROUP = mine
    return mine


def reset_data_group() -> None:
    global _DATA_GROUP
    _DATA_GROUP = None
