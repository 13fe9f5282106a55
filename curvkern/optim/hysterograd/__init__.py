"""HysteroGrad: the optimizer class, and the backends its step runs on (side by side)."""
import importlib.util

from curvkern.optim.hysterograd import eager  # noqa: F401  (registers the eager reference)
from curvkern.optim.hysterograd.optimizer import HIOptimizer, HysteroGrad

if importlib.util.find_spec("triton") is not None:
    from curvkern.optim.hysterograd import triton  # noqa: F401  (registers the Triton kernels)

__all__ = ["HysteroGrad", "HIOptimizer"]
