"""curvkern: fused optimizers and a fused cross-entropy Hessian-vector product for PyTorch.

Every kernel exists three times, chosen by ``fused=``: Triton (CUDA), C++/OpenMP (CPU) and the
pure-PyTorch eager reference; see :mod:`curvkern._dispatch`.
"""

from curvkern import optim
from curvkern._dispatch import available_backends
from curvkern.ce import ce_hvp, cross_entropy
from curvkern.linear_ce import linear_ce_ggn_vp, linear_cross_entropy

__all__ = ["optim", "available_backends", "cross_entropy", "ce_hvp", "linear_cross_entropy", "linear_ce_ggn_vp"]
__version__ = "0.1.0"
