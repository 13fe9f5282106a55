"""BiostatisV6: hyperparameters, state, grouping, then one backend call per group."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from curvkern._dispatch import select
from curvkern.optim._common import FusedOptimizer, check_params, grad_of, lr_on, require_lr, require_range, state_dtype

_NAME = "BiostatisV6"
HYPERPARAMETERS = (
    "lr", "betas", "eps", "weight_decay", "homeo_rate", "coherence_target", "energy_target",
    "lambda_energy", "memory_decays", "memory_weights", "flip_threshold", "ascent_strength",
)
SEQUENCE_HYPERPARAMETERS = ("betas", "memory_decays", "memory_weights")


class BiostatisV6(FusedOptimizer):
    """Adam with homeostatic gains, multi-scale gradient EMAs, a polarity term and "selective ascent".

    Semantics of ``BiostatisV6`` from github Hindolch/V6-optimizer (``docs/biostatis.md``),
    quirks included: the asymmetric polarity ``g·(1 + 0.5·sign(g)·τ)``, the "ascent" that adds
    descent, the importance test on un-bias-corrected ``m, v`` with ``mean(√v)``, the fp32 rounding
    of ``tanh(C − c*)``, count-weighted group means, per-tensor step counts, and decoupled weight
    decay applied before the update is added. Group gains are computed per param group, so how the
    parameters are grouped changes the update.

    ``fused`` picks the backend: ``"eager"``, ``"cpp"``, ``"triton"`` or ``"auto"`` (see
    :mod:`curvkern._dispatch`). It is not saved in ``state_dict()``, so a checkpoint loads under
    every mode. The step never reads a tensor back to the host.

    State per parameter (created on its first step with a gradient): ``step`` (a 0-dim float32
    CPU tensor, as torch.optim keeps it; the original's int steps load too), ``exp_avg``,
    ``exp_avg_sq`` and ``memory_emas`` (a list, one tensor per memory decay).

    ``capturable=True`` (torch.optim's name, as in ``Adam``) keeps ``step`` on the parameter's device
    instead, so a whole ``step()`` can be captured in a CUDA graph. Like ``fused``, it is an attribute,
    not saved in ``state_dict()``: a checkpoint loads in either mode, ``step`` moved where it belongs.
    ``lr`` may be a 1-element tensor, as in torch.optim: it acts as the float it holds, and a scheduler
    that updates it in place changes the lr a captured graph replays.

    Deliberate deviations from the original:

    - hyperparameters are validated, and ``memory_decays`` and ``memory_weights`` must have the
      same length (the original's ``zip`` silently truncates);
    - bf16/fp16 parameters keep their state in fp32 and do all their math in fp32, the result
      written back rounded to nearest even (the original's bf16 state loses small updates and its
      fp16 state gives inf/NaN from the first step);
    - the scalars (cosine, importance, gains, coefficients) are computed on the device in float64
      from per-tensor sums accumulated in the state dtype, not on the host from the original's
      means (ulp-level differences in fp32; the importance test ``I < θ`` can flip only for an
      ``I`` within rounding of θ);
    - non-contiguous gradients work (the original's ``.view(-1)`` raises); sparse gradients,
      complex parameters and a group spread over several devices raise;
    - empty parameters get state and step counts like any other but add nothing to the group
      sums or element count, and are not updated.
    """

    family = "biostatis"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        homeo_rate: float = 0.03,
        coherence_target: float = 0.8,
        energy_target: float = 1e-3,
        lambda_energy: float = 0.1,
        memory_decays: tuple[float, ...] = (0.9, 0.99),
        memory_weights: tuple[float, ...] = (0.6, 0.4),
        flip_threshold: float = 0.2,
        ascent_strength: float = 0.05,
        *,
        fused: str = "auto",
        capturable: bool = False,
    ):
        self.capturable = capturable
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            homeo_rate=homeo_rate,
            coherence_target=coherence_target,
            energy_target=energy_target,
            lambda_energy=lambda_energy,
            memory_decays=memory_decays,
            memory_weights=memory_weights,
            flip_threshold=flip_threshold,
            ascent_strength=ascent_strength,
        )
        super().__init__(params, defaults, fused)

    def _validate_group(self, group: dict) -> None:
        require_lr(group["lr"])
        for i, beta in enumerate(_sequence("betas", group["betas"], 2)):
            require_range(f"betas[{i}]", beta, 0, 1, high_open=True)
        require_range("eps", group["eps"], 0)
        require_range("weight_decay", group["weight_decay"], 0)
        require_range("homeo_rate", group["homeo_rate"], 0)
        require_range("coherence_target", group["coherence_target"])
        require_range("energy_target", group["energy_target"], 0)
        require_range("lambda_energy", group["lambda_energy"], 0)
        require_range("flip_threshold", group["flip_threshold"])
        require_range("ascent_strength", group["ascent_strength"], 0)
        decays = _sequence("memory_decays", group["memory_decays"])
        weights = _sequence("memory_weights", group["memory_weights"])
        for i, decay in enumerate(decays):
            require_range(f"memory_decays[{i}]", decay, 0, 1, high_open=True)
        for i, weight in enumerate(weights):
            require_range(f"memory_weights[{i}]", weight)
        if len(decays) != len(weights):
            raise ValueError(
                f"Invalid memory_decays and memory_weights: they pair up one to one, got {len(decays)} "
                f"memory_decays and {len(weights)} memory_weights"
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads = [], []
            for param in group["params"]:
                grad = grad_of(_NAME, param)
                if grad is not None:
                    params.append(param)
                    grads.append(grad)
            if not params:
                continue  # as the original: no decay, no state, no step counts
            device = check_params(_NAME, group["params"])

            n_memories = len(group["memory_decays"])
            exp_avgs, exp_avg_sqs, memory_emas, state_steps = [], [], [], []
            for param in params:
                state = self.state[param]
                if not state:
                    zeros = lambda: torch.zeros_like(  # noqa: E731
                        param, dtype=state_dtype(param), memory_format=torch.preserve_format
                    )
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=self._step_device(param))
                    state["exp_avg"] = zeros()
                    state["exp_avg_sq"] = zeros()
                    state["memory_emas"] = [zeros() for _ in range(n_memories)]
                if len(state["memory_emas"]) != n_memories:
                    raise ValueError(
                        f"{_NAME}: a parameter has {len(state['memory_emas'])} memory EMAs but its group's "
                        f"memory_decays has {n_memories} entries"
                    )
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                memory_emas.append(state["memory_emas"])
                state_steps.append(state["step"])

            _, step_fn = select(self.family, self.fused, device)
            step_fn(
                params, grads, exp_avgs, exp_avg_sqs, memory_emas, state_steps,
                **_hyperparameters(group, device),
            )
        return loss

    def _step_device(self, param: torch.Tensor) -> torch.device:
        return param.device if self.capturable else torch.device("cpu")

    def _restore_entry(self, param: torch.Tensor, key: str, value):
        if key == "step":
            # The original keeps a Python int.
            if isinstance(value, torch.Tensor):
                return value.detach().to(device=self._step_device(param), dtype=torch.float32, copy=True).reshape(())
            return torch.tensor(float(value), dtype=torch.float32, device=self._step_device(param))
        if key in ("exp_avg", "exp_avg_sq"):
            return value.to(device=param.device, dtype=state_dtype(param), copy=True)
        if key == "memory_emas":
            return [ema.to(device=param.device, dtype=state_dtype(param), copy=True) for ema in value]
        return copy.deepcopy(value)


def _hyperparameters(group: dict, device: torch.device) -> dict:
    """The group's 12 hyperparameters as the backends take them: floats and tuples, lr maybe a tensor."""
    values = {
        key: tuple(float(x) for x in group[key]) if key in SEQUENCE_HYPERPARAMETERS else float(group[key])
        for key in HYPERPARAMETERS if key != "lr"
    }
    return {"lr": lr_on(group["lr"], device), **values}


def _sequence(name: str, value: object, length: int | None = None) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or (
        length is not None and len(value) != length
    ):
        what = f"a sequence of {length} numbers" if length is not None else "a sequence of numbers"
        raise ValueError(f"Invalid {name}: {value!r} (expected {what})")
    return value
