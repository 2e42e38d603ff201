"""A megatron-core model with its optimiser: one object the loops drive.

Wraps the model chunks in megatron-core's DistributedDataParallel, builds
``get_megatron_optimizer`` and ``OptimizerParamScheduler``, and runs
``get_forward_backward_func`` for a training step or a forward-only pass. A step whose
loss or gradient is not finite anywhere is skipped on every rank before the optimiser
sees it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rl.distributed import ParallelConfig
from megatron_rl.model.config import ModelConfig
from megatron_rl.model.provider import build_model
from megatron_rl.training.config import TrainingConfig

logger = logging.getLogger(__name__)

ForwardStep = Callable[[Iterable, torch.nn.Module], tuple[torch.Tensor, Callable]]


@dataclass
class StepResult:
    """What one optimiser step did."""

    outputs: list[Any]
    """Per-micro-batch values the loss functions returned (last pipeline stage only)."""
    grad_norm: float
    """Gradient norm before clipping (nan when skipped)."""
    skipped: bool
    """True when a non-finite loss or gradient skipped the update."""
    lr: float
    """Learning rate used."""


class MegatronEngine:
    """Model chunks + optimiser + scheduler of this rank."""

    def __init__(
        self,
        model_config: ModelConfig,
        parallel: ParallelConfig,
        training: TrainingConfig,
        *,
        routing_replay: bool = False,
        updates_per_step: int = 1,
        build_optimizer: bool = True,
        frozen: bool = False,
    ) -> None:
        """``frozen``: a model that is only ever run forward (the reference policy): no
        gradients, no DDP gradient buffers, no optimiser -- it costs one copy of this
        rank's weights in their training dtype and nothing else."""
        self.model_config = model_config
        self.parallel = parallel
        self.training = training
        self.frozen = frozen
        chunks = build_model(
            model_config, parallel, bf16=training.bf16, routing_replay=routing_replay
        )
        self.config = chunks[0].config
        self.optimizer = None
        self.scheduler = None
        if frozen:
            for chunk in chunks:
                chunk.requires_grad_(False)
            self.model: list[torch.nn.Module] = list(chunks)
            return
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=training.overlap_grad_reduce,
            overlap_param_gather=training.overlap_param_gather,
            use_distributed_optimizer=training.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        if build_optimizer:
            self._build_optimizer(updates_per_step)

    def _build_optimizer(self, updates_per_step: int) -> None:
        # The scheduler advances once per optimizer update, while --train-iters and
        # --lr-warmup-iters count steps; an RL step takes N updates (N mini-batches).
        t = self.training
        warmup_steps = t.lr_warmup_iters * updates_per_step
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=t.bf16,
            params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
            use_distributed_optimizer=t.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        self.config.grad_scale_func = self.optimizer.scale_loss
        decay_iters = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
        decay_steps = max(decay_iters * updates_per_step, warmup_steps + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup_steps else t.lr,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )

    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The unwrapped GPTModel chunks."""
        return list(self.model) if self.frozen else [m.module for m in self.model]

    def train(self, mode: bool = True) -> None:
        for m in self.model:
            m.train(mode)

    def run(
        self,
        forward_step: ForwardStep,
        microbatches: list[Any],
        *,
        seq_length: int,
        micro_batch_size: int,
        forward_only: bool,
    ) -> list[Any]:
        """Run megatron's schedule over ``microbatches`` (each goes through every chunk)."""
        iterators: Any = [iter(microbatches) for _ in self.model]
        if len(self.model) == 1:
            iterators = iterators[0]
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def forward_only(self, forward_step: ForwardStep, microbatches: list[Any], *,
                     seq_length: int, micro_batch_size: int) -> list[Any]:
        self.train(False)
        with torch.no_grad():
            out = self.run(forward_step, microbatches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=True)
        return out

    def train_step(
        self,
        forward_step: ForwardStep,
        microbatches: list[Any],
        *,
        seq_length: int,
        micro_batch_size: int,
        loss_of: Callable[[Any], torch.Tensor | float] | None = None,
    ) -> StepResult:
        """Forward, backward and one optimiser step; skip it if anything is non-finite.

        ``loss_of`` extracts a loss value from each micro-batch output for the finiteness
        check (outputs exist on the last pipeline stage only)."""
        if self.frozen or self.optimizer is None or self.scheduler is None:
            raise RuntimeError("train_step on an engine without an optimiser (frozen or "
                               "built with build_optimizer=False)")
        self.train(True)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.run(forward_step, microbatches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size, forward_only=False)
        finite = self._all_finite(outputs, loss_of)
        lr = self.optimizer.param_groups[0]["lr"]
        if not finite:
            logger.warning("non-finite loss or gradient: update skipped, weights untouched")
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            return StepResult(outputs, float("nan"), True, lr)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return StepResult(outputs, float(grad_norm) if grad_norm is not None else float("nan"),
                          not ok, lr)

    def _all_finite(self, outputs: list[Any], loss_of) -> bool:
        flag = True
        if loss_of is not None:
            for out in outputs:
                value = loss_of(out)
                value = float(value) if not isinstance(value, torch.Tensor) else float(value.sum())
                if not math.isfinite(value):
                    flag = False
        if flag:
            for m in self.model:
                for buffer in m.buffers + m.expert_parallel_buffers:
                    if not torch.isfinite(buffer.grad_data).all():
                        flag = False
                        break
        tensor = torch.tensor([1.0 if flag else 0.0], device=_device())
        if dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item() > 0)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def data_parallel_info() -> tuple[int, int]:
    """(rank, size) of this process in the data-parallel group (CP excluded)."""
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
