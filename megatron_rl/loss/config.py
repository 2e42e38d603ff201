"""Which RL objective the update optimises, with its clipping and correction constants.

Defaults reproduce the paper's recommended setting (MiniRL, decoupled clipping
0.2 / 0.27, training-inference weight truncated at 5). Constants of the other
objectives follow their original papers (GRPO, GSPO arXiv 2507.18071, CISPO in
MiniMax-M1 arXiv 2506.13585, TIS / MIS / IcePop).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.import_path import load_callable
from megatron_rl.config.run_view import RunView

Correction = Literal["none", "tis", "mis", "icepop"]
Aggregation = Literal["sum", "length_norm", "token_mean"]
KLEstimator = Literal["k1", "k2", "k3"]

# Per built-in objective: the training-inference correction that "auto" picks, and the
# advantage estimator that "auto" picks. The paper's family (minirl*, ppo) carries the
# training-inference weight; the baselines are used as their papers define them.
OBJECTIVE_DEFAULTS: dict[str, tuple[Correction, str]] = {
    "minirl": ("tis", "group_mean"),
    "minirl_no_is": ("none", "group_mean"),
    "minirl_length_norm": ("tis", "group_mean"),
    "ppo": ("tis", "group_mean"),
    "reinforce": ("none", "group_mean"),
    "grpo": ("none", "group_mean_std"),
    "gspo": ("none", "group_mean_std"),
    "cispo": ("none", "group_mean_std"),
}
# A user objective given as ``module:function`` gets the paper's defaults.
USER_OBJECTIVE_DEFAULTS: tuple[Correction, str] = ("tis", "group_mean")
ADVANTAGE_ESTIMATORS = ("group_mean", "group_mean_std")
# How each built-in objective turns token terms into the mini-batch loss; the reference
# KL and entropy terms are reduced the same way, so they weigh tokens as the objective
# does: sum per response / N, (1/|y|) sum per response / N, or sum / T_all.
OBJECTIVE_AGGREGATION: dict[str, Aggregation] = {
    "minirl": "sum",
    "minirl_no_is": "sum",
    "minirl_length_norm": "length_norm",
    "ppo": "sum",
    "reinforce": "sum",
    "grpo": "length_norm",
    "gspo": "length_norm",
    "cispo": "token_mean",
}
# A user objective's terms are reduced as the paper's (sum per response, mean over N).
USER_OBJECTIVE_AGGREGATION: Aggregation = "sum"


def is_import_path(name: str) -> bool:
    """``package.module:function`` names a user callable rather than a built-in."""
    return ":" in name


@dataclass(kw_only=True, frozen=True)
class ObjectiveConfig:
    """The policy-gradient objective, its clipping, training-inference correction and
    advantage estimator."""

    flag_prefix: ClassVar[str] = "--rl-"

    objective: str = "minirl"
    """Objective: minirl (the paper's, default), minirl_no_is (without the
    training-inference weight), minirl_length_norm (per-response length normalisation),
    grpo, gspo, cispo, ppo (decoupled PPO clip), reinforce (no clip, no IS), or
    'package.module:function' for your own objective with the same signature."""
    clip_low: float = 0.2
    """eps_low of the decoupled clipping of minirl* and ppo: tokens with A < 0 and
    pi_theta/pi_old < 1 - eps_low get no gradient."""
    clip_high: float = 0.27
    """eps_high of the decoupled clipping of minirl* and ppo: tokens with A > 0 and
    pi_theta/pi_old > 1 + eps_high get no gradient."""
    is_cap: float | None = 5.0
    """C of the 'tis' correction: the training-inference weight pi_old/mu_old is truncated
    at C (the paper uses 5). 'none' keeps the untruncated ratio."""
    correction: Literal["auto", "none", "tis", "mis", "icepop"] = "auto"
    """Training-inference correction pi_old/mu_old: tis (truncate at --rl-is-cap), mis
    (weight 0 outside [--rl-mis-low, --rl-mis-high]), icepop (weight 0 outside
    [--rl-icepop-alpha, --rl-icepop-beta]), none (weight 1). auto: tis for minirl,
    minirl_length_norm and ppo; none for minirl_no_is, grpo, gspo, cispo and reinforce."""
    correction_level: Literal["token", "sequence"] = "token"
    """Apply the correction to each token's ratio, or to the whole response's ratio
    prod_t pi_old/mu_old (one weight for all its tokens)."""
    mis_low: float = 0.5
    """C_low of the 'mis' correction: ratios below it are masked."""
    mis_high: float = 2.0
    """C_high of the 'mis' correction: ratios above it are masked."""
    icepop_alpha: float = 0.5
    """alpha of the 'icepop' correction: ratios below it get weight 0."""
    icepop_beta: float = 5.0
    """beta of the 'icepop' correction: ratios above it get weight 0."""
    grpo_clip: float = 0.2
    """Symmetric clip eps of grpo: pi_theta/pi_old is clipped to [1 - eps, 1 + eps]."""
    gspo_clip_low: float = 3e-4
    """gspo: the sequence ratio is clipped below at 1 - this (GSPO paper: 3e-4)."""
    gspo_clip_high: float = 4e-4
    """gspo: the sequence ratio is clipped above at 1 + this (GSPO paper: 4e-4)."""
    cispo_clip_low: float | None = None
    """cispo: the detached IS weight is clipped below at 1 - this; none = no lower bound
    (as MiniMax-M1 trains)."""
    cispo_clip_high: float = 4.0
    """cispo: the detached IS weight is clipped above at 1 + this (MiniMax-M1 tunes only
    this bound and publishes no value; 4 caps the weight at 5)."""
    advantage_estimator: str = "auto"
    """Advantage estimator: group_mean (reward minus the group mean, the paper's),
    group_mean_std (also divided by the group std, GRPO's), or 'package.module:function'
    taking (rewards [N], group_ids [N]) and returning advantages [N]. auto: group_mean_std
    for grpo, gspo and cispo, group_mean otherwise."""
    advantage_std_eps: float = 1e-6
    """Added to the group std before dividing (group_mean_std)."""
    kl_coef: float = 0.0
    """beta of the reference KL term: the loss gets + beta x the per-token KL estimate
    (--rl-kl-estimator) of pi_theta against a frozen reference policy (the checkpoint RL
    started from), reduced over tokens as the objective reduces its own terms. 0 (the
    paper's, default): no reference model is built. > 0 holds a second copy of the
    weights (no gradients, no optimiser state) and runs one more forward of each rollout
    batch; it needs --load (a checkpoint to start from)."""
    kl_estimator: KLEstimator = "k3"
    """Per-token estimator of KL(pi_theta || pi_ref), d = log pi_theta - log pi_ref:
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (Schulman's; GRPO's and Megatron-LM's,
    non-negative, low variance). The gradient flows through pi_theta only."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss gets - this x the entropy of pi_theta over
    the vocabulary at each response token, reduced as the objective's terms. 0 (the
    paper's, default): entropy is only reported."""

    def correction_in_force(self, objective: str | None = None) -> Correction:
        """The correction in force for ``objective`` (default: the configured one), with
        'auto' resolved."""
        if self.correction != "auto":
            return self.correction  # type: ignore[return-value]
        return _defaults(objective or self.objective)[0]

    def estimator_in_force(self) -> str:
        """The estimator in force for the configured objective ('auto' resolved)."""
        if self.advantage_estimator != "auto":
            return self.advantage_estimator
        return _defaults(self.objective)[1]

    def aggregation_in_force(self) -> Aggregation:
        """How the objective reduces token terms (the regularisers follow it)."""
        return OBJECTIVE_AGGREGATION.get(self.objective, USER_OBJECTIVE_AGGREGATION)

    @property
    def uses_reference(self) -> bool:
        """The loss has a reference KL term: a reference model must be built and run."""
        return self.kl_coef > 0

    def validate(self, run: RunView) -> None:
        name = self.objective
        if name not in OBJECTIVE_DEFAULTS and not is_import_path(name):
            raise ConfigError(
                f"--rl-objective {name!r} is unknown; choose one of "
                f"{', '.join(OBJECTIVE_DEFAULTS)} or give 'package.module:function'"
            )
        _check_importable("--rl-objective", name)
        _check_fraction("--rl-clip-low", self.clip_low)
        _check_nonnegative("--rl-clip-high", self.clip_high)
        _check_fraction("--rl-grpo-clip", self.grpo_clip)
        _check_fraction("--rl-gspo-clip-low", self.gspo_clip_low)
        _check_nonnegative("--rl-gspo-clip-high", self.gspo_clip_high)
        if self.cispo_clip_low is not None:
            _check_fraction("--rl-cispo-clip-low", self.cispo_clip_low)
        _check_nonnegative("--rl-cispo-clip-high", self.cispo_clip_high)
        if self.is_cap is not None and not (
            self.is_cap > 0 and math.isfinite(self.is_cap)
        ):
            raise ConfigError(
                f"--rl-is-cap must be a positive number or none, got {self.is_cap}"
            )
        _check_band("--rl-mis-low", self.mis_low, "--rl-mis-high", self.mis_high)
        _check_band(
            "--rl-icepop-alpha", self.icepop_alpha, "--rl-icepop-beta", self.icepop_beta
        )
        if name == "minirl_no_is" and self.correction not in ("auto", "none"):
            raise ConfigError(
                f"--rl-objective minirl_no_is has no training-inference weight by definition; "
                f"--rl-correction {self.correction} contradicts it (use --rl-objective minirl)"
            )
        estimator = self.advantage_estimator
        if (
            estimator != "auto"
            and estimator not in ADVANTAGE_ESTIMATORS
            and not is_import_path(estimator)
        ):
            raise ConfigError(
                f"--rl-advantage-estimator {estimator!r} is unknown; choose auto, "
                f"{', '.join(ADVANTAGE_ESTIMATORS)} or give 'package.module:function'"
            )
        _check_importable("--rl-advantage-estimator", estimator)
        if not self.advantage_std_eps >= 0:
            raise ConfigError(
                f"--rl-advantage-std-eps must be >= 0, got {self.advantage_std_eps}"
            )
        _check_nonnegative("--rl-kl-coef", self.kl_coef)
        _check_nonnegative("--rl-entropy-coef", self.entropy_coef)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(
                f"--rl-kl-estimator {self.kl_estimator!r} is unknown; choose k1, k2 or k3"
            )
        if self.uses_reference and not run.checkpoint.load:
            # The reference is the checkpoint RL starts from, reloaded on every resume:
            # random initial weights are nowhere to reload them from (and a KL pull
            # towards random weights is no regulariser).
            raise ConfigError(
                f"--rl-kl-coef {self.kl_coef} needs --load: the reference policy is the "
                "checkpoint RL starts from (a cold start), and there is none to load"
            )

    def replace(self, **changes) -> ObjectiveConfig:
        return dataclasses.replace(self, **changes)


def _defaults(objective: str) -> tuple[Correction, str]:
    return OBJECTIVE_DEFAULTS.get(objective, USER_OBJECTIVE_DEFAULTS)


def _check_importable(flag: str, name: str) -> None:
    """Import a user function at start-up rather than at the first training step."""
    if not is_import_path(name):
        return
    try:
        load_callable(name, what=flag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_fraction(flag: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{flag} must be in [0, 1), got {value}")


def _check_nonnegative(flag: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")


def _check_band(low_flag: str, low: float, high_flag: str, high: float) -> None:
    if not (0 <= low < high and math.isfinite(high)):
        raise ConfigError(
            f"{low_flag} {low} and {high_flag} {high} must satisfy 0 <= low < high < inf"
        )
