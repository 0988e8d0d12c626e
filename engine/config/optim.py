"""``optimizer`` and ``scheduler`` sections: type names as DeepSpeed accepts them, params per type.

DeepSpeed passes ``params`` straight to the optimizer/scheduler constructor, so a misspelt
parameter fails late (or, for its own optimizers, is silently dropped). Here each type has a
params model, so ``optimizer.params.weight_decy`` is reported with the nearest valid name
before anything runs. Defaults are those of DeepSpeed's implementations (FusedAdam,
FusedLion, torch.optim.SGD, deepspeed/runtime/lr_schedules.py).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, ValidationError

from engine.errors import closest

from .errors import Problem, describe, translate
from .types import Betas, Bool, Float, Int, NonNegFloat, PosInt, Section, Str, choice

class _Params(Section):
    """Base of the per-type params models (strict: unknown params are errors)."""


class AdamParams(_Params):
    """Adam/AdamW params (DeepSpeed FusedAdam defaults; ``weight_decay`` 0.0, not torch's 0.01)."""

    lr: NonNegFloat = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: NonNegFloat = 1e-8
    weight_decay: NonNegFloat = 0.0
    bias_correction: Bool = True
    amsgrad: Bool = False
    adam_w_mode: Bool = True
    torch_adam: Bool = False
    fp32_optimizer_states: Bool = True
    set_grad_none: Bool = True

    def _check(self) -> list[Problem]:
        problems = _beta_problems(self.betas)
        if self.amsgrad:
            problems.append(("amsgrad", "AMSGrad is not supported (DeepSpeed's FusedAdam rejects it too)",
                             "remove amsgrad"))
        return problems


class SGDParams(_Params):
    """SGD params (torch.optim.SGD, which DeepSpeed uses for ``"SGD"``)."""

    lr: NonNegFloat = 1e-3
    momentum: NonNegFloat = 0.0
    dampening: Float = 0.0
    weight_decay: NonNegFloat = 0.0
    nesterov: Bool = False

    def _check(self) -> list[Problem]:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            return [("nesterov", "Nesterov momentum needs momentum > 0 and dampening 0, got "
                     f"momentum {self.momentum!r}, dampening {self.dampening!r}",
                     "set momentum > 0 and dampening 0, or nesterov false")]
        return []


class LionParams(_Params):
    """Lion params (DeepSpeed FusedLion defaults)."""

    lr: NonNegFloat = 1e-3
    betas: Betas = (0.9, 0.999)
    weight_decay: NonNegFloat = 0.0
    set_grad_none: Bool = True

    def _check(self) -> list[Problem]:
        return _beta_problems(self.betas)


class LambParams(_Params):
    """Lamb params (DeepSpeed FusedLamb defaults: max_coeff 10, min_coeff 0.01)."""

    lr: NonNegFloat = 1e-3
    bias_correction: Bool = True
    betas: Betas = (0.9, 0.999)
    eps: NonNegFloat = 1e-8
    eps_inside_sqrt: Bool = False
    weight_decay: NonNegFloat = 0.0
    max_coeff: NonNegFloat = 10.0
    min_coeff: NonNegFloat = 0.01
    amsgrad: Bool = False

    def _check(self) -> list[Problem]:
        problems = _beta_problems(self.betas) + _amsgrad_problem(self.amsgrad, "FusedLamb")
        if self.min_coeff > self.max_coeff:
            problems.append(("min_coeff", f"is larger than max_coeff ({self.min_coeff} > {self.max_coeff})",
                             "the trust ratio is clamped to [min_coeff, max_coeff]: swap them"))
        return problems


CommBackend = choice("nccl", "mpi", "hccl", "compressed")


class _CompressedParams(_Params):
    """What DeepSpeed's compressed-communication optimizers share (runtime/fp16/onebit/)."""

    lr: NonNegFloat = 1e-3
    bias_correction: Bool = True
    betas: Betas = (0.9, 0.999)
    eps: NonNegFloat = 1e-8
    eps_inside_sqrt: Bool = False
    weight_decay: NonNegFloat = 0.0
    amsgrad: Bool = False
    cuda_aware: Bool = False
    comm_backend_name: CommBackend = "nccl"

    def _check(self) -> list[Problem]:
        return _beta_problems(self.betas) + _amsgrad_problem(self.amsgrad, type(self).__doc__.split(" params")[0])


class OneBitAdamParams(_CompressedParams):
    """1-bit Adam params: ``freeze_step`` warm-up steps before the momentum is compressed."""

    freeze_step: Int = Field(100000, ge=0)


class ZeroOneAdamParams(_CompressedParams):
    """0/1 Adam params (arXiv:2202.06009): variance updates at growing intervals, then local steps."""

    var_freeze_step: Int = Field(100000, ge=0)
    var_update_scaler: PosInt = 16
    local_step_scaler: PosInt = 32678
    local_step_clipper: PosInt = 16


class OneBitLambParams(_CompressedParams):
    """1-bit Lamb params (arXiv:2104.06069): Lamb's coefficients, frozen and rescaled after warm-up."""

    freeze_step: Int = Field(100000, ge=0)
    max_coeff: NonNegFloat = 10.0
    min_coeff: NonNegFloat = 0.01
    coeff_beta: NonNegFloat = 0.9
    factor_max: NonNegFloat = 4.0
    factor_min: NonNegFloat = 0.5
    factor_threshold: NonNegFloat = 0.1

    def _check(self) -> list[Problem]:
        problems = super()._check()
        if not self.coeff_beta < 1.0:
            problems.append(("coeff_beta", f"must be in [0, 1), got {self.coeff_beta!r}",
                             "it is the running average's decay of the trust ratio (DeepSpeed's default 0.9)"))
        for low, high in (("min_coeff", "max_coeff"), ("factor_min", "factor_max")):
            if getattr(self, low) > getattr(self, high):
                problems.append((low, f"is larger than {high} ({getattr(self, low)} > {getattr(self, high)})",
                                 f"the value is clamped to [{low}, {high}]: swap them"))
        return problems


def _amsgrad_problem(amsgrad: bool, owner: str) -> list[Problem]:
    return [("amsgrad", f"AMSGrad is not supported ({owner} rejects it in DeepSpeed too)", "remove amsgrad")] \
        if amsgrad else []


def _beta_problems(betas: tuple[float, float]) -> list[Problem]:
    return [(f"betas[{i}]", f"must be in [0, 1), got {b!r}", "") for i, b in enumerate(betas) if not 0.0 <= b < 1.0]


# canonical type -> (params model, kind(params) for resolved_kind())
SUPPORTED_OPTIMIZERS: dict[str, type[_Params]] = {
    "Adam": AdamParams, "AdamW": AdamParams, "SGD": SGDParams, "Lion": LionParams, "Lamb": LambParams,
    "OneBitAdam": OneBitAdamParams, "ZeroOneAdam": ZeroOneAdamParams, "OneBitLamb": OneBitLambParams,
}
# DeepSpeed's compressed-communication optimizers: its engine refuses every one of them with ZeRO
# ("assert not self.zero_optimization(), '1bit-Adam is not compatible with ZeRO'", zero_optimization()
# being stage > 0), and so does ours.
COMPRESSED_OPTIMIZERS = ("OneBitAdam", "ZeroOneAdam", "OneBitLamb")
_DS_REFUSAL = {"OneBitAdam": "1bit-Adam is not compatible with ZeRO", "ZeroOneAdam": "0/1 Adam is not compatible with ZeRO",
               "OneBitLamb": "1bit-Lamb is not compatible with ZeRO"}
# Names DeepSpeed accepts that orch's engine does not implement (DeepSpeed's own optimizers
# and the torch.optim classes it would look up by name).
KNOWN_UNSUPPORTED_OPTIMIZERS = (
    "MuAdam", "MuAdamW", "MuSGD", "Muon", "Adagrad",
    "Adadelta", "Adafactor", "Adamax", "ASGD", "LBFGS", "NAdam", "RAdam", "RMSprop", "Rprop", "SparseAdam",
)


class OptimizerConfig(Section):
    """``optimizer``: ``type`` (case-insensitive, as in DeepSpeed) and its ``params``.

    ``params`` holds the validated params with defaults filled in. ``"Adam"`` means AdamW
    unless ``params.adam_w_mode`` is false, exactly as in DeepSpeed: see ``resolved_kind()``.
    """

    type: Str
    params: dict[str, Any] = Field(default_factory=dict)
    legacy_fusion: Bool = False

    def _check(self) -> list[Problem]:
        canon = {name.lower(): name for name in SUPPORTED_OPTIMIZERS}
        name = canon.get(self.type.lower())
        if name is None:
            return [_unsupported("type", self.type, list(SUPPORTED_OPTIMIZERS), KNOWN_UNSUPPORTED_OPTIMIZERS,
                                 "optimizer")]
        self.type = name
        if "max_grad_norm" in self.params:
            return [("params.max_grad_norm", "is not an optimizer parameter in DeepSpeed",
                     "use the top-level \"gradient_clipping\" instead")]
        self.params, problems = _validated_params(SUPPORTED_OPTIMIZERS[name], self.params)
        return problems

    def resolved_kind(self) -> str:
        """"adamw" | "adam_l2" | "sgd" | "lion" | "lamb" | "onebitadam" | "zerooneadam" |
        "onebitlamb": the update rule that will run.

        DeepSpeed: ``AdamW`` is always decoupled weight decay; ``Adam`` is too unless
        ``adam_w_mode`` is false, in which case weight decay is classic L2 added to the gradient.
        """
        if self.type == "AdamW":
            return "adamw"
        if self.type == "Adam":
            return "adamw" if self.params.get("adam_w_mode", True) else "adam_l2"
        return self.type.lower()

    def engine_kwargs(self) -> dict[str, Any]:
        """The params engine.ops' Lamb / engine.onebit's optimizers take (DeepSpeed's names)."""
        return {k: v for k, v in self.params.items() if k != "amsgrad"}

    def torch_kwargs(self) -> dict[str, Any]:
        """The params a torch-style optimizer constructor takes (DeepSpeed-only switches removed)."""
        drop = {"adam_w_mode", "torch_adam", "fp32_optimizer_states", "set_grad_none", "bias_correction", "amsgrad"}
        return {k: v for k, v in self.params.items() if k not in drop}


WarmupType = choice("log", "linear")


class _WarmupParams(_Params):
    warmup_num_steps: PosInt = 1000
    warmup_type: WarmupType = "log"
    last_batch_iteration: Int = -1


class WarmupLRParams(_WarmupParams):
    """WarmupLR: ``warmup_max_lr`` unset means the optimizer's lr (DeepSpeed's behaviour)."""

    warmup_min_lr: NonNegFloat = 0.0
    warmup_max_lr: Optional[NonNegFloat] = None


class WarmupDecayLRParams(_WarmupParams):
    total_num_steps: PosInt
    warmup_min_lr: NonNegFloat = 0.0
    warmup_max_lr: NonNegFloat = 0.001


class WarmupCosineLRParams(_WarmupParams):
    total_num_steps: PosInt
    warmup_min_ratio: NonNegFloat = 0.0
    cos_min_ratio: NonNegFloat = 0.0001


class OneCycleParams(_Params):
    cycle_min_lr: NonNegFloat
    cycle_max_lr: NonNegFloat
    decay_lr_rate: NonNegFloat = 0.0
    cycle_first_step_size: PosInt = 2000
    cycle_second_step_size: Optional[Int] = Field(None, ge=0)
    cycle_first_stair_count: Int = Field(0, ge=0)
    cycle_second_stair_count: Optional[Int] = Field(None, ge=0)
    decay_step_size: Int = Field(0, ge=0)
    cycle_momentum: Bool = True
    cycle_min_mom: NonNegFloat = 0.8
    cycle_max_mom: NonNegFloat = 0.9
    decay_mom_rate: NonNegFloat = 0.0
    last_batch_iteration: Int = -1


class LRRangeTestParams(_Params):
    lr_range_test_min_lr: NonNegFloat = 1e-3
    lr_range_test_step_size: PosInt = 2000
    lr_range_test_step_rate: NonNegFloat = 1.0
    lr_range_test_staircase: Bool = False
    last_batch_iteration: Int = -1


SUPPORTED_SCHEDULERS: dict[str, type[_Params]] = {
    "WarmupLR": WarmupLRParams, "WarmupDecayLR": WarmupDecayLRParams, "WarmupCosineLR": WarmupCosineLRParams,
    "OneCycle": OneCycleParams, "LRRangeTest": LRRangeTestParams,
}
# torch.optim.lr_scheduler classes DeepSpeed would look up by name.
KNOWN_UNSUPPORTED_SCHEDULERS = (
    "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
    "OneCycleLR", "LambdaLR", "LinearLR", "ConstantLR", "PolynomialLR", "ReduceLROnPlateau", "SequentialLR",
)


class SchedulerConfig(Section):
    """``scheduler``: one of DeepSpeed's five LR schedules; ``params`` validated with defaults filled."""

    type: Str
    params: dict[str, Any] = Field(default_factory=dict)

    def _check(self) -> list[Problem]:
        if self.type not in SUPPORTED_SCHEDULERS:
            return [_unsupported("type", self.type, list(SUPPORTED_SCHEDULERS), KNOWN_UNSUPPORTED_SCHEDULERS,
                                 "scheduler")]
        self.params, problems = _validated_params(SUPPORTED_SCHEDULERS[self.type], self.params)
        return problems


def _validated_params(model: type[_Params], params: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """``params`` checked by the type's model, with defaults filled in; or as given, and what is wrong."""
    try:
        checked = model.model_validate(params)
    except ValidationError as exc:
        return params, [(p.path, p.message, p.hint) for p in translate(exc, "params", model)]
    out = checked.model_dump()
    for key in ("betas",):
        if key in out:
            out[key] = list(out[key])
    return out, []


def _unsupported(path: str, given: str, supported: list[str], known: tuple[str, ...], what: str) -> Problem:
    names = ", ".join(supported)
    if given in known or given.lower() in {k.lower() for k in known}:
        return (path, f"{what} type {given!r} is accepted by DeepSpeed but not implemented by orch's engine",
                f"use one of: {names}" + (", or pass your own torch optimizer to engine.initialize(optimizer=...)"
                                          if what == "optimizer" else ""))
    near = closest(given, supported + list(known))
    tip = f"did you mean '{near}'? " if near else ""
    return (path, f"unknown {what} type {describe(given)}", f"{tip}supported: {names}")


def optimizer_combination_problems(cfg: Any) -> list[Problem]:
    """What DeepSpeed refuses about the optimizer together with the rest of the config."""
    opt = cfg.optimizer
    if opt is None:
        return []
    stage = cfg.zero_optimization.stage
    name = {n.lower(): n for n in SUPPORTED_OPTIMIZERS}.get(opt.type.lower(), opt.type)
    if name in COMPRESSED_OPTIMIZERS and stage > 0:
        return [("optimizer.type", f"{name} does not work with ZeRO (stage {stage}): its compressed momentum "
                 f"exchange replaces ZeRO's gradient reduction; DeepSpeed refuses it too ({_DS_REFUSAL[name]!r})",
                 "set zero_optimization.stage to 0, or use Adam/Lamb with ZeRO")]
    if name != "Lamb":
        return []
    problems: list[Problem] = []
    if cfg.fp16.enabled and cfg.fp16.loss_scale != 0:
        problems.append(("fp16.loss_scale", "Lamb requires dynamic loss scaling (DeepSpeed refuses a static "
                         f"loss_scale of {cfg.fp16.loss_scale:g} with Lamb)", "set fp16.loss_scale to 0"))
    if stage == 3:
        problems.append(("optimizer.type", "Lamb at ZeRO stage 3 is not implemented by orch's engine",
                         "use zero_optimization.stage 0, 1 or 2"))
    elif stage > 0 and not cfg.zero_allow_untested_optimizer:
        problems.append(("optimizer.type", f"Lamb with ZeRO stage {stage} is what DeepSpeed calls an untested "
                         "ZeRO optimizer and refuses unless allowed",
                         'add "zero_allow_untested_optimizer": true (orch keeps one trust ratio per parameter '
                         "across partitions), or use stage 0"))
    return problems
