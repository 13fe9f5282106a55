"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` computed over tiles of the logits,
with its gradient, its exact Hessian-vector product and its Gauss-Newton product (docs/linear_cross_entropy.md).

Three backends register with the dispatch (family ``"linear_cross_entropy"``): the eager reference
(:mod:`curvkern.linear_ce.eager`), the C++/OpenMP kernels (:mod:`curvkern.linear_ce.cpp`) and the Triton
kernels (:mod:`curvkern.linear_ce.triton`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
:mod:`curvkern.linear_ce.function` holds the public functions.
"""

from curvkern.linear_ce import cpp, eager, triton  # noqa: F401  (register their kernels)
from curvkern.linear_ce.function import linear_ce_ggn_vp, linear_cross_entropy

__all__ = ["linear_cross_entropy", "linear_ce_ggn_vp"]
