"""HysteroGrad: the optimizer class, and the backends its step runs on (side by side)."""
from curvkern.optim.hysterograd import eager  # noqa: F401  (registers the eager reference)
from curvkern.optim.hysterograd.optimizer import HIOptimizer, HysteroGrad

__all__ = ["HysteroGrad", "HIOptimizer"]
