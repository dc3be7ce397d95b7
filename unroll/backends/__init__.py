"""Backends: numpy_ref (the executable spec), numba_cpu and numba_cuda (compiled)."""
