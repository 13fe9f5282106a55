"""The one place that turns ``fused=`` and the tensors' device into a backend, or an error.

Every kernel family of :data:`curvkern.families.FAMILIES` (``"hysterograd"``, ``"biostatis"``,
``"cross_entropy"``) registers the implementation each backend has with :func:`register`. :func:`select`
picks one:

- ``"eager"``: the pure-PyTorch reference, on any device.
- ``"cpp"``: the C++/OpenMP kernels of ``curvkern._C``, CPU tensors only.
- ``"triton"``: the Triton kernels, CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``).
- ``"auto"``: Triton on CUDA, C++ on CPU; the eager reference, with a one-time warning that
  says why, where that backend is not available.

An explicit backend that cannot run raises; it never silently runs something else. A family name that
is not in the registry raises ValueError everywhere here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable

import torch

from curvkern.families import BACKENDS, get_family

FUSED_CHOICES = ("auto", "eager", "cpp", "triton")

_REGISTRY: dict[tuple[str, str], Callable] = {}
_warned: set[tuple[str, str]] = set()


def register(family: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` is ``family``'s implementation on ``backend``, which satisfies the family's
    Protocol (:attr:`curvkern.families.Family.protocol`).

    Raises ValueError for a backend not in :data:`BACKENDS`, a family not in the registry, or a backend
    the family's entry does not list.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    declared = get_family(family).backends
    if backend not in declared:
        raise ValueError(f"{family}: backend {backend!r} is not among its Family entry's backends {declared}")

    def decorator(fn: Callable) -> Callable:
        _REGISTRY[(family, backend)] = fn
        return fn

    return decorator


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``, whose local shard no kernel may take for
    the whole tensor. No DTensor exists unless its module was imported: plain calls pay one dict lookup."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def check_fused(fused: object) -> str:
    """Validate a ``fused=`` argument (for constructors and functions, before any work)."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {fused!r}")
    return fused  # type: ignore[return-value]


# Answers that cannot change within a process, found once. Module globals rather than functools.cache:
# select() runs inside every step, and Dynamo traces a cached function's body again (an import, a module
# search) where it reads a global as a constant.
_NOT_LOOKED_UP = object()
_cpp_reason: object = _NOT_LOOKED_UP
_triton_installed: object = _NOT_LOOKED_UP


def cpp_unavailable_reason() -> str | None:
    """Why ``curvkern._C`` cannot be used, or None when it loaded."""
    global _cpp_reason
    if _cpp_reason is _NOT_LOOKED_UP:
        try:
            from curvkern import _C  # noqa: F401
        except ImportError as exc:
            _cpp_reason = (
                f"the C++ extension curvkern._C is not built ({exc}); "
                "build it with `make venv` or `pip install --no-build-isolation -e .`"
            )
        else:
            _cpp_reason = None
    return _cpp_reason  # type: ignore[return-value]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``, or None when they can."""
    global _triton_installed
    if _triton_installed is _NOT_LOOKED_UP:
        _triton_installed = importlib.util.find_spec("triton") is not None
    if not _triton_installed:
        needs_interpreter = (
            " and, for CPU tensors, TRITON_INTERPRET=1 (the interpreter)" if device.type == "cpu" else ""
        )
        return f"Triton is not installed (pip install triton){needs_interpreter}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    if device.type == "cpu":
        return "Triton kernels run on CUDA tensors; CPU tensors need TRITON_INTERPRET=1 (the interpreter)"
    return f"Triton kernels run on CUDA tensors, got a tensor on {device}"


def _unavailable_reason(family: str, backend: str, device: torch.device) -> str | None:
    if backend == "cpp":
        if device.type != "cpu":
            return f"fused='cpp' runs on CPU tensors, got a tensor on {device}"
        return cpp_unavailable_reason()
    if backend == "triton":
        return triton_unavailable_reason(device)
    return None


def eager_for_missing_variants(family: str, backend: str, missing: list[str]) -> Callable:
    """``fused="auto"`` chose ``backend``, which lacks the loss variants ``missing`` a call asks for: the eager
    reference (which implements every variant), with a one-time RuntimeWarning naming them, as ``select`` warns
    where a kernel is missing. An explicit ``fused=backend`` raises instead (the families' functions)."""
    key = (family, f"{backend} without {', '.join(missing)}")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"curvkern: {family} runs the eager reference because its {backend} kernels do not implement "
            f"{', '.join(missing)} yet",
            RuntimeWarning,
            stacklevel=4,
        )
    return _REGISTRY[(family, "eager")]


def _not_implemented(family: str, backend: str) -> NotImplementedError:
    return NotImplementedError(f"{family}: fused={backend!r} has no kernel")


def select(family: str, fused: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend, implementation)`` for ``family`` on ``device``, or raise."""
    fused = check_fused(fused)
    get_family(family)  # an unknown name raises, naming the known families
    device = torch.device(device)
    if fused == "auto":
        preferred = "triton" if device.type == "cuda" else "cpp"
        reason = _unavailable_reason(family, preferred, device)
        if reason is None and (family, preferred) not in _REGISTRY:
            reason = str(_not_implemented(family, preferred))
        if reason is None:
            return preferred, _REGISTRY[(family, preferred)]
        if (family, preferred) not in _warned:
            _warned.add((family, preferred))
            warnings.warn(
                f"curvkern: {family} on {device.type} runs the eager reference because {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        return "eager", _REGISTRY[(family, "eager")]
    # Why a backend cannot run here (Triton not installed, a tensor on the wrong device) comes first:
    # a backend whose module could not be imported has no registered kernel either.
    reason = _unavailable_reason(family, fused, device)
    if reason is not None:
        raise RuntimeError(f"{family}: fused={fused!r} cannot run: {reason}")
    if (family, fused) not in _REGISTRY:
        raise _not_implemented(family, fused)
    return fused, _REGISTRY[(family, fused)]


def available_backends(family: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that implement ``family`` and can run on ``device``: what tests parametrize over.
    Raises ValueError for a family not in the registry."""
    get_family(family)
    device = torch.device(device)
    return [
        backend
        for backend in BACKENDS
        if (family, backend) in _REGISTRY and _unavailable_reason(family, backend, device) is None
    ]


def _cpp_ops():
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.curvkern


def cpu_capability() -> str:
    """The instruction set the C++ kernels run: ``"default"`` (baseline), ``"avx2"`` (x86-64-v3) or
    ``"avx512"`` (x86-64-v4). The best this CPU supports, unless the environment variable
    ``CURVKERN_CPU_CAPABILITY`` names another (read once, at the first kernel call).

    Raises RuntimeError if ``CURVKERN_CPU_CAPABILITY`` is unknown or names one this CPU cannot run, or
    if ``curvkern._C`` is not built.
    """
    return _cpp_ops().cpu_capability()


def cpu_capabilities() -> list[str]:
    """Every value of ``CURVKERN_CPU_CAPABILITY`` this CPU can run, ascending, e.g.
    ``["default", "avx2", "avx512"]`` (``["default"]`` off x86-64). Raises RuntimeError if
    ``curvkern._C`` is not built."""
    return list(_cpp_ops().cpu_capabilities())
