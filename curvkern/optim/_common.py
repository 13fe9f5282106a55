"""What both optimizers share: input checks, validation, low-precision policy, the FusedOptimizer base."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from curvkern._dispatch import check_fused, select

# Parameters in these dtypes keep fp32 optimizer state and do their math in fp32; the result is
# written back to the parameter rounded to nearest even (a deliberate deviation from the originals,
# whose bf16/fp16 state loses small updates or overflows to inf/NaN).
LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """dtype of a parameter's optimizer state and of the elementwise math on it."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


@contextmanager
def updated_in_math_dtype(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield ``param`` to update in place in its math dtype (:func:`state_dtype`).

    A low-precision parameter is updated as an fp32 copy, written back rounded to nearest even.
    """
    if param.dtype not in LOW_PRECISION:
        yield param
        return
    work = param.float()
    yield work
    param.copy_(work)


def check_params(name: str, params: Iterable[torch.Tensor]) -> torch.device | None:
    """Reject what no backend supports; return the one device the tensors share (None if empty)."""
    device = None
    for p in params:
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters (got one of dtype {p.dtype})")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} supports parameters of dtype float16, bfloat16, float32 and float64, got {p.dtype}"
            )
        if device is None:
            device = p.device
        elif p.device != device:
            raise RuntimeError(
                f"{name}: all parameters of a param group must be on one device, got {device} and "
                f"{p.device}; put parameters on different devices in different param groups"
            )
    return device


def grad_of(name: str, param: torch.Tensor) -> torch.Tensor | None:
    grad = param.grad
    if grad is None:
        return None
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    return grad


def by_dtype(params: list[torch.Tensor], *companions: list) -> list[tuple[list, ...]]:
    """Split ``params`` and the lists parallel to it into one bucket per parameter dtype.

    A fused kernel streams one dtype at a time; a group that mixes dtypes (fp32 norms beside bf16
    weights) runs one call per dtype, in order of first appearance.
    """
    if len({p.dtype for p in params}) <= 1:
        return [(params, *companions)]
    buckets: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(p.dtype, []).append(i)
    return [tuple([items[i] for i in indices] for items in (params, *companions)) for indices in buckets.values()]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    return float(value)


def require_range(name: str, value: object, low: float | None = None, high: float | None = None,
                  *, low_open: bool = False, high_open: bool = False) -> float:
    """Check ``low <= value <= high`` (with open ends where asked) and say the range when it fails."""
    x = _number(name, value)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        bounds = ("(" if low_open or low is None else "[") + f"{left}, {right}" + (")" if high_open or high is None else "]")
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


def lr_on(lr: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """The group's lr as the backends take it: a float, or a 0-dim tensor on the parameters' device.

    The tensor is a view of the group's own when it already lives there, so a scheduler that updates
    it in place (torch's do, with ``fill_``) changes the lr that a captured CUDA graph replays.
    """
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    # Host to device needs no sync; device to host must wait for the value.
    return lr.detach().reshape(()).to(device, non_blocking=device.type != "cpu")


def lr_as(lr: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """lr where the reference meets a tensor of ``dtype``: a tensor lr acts as the float it holds.

    A Python float meeting a tensor is converted to the tensor's dtype first; a 0-dim lr tensor is
    converted the same way here, so both give the same bits.
    """
    return lr.to(dtype) if isinstance(lr, torch.Tensor) else lr


def lr_tensor(lr: float | torch.Tensor) -> torch.Tensor:
    """lr as the C++ ops take it: a 0-dim tensor (a float is wrapped exactly, in float64)."""
    return lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)


def restore_state(optimizer: torch.optim.Optimizer, state_dict: dict, convert) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every floating state tensor to its parameter's dtype.

    That cast would round fp32 state of a bf16 parameter, or a group scalar kept in the default
    dtype, to the parameter's dtype. After the base class has checked and mapped the state,
    ``convert(param, key, saved_value)`` rebuilds each entry from the saved value.
    """
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, param in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if saved is not None:
            optimizer.state[param] = {key: convert(param, key, value) for key, value in saved.items()}


class FusedOptimizer(torch.optim.Optimizer):
    """What both optimizers share around their step: ``fused=``, group validation, state restore.

    ``fused`` is an attribute, not a hyperparameter: ``state_dict()`` does not carry it, so a
    checkpoint saved under one mode loads under every other.
    """

    family: str  # the kernel family in curvkern._dispatch

    def __init__(self, params, defaults: dict, fused: str):
        self.fused = check_fused(fused)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _restore_entry(self, param: torch.Tensor, key: str, value):
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            device = check_params(type(self).__name__, group["params"])
            if device is not None:
                select(self.family, self.fused, device)  # an explicit backend that cannot run fails here
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state(self, state_dict, self._restore_entry)
