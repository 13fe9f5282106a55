"""BiostatisV6: the optimizer class, and the backends its step runs on (side by side)."""
from curvkern.optim.biostatis import eager  # noqa: F401  (registers the eager backend)
from curvkern.optim.biostatis.optimizer import BiostatisV6

__all__ = ["BiostatisV6"]
