"""One hyperparameter record per kernel family: what every backend of the family receives.

Each record is a frozen dataclass whose fields are the family's hyperparameters, in the order of its
public API's arguments, and whose field defaults are that API's defaults (the optimizers' constructors
and ``cross_entropy`` take their defaults from here). An optimizer's record also holds the checks
(:meth:`~HysteroGradHyperparameters.validate`) that its constructor, ``add_param_group`` and
``load_state_dict`` apply to a param group, and builds, at every step, the record its backend receives
(:meth:`~HysteroGradHyperparameters.from_group`).

``lr`` is part of the optimizers' records: every backend needs it, and a record rebuilt at each step
from the param group sees what an LR scheduler wrote there. It is a float, or a 0-dim tensor on the
parameters' device (a tensor lr, which a captured CUDA graph replays with whatever value a scheduler
writes into it in place). Building a record reads nothing back from a device and checks nothing: the
checks ran when the group was added or loaded.

This module imports only torch, so :mod:`curvkern.families` and :mod:`curvkern._dispatch` can name the
records without importing any family's package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    return float(value)


def require_range(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check ``low <= value <= high`` (with open ends where asked) and say the range when it fails.

    Raises ValueError naming ``name`` for a value that is not a finite int or float (bools included) or
    lies outside the range; returns the value as a float.
    """
    x = _number(name, value)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        bounds = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"Invalid {name}: {value!r} (expected a value in {bounds})")
    return x


def require_lr(value: object) -> None:
    """lr is a number, or a 1-element real tensor holding one (read once here, never in a step)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"Invalid lr: a tensor lr must hold one floating-point element, got shape {tuple(value.shape)} "
                f"and dtype {value.dtype}"
            )
        require_range("lr", value.detach().double().item(), 0)
    else:
        require_range("lr", value, 0)


def require_sequence(name: str, value: object, length: int | None = None) -> Sequence:
    """``value`` if it is a sequence (not a string) of ``length`` items when given; else ValueError."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or (length is not None and len(value) != length)
    ):
        what = f"a sequence of {length} numbers" if length is not None else "a sequence of numbers"
        raise ValueError(f"Invalid {name}: {value!r} (expected {what})")
    return value


def lr_on(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """The group's lr as the backends take it: a float, or a 0-dim tensor on the parameters' device.

    The tensor is a view of the group's own when it already lives there, so a scheduler that updates
    it in place (torch's do, with ``fill_``) changes the lr that a captured CUDA graph replays.
    """
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    # Host to device needs no sync; device to host must wait for the value.
    return lr.detach().reshape(()).to(device, non_blocking=device.type != "cpu")


def _floats(values: Sequence) -> tuple[float, ...]:
    return tuple(float(x) for x in values)


@dataclass(frozen=True)
class HysteroGradHyperparameters:
    """HysteroGrad's hyperparameters (docs/hysterograd.md, "Hyperparameters"), as its backends take them.

    ``initial_temp`` only seeds the group temperature T when a group first steps; the backends read the
    others. ``grad_clip`` None or 0 means no clipping.
    """

    lr: float | torch.Tensor = 1e-3
    stiffening_factor: float = 0.01
    beta: float = 0.99
    epsilon: float = 1e-7
    cooling_rate: float = 0.99
    initial_temp: float = 1.0
    metric_scale: float = 1.0
    adaptive_threshold: bool = True
    grad_clip: float | None = None
    hysteresis_scale: float = 1.0

    @staticmethod
    def validate(group: Mapping) -> None:
        """Raise ValueError, naming the hyperparameter and the range it must lie in, unless every one in
        ``group`` (a param group dict holding all of them) is valid. A tensor lr is read once, here."""
        require_lr(group["lr"])
        require_range("stiffening_factor", group["stiffening_factor"], 0)
        require_range("beta", group["beta"], 0, 1, high_open=True)
        # ε = 0 turns a zero gradient on a zero metric into 0/0 = NaN, freezing the group forever.
        require_range("epsilon", group["epsilon"], 0, low_open=True)
        require_range("cooling_rate", group["cooling_rate"], 0, 1)
        require_range("initial_temp", group["initial_temp"])
        require_range("metric_scale", group["metric_scale"], 0, low_open=True)
        require_range("hysteresis_scale", group["hysteresis_scale"], 0)
        if not isinstance(group["adaptive_threshold"], bool):
            raise ValueError(f"Invalid adaptive_threshold: {group['adaptive_threshold']!r} (expected True or False)")
        if group["grad_clip"] is not None:
            # 0 means "off", as in the original; a negative clip would make τ negative and √τ NaN.
            require_range("grad_clip", group["grad_clip"], 0)

    @classmethod
    def from_group(cls, group: Mapping, device: torch.device) -> HysteroGradHyperparameters:
        """The record of a validated param group for one step on ``device``: numbers as floats, lr as
        :func:`lr_on` gives it."""
        grad_clip = group["grad_clip"]
        return cls(
            lr=lr_on(group["lr"], device),
            stiffening_factor=float(group["stiffening_factor"]),
            beta=float(group["beta"]),
            epsilon=float(group["epsilon"]),
            cooling_rate=float(group["cooling_rate"]),
            initial_temp=float(group["initial_temp"]),
            metric_scale=float(group["metric_scale"]),
            adaptive_threshold=bool(group["adaptive_threshold"]),
            grad_clip=None if grad_clip is None else float(grad_clip),
            hysteresis_scale=float(group["hysteresis_scale"]),
        )


@dataclass(frozen=True)
class BiostatisHyperparameters:
    """BiostatisV6's hyperparameters (docs/biostatis.md, "Hyperparameters and constants"), as its
    backends take them: ``betas`` a pair, ``memory_decays`` and ``memory_weights`` tuples of one length
    (one memory EMA per decay, possibly none)."""

    lr: float | torch.Tensor = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    homeo_rate: float = 0.03
    coherence_target: float = 0.8
    energy_target: float = 1e-3
    lambda_energy: float = 0.1
    memory_decays: tuple[float, ...] = (0.9, 0.99)
    memory_weights: tuple[float, ...] = (0.6, 0.4)
    flip_threshold: float = 0.2
    ascent_strength: float = 0.05

    @staticmethod
    def validate(group: Mapping) -> None:
        """Raise ValueError, naming the hyperparameter (and the item of a sequence), unless every one in
        ``group`` is valid; ``memory_decays`` and ``memory_weights`` must have the same length (the
        original's ``zip`` silently truncates). A tensor lr is read once, here."""
        require_lr(group["lr"])
        for i, beta in enumerate(require_sequence("betas", group["betas"], 2)):
            require_range(f"betas[{i}]", beta, 0, 1, high_open=True)
        require_range("eps", group["eps"], 0)
        require_range("weight_decay", group["weight_decay"], 0)
        require_range("homeo_rate", group["homeo_rate"], 0)
        require_range("coherence_target", group["coherence_target"])
        require_range("energy_target", group["energy_target"], 0)
        require_range("lambda_energy", group["lambda_energy"], 0)
        require_range("flip_threshold", group["flip_threshold"])
        require_range("ascent_strength", group["ascent_strength"], 0)
        decays = require_sequence("memory_decays", group["memory_decays"])
        weights = require_sequence("memory_weights", group["memory_weights"])
        for i, decay in enumerate(decays):
            require_range(f"memory_decays[{i}]", decay, 0, 1, high_open=True)
        for i, weight in enumerate(weights):
            require_range(f"memory_weights[{i}]", weight)
        if len(decays) != len(weights):
            raise ValueError(
                f"Invalid memory_decays and memory_weights: they pair up one to one, got {len(decays)} "
                f"memory_decays and {len(weights)} memory_weights"
            )

    @classmethod
    def from_group(cls, group: Mapping, device: torch.device) -> BiostatisHyperparameters:
        """The record of a validated param group for one step on ``device``: numbers as floats, sequences
        as tuples of floats, lr as :func:`lr_on` gives it."""
        return cls(
            lr=lr_on(group["lr"], device),
            betas=_floats(group["betas"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            homeo_rate=float(group["homeo_rate"]),
            coherence_target=float(group["coherence_target"]),
            energy_target=float(group["energy_target"]),
            lambda_energy=float(group["lambda_energy"]),
            memory_decays=_floats(group["memory_decays"]),
            memory_weights=_floats(group["memory_weights"]),
            flip_threshold=float(group["flip_threshold"]),
            ascent_strength=float(group["ascent_strength"]),
        )


@dataclass(frozen=True)
class CrossEntropyHyperparameters:
    """The cross-entropy's hyperparameters (docs/cross_entropy.md), as ``cross_entropy`` and ``ce_hvp``
    take them.

    The kernels read ``ignore_index`` (rows whose label it is give 0) and ``label_smoothing`` α (the
    target distribution ``(1 − α)·e_y + α/V``); ``reduction`` ("mean", "sum" or "none") is applied
    outside them, as the per-row scale they are passed. The public functions check these values among
    their tensor checks, in ``F.cross_entropy``'s order and with its messages
    (:mod:`curvkern.ce.function`), and build the record from checked values.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"

    # The loss variants, fixed at their defaults here (class attributes, not fields): the record of
    # ``linear_cross_entropy``, which takes none of them. ``cross_entropy`` takes them as fields of
    # :class:`CrossEntropyLossHyperparameters`, so every kernel reads ``h.z_loss`` etc. from either record.
    z_loss = 0.0
    softcap = None
    weight = None


@dataclass(frozen=True)
class CrossEntropyLossHyperparameters(CrossEntropyHyperparameters):
    """``cross_entropy``'s and ``ce_hvp``'s hyperparameters: :class:`CrossEntropyHyperparameters` and the loss
    variants language-model training uses (docs/cross_entropy.md, "Loss variants").

    - ``z_loss`` λ ≥ 0: λ·lse(z)² is added to each valid row's loss (PaLM), reduced with it.
    - ``softcap`` c > 0 or None: the logits are capped, z ← c·tanh(z/c), before everything else (Gemma 2).
    - ``weight``: None or a (C,) tensor of per-class weights in the logits' dtype and on their device, as
      ``F.cross_entropy``'s ``weight`` (the weighted mean divides by Σ w_{y_r} over the valid rows).
      Compared by identity (a tensor has no truth value).

    Building the record checks ``z_loss`` and ``softcap`` (ValueError naming them); :meth:`check_weight`
    checks ``weight`` against the logits.
    """

    z_loss: float = 0.0
    softcap: float | None = None
    weight: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "z_loss", require_range("z_loss", self.z_loss, 0.0))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", require_range("softcap", self.softcap, 0.0, low_open=True))

    def check_weight(self, num_classes: int, dtype: torch.dtype, device: torch.device) -> None:
        """``weight`` must be None or a (``num_classes``,) tensor of ``dtype`` on ``device``, and finite where it
        is on the CPU (on a GPU the check would cost a host synchronization). Raises ValueError naming it."""
        weight = self.weight
        if weight is None:
            return
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"Invalid weight: expected a tensor of shape ({num_classes},) or None, got {type(weight)}")
        if weight.shape != (num_classes,) or weight.dtype != dtype or weight.device != device:
            raise ValueError(
                f"Invalid weight: expected a ({num_classes},) {dtype} tensor on {device} (one weight per class, in "
                f"the logits' dtype and on their device), got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
            )
        if weight.device.type == "cpu" and not bool(torch.isfinite(weight).all()):
            raise ValueError("Invalid weight: expected finite class weights, got inf or NaN")


def loss_variants(h: CrossEntropyHyperparameters, soft_targets: bool = False) -> tuple[str, ...]:
    """The names of the loss variants a call uses: ``z_loss``, ``softcap``, ``weight`` (and ``weight with label
    smoothing`` when both are given) and ``probability targets`` (a floating ``target`` shaped like the
    logits); a backend that lacks one raises naming it."""
    names = ("z_loss",) if h.z_loss else ()
    names += ("softcap",) if h.softcap is not None else ()
    names += ("weight",) if h.weight is not None else ()
    names += ("weight with label smoothing",) if h.weight is not None and h.label_smoothing else ()
    return names + (("probability targets",) if soft_targets else ())
