"""Drop-ins for other libraries' hooks, built on curvkern's kernels."""
