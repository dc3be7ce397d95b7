"""The numba.cuda backend (`backend="cuda"`): see `backend` for the program it builds and runs."""

from .backend import FLEXIBLE_SHAPES, PASSES, CudaCompiled, Options, Program, build_program, compile_graph

__all__ = ["FLEXIBLE_SHAPES", "PASSES", "CudaCompiled", "Options", "Program", "build_program", "compile_graph"]
