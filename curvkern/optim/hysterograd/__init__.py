"""HysteroGrad: the optimizer class, and the backends its step runs on (side by side)."""
from curvkern._dispatch import cpp_unavailable_reason
from curvkern.optim.hysterograd import eager  # noqa: F401  (registers the eager reference)
from curvkern.optim.hysterograd.optimizer import HIOptimizer, HysteroGrad

if cpp_unavailable_reason() is None:
    from curvkern.optim.hysterograd import cpp  # noqa: F401  (registers the C++/OpenMP kernels)

__all__ = ["HysteroGrad", "HIOptimizer"]
