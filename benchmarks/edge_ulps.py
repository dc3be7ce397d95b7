"""Print the measured max float32 ulps per elementwise op against numpy, on one backend, over the
edge values of tests/edge_cases.py (±0, subnormals, ±1e-30, ±1, ±20, ±1e4, ±1e30, ±inf, NaN), with
and without the backend's passes. The allowed bounds are tests/edge_cases.MAX_ULPS (the tests).

    python benchmarks/edge_ulps.py numba
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/edge_ulps.py cuda      # the CUDA simulator
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_edge_values as edge  # noqa: E402

import unroll as ur  # noqa: E402
from unroll.ir import Graph  # noqa: E402


def measured_ulps(backend: str) -> dict[str, int]:
    worst: dict[str, int] = {}
    for family in ("unary", "binary"):
        outs, feeds, inputs = edge._cases(family, "float32")
        graph = Graph(inputs, [node for _, node in outs])
        for optimize in (False, True):
            got = ur.compile(graph, backend=backend, optimize=optimize)(**feeds)
            for (label, node), value in zip(outs, got):
                expected = edge.expected_value(node.op, [feeds[s.arg] for s in node.src])
                worst[label] = max(worst.get(label, 0), int(edge.ulps(value, expected).max()))
    return dict(sorted(worst.items()))


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "numba"
    table = measured_ulps(name)
    print(f"{name}: " + ", ".join(f"{op} {u}" for op, u in table.items()))
