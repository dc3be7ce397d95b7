"""The Numba CPU backend (`backend="numba"`): see `backend` for the compile path and caching."""

from .backend import (FLEXIBLE_SHAPES, PASSES, STATS, NumbaBackendError, NumbaKernel, UnsupportedOp, compile_graph,
                      respecialize)

__all__ = ["FLEXIBLE_SHAPES", "PASSES", "NumbaBackendError", "NumbaKernel", "STATS", "UnsupportedOp", "compile_graph",
           "respecialize"]
