"""BiostatisV6: the optimizer class, and the backends its step runs on (side by side)."""
import importlib.util

from curvkern.optim.biostatis import eager  # noqa: F401  (registers the eager backend)
from curvkern.optim.biostatis.optimizer import BiostatisV6

if importlib.util.find_spec("triton") is not None:
    from curvkern.optim.biostatis import triton  # noqa: F401  (registers the Triton kernels)

__all__ = ["BiostatisV6"]
