"""Fused optimizers: HysteroGrad (also exported as HIOptimizer) and BiostatisV6."""

from curvkern.optim.biostatis import BiostatisV6
from curvkern.optim.hysterograd import HIOptimizer, HysteroGrad

__all__ = ["HysteroGrad", "HIOptimizer", "BiostatisV6"]
