"""Fused cross-entropy whose backward and double backward (the Hessian-vector product) are kernels.

The backends sit side by side (``eager``, ``cpp``, ``triton``) and register themselves with
:mod:`curvkern._dispatch`; :mod:`curvkern.ce.function` holds the public functions.
"""

from curvkern.ce import cpp, eager, triton  # noqa: F401  (register their kernels)
from curvkern.ce.function import ce_hvp, cross_entropy

__all__ = ["cross_entropy", "ce_hvp"]
