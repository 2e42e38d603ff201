"""RL objectives, training-inference corrections and their statistics.

The training step calls :func:`compute_loss` on each piece of a mini-batch; the
objective is chosen by ``ObjectiveConfig.objective`` from :data:`OBJECTIVES` or a
user's ``package.module:function``. Formulas: README.md, section "Objectives".
"""

from megatron_rl.loss.compute import compute_loss
from megatron_rl.loss.config import ObjectiveConfig
from megatron_rl.loss.metrics import METRICS, derived_metrics
from megatron_rl.loss.objectives import OBJECTIVES, get_objective
from megatron_rl.loss.types import LossInputs, LossOutput, SeqSum
from megatron_rl.loss.validation import LossInputError, validate_inputs

__all__ = [
    "METRICS",
    "OBJECTIVES",
    "LossInputError",
    "LossInputs",
    "LossOutput",
    "ObjectiveConfig",
    "SeqSum",
    "compute_loss",
    "derived_metrics",
    "get_objective",
    "validate_inputs",
]
