"""Triton kernels. Private: import them only through the backends (they import Triton)."""
