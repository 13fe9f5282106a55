"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` computed over tiles of the logits,
with its gradient, its exact Hessian-vector product and its Gauss-Newton product (docs/linear_cross_entropy.md).

Today only the eager reference exists (:mod:`curvkern.linear_ce.eager`); :mod:`curvkern.linear_ce.function`
holds the public functions and the backend choice.
"""

from curvkern.linear_ce.function import linear_ce_ggn_vp, linear_cross_entropy

__all__ = ["linear_cross_entropy", "linear_ce_ggn_vp"]
