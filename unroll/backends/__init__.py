"""Backends: the reference interpreter, the lowering the compiled targets share, and the targets.

    numpy_ref.py   the executable spec: every op's meaning in plain numpy
    lower/         what every compiled target shares (scalar expression table, index maps,
                   named decompositions)
    cpu/           Numba CPU: generated @njit source, packed-weight GEMM, BLAS entry point
    cuda/          numba.cuda: kernel plans, generated @cuda.jit source, runtime, grid emulator

`BACKENDS` maps a backend's user-facing name to its module; each module exposes
`compile_graph(graph, **options)` and `PASSES`, the pass pipeline it wants from `ir.optimize`
(read by `ur.compile`, so this is the one place that says what a backend receives).
"""

BACKENDS = {
    "numpy": "unroll.backends.numpy_ref",
    "numba": "unroll.backends.cpu",
    "cuda": "unroll.backends.cuda",
}
