"""Every elementwise op of the CUDA backend at the edge values of `tests/edge_cases.py`, run in numba's
CUDA simulator and compared with numpy's float32 results (the reference interpreter) in ulps:
`max ulps <= MAX_ULPS[op]` (ops the table does not list, where/cast/stop_gradient, must be exact).

What this checks: the semantics of the generated source, i.e. the typed literals (float32 math
stays float32), the NaN rules of the selects (maximum/minimum/relu/sign), the branches of the
stable sigmoid, casts, compares and where, and the pow(x, 2.0) -> x * x rewrite.
What it does not check: the precision of a GPU's libdevice. The simulator runs a kernel as Python,
so `math.exp` & co. are the host's double-precision functions rounded to float32 (through
`cuda.gridsim.IEEE_MATH`, which returns IEEE values where Python's math raises, e.g. log(0) = -inf,
as libdevice does); on a GPU they are libdevice's float32 functions.

The simulator is slow, so all ops run as the outputs of one graph, in one child process (the
simulator must be switched on before numba is imported); the parent reads its results (JSON) and
checks each op in its own test. Run this file as a script to print the op -> max ulps table:
    NUMBA_ENABLE_CUDASIM=1 python tests/test_cuda_edge_values.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the child runs this file as a script
    sys.path.insert(0, HERE)

from edge_cases import MAX_ULPS, UNARY_X, binary_operands, worst  # noqa: E402

from unroll.ir.ops import BINARY, COMPARE, ELEMENTWISE, UNARY, Op  # noqa: E402

# extra cases beyond one output per op: the cast targets and the pow rewrite
EXTRA = ["cast:float64", "cast:bool", "cast:int32", "cast:int32->float32", "pow(x, 2.0)", "pow(x, 1.0)"]
# finite values within int32 (a float -> int cast out of range is undefined in C, CUDA and numpy)
CAST_INT_X = np.array([0.0, -0.0, 1e-45, 1e-40, 0.5, -0.5, 1.0, -1.0, 2.0, 9.5, -9.5, 20.0, 88.0, -100.0,
                       1e4, -1e4, 2.0**30, -2.0**31], np.float32)
INT_X = np.array([0, 1, -1, 7, 2**24 + 1, -(2**24) - 1, 2**31 - 1, -(2**31)], np.int32)


def cases() -> dict[str, tuple]:
    """name -> (op, the graph's output, its input names): one case per elementwise op, plus EXTRA."""
    import unroll as ur
    from unroll.ir.node import Node
    u = ur.input("u", UNARY_X.shape)
    a = ur.input("a", binary_operands()[0].shape)
    b = ur.input("b", binary_operands()[0].shape)
    c = ur.input("c", binary_operands()[0].shape, "bool")
    f = ur.input("f", CAST_INT_X.shape)
    n = ur.input("n", INT_X.shape, "int32")
    out: dict[str, tuple] = {}
    for op in sorted(ELEMENTWISE, key=lambda o: o.value):
        if op in UNARY or op is Op.STOP_GRADIENT:
            out[op.value] = (op, Node.make(op, (u,)), ["u"])
        elif op in BINARY or op in COMPARE:
            out[op.value] = (op, Node.make(op, (a, b)), ["a", "b"])
        elif op is Op.WHERE:
            out[op.value] = (op, Node.make(op, (c, a, b)), ["c", "a", "b"])
        else:
            assert op is Op.CAST, op
    out["cast:float64"] = (Op.CAST, Node.make(Op.CAST, (u,), "float64"), ["u"])
    out["cast:bool"] = (Op.CAST, Node.make(Op.CAST, (u,), "bool"), ["u"])
    out["cast:int32"] = (Op.CAST, Node.make(Op.CAST, (f,), "int32"), ["f"])
    out["cast:int32->float32"] = (Op.CAST, Node.make(Op.CAST, (n,), "float32"), ["n"])
    for k in (2.0, 1.0):
        out[f"pow(x, {k})"] = (Op.POW, Node.make(Op.POW, (u, ur.const(k, u.shape))), ["u"])
    return out


def feeds() -> dict[str, np.ndarray]:
    a, b = binary_operands()
    return {"u": UNARY_X.copy(), "a": a, "b": b, "c": (np.arange(len(a)) % 3 == 0), "f": CAST_INT_X.copy(),
            "n": INT_X.copy()}


def run_child() -> dict[str, tuple[int, str]]:
    """In the simulator: every case through the CUDA backend; {name: (max ulps, worst input)}."""
    import unroll as ur
    all_cases = cases()
    graph = ur.graph(*[node for _, node, _ in all_cases.values()])
    values = feeds()
    names = [n.name for n in graph.inputs]
    got = ur.compile(graph, backend="cuda", optimize=False)(**{k: values[k] for k in names})
    with np.errstate(all="ignore"):
        expected = ur.compile(graph, backend="numpy")(**{k: values[k] for k in names})
    result = {}
    for (name, (op, _, inputs)), g, e in zip(all_cases.items(), got, expected):
        ulps, where = worst(op, np.asarray(g), np.asarray(e), [values[k] for k in inputs])
        result[name] = (ulps, where)
    return result


def bound(name: str) -> int:
    op = cases_ops()[name]
    return MAX_ULPS.get(op, 0)


def cases_ops() -> dict[str, Op]:
    ops = {op.value: op for op in ELEMENTWISE if op is not Op.CAST}
    ops.update({name: (Op.POW if name.startswith("pow") else Op.CAST) for name in EXTRA})
    return ops


def table(results: dict[str, tuple[int, str]]) -> str:
    rows = [f"{'op':<22}{'max ulps':>9}{'bound':>7}  worst input"]
    for name, (ulps, where) in results.items():
        rows.append(f"{name:<22}{ulps:>9}{bound(name):>7}  {where}")
    return "\n".join(rows)


# ---- the parent process ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simulator_edges(tmp_path_factory) -> dict[str, tuple[int, str]]:
    out = tmp_path_factory.mktemp("edges") / "edges.json"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "UNROLL_CACHE_DIR": str(tmp_path_factory.mktemp("edges_cache"))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", str(out)], env=env,
                          cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the simulator child failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}", pytrace=False)
    results = {k: tuple(v) for k, v in json.loads(out.read_text()).items()}
    print("\n" + table(results))  # shown with -s: the simulator's op -> max ulps table
    return results


def test_every_elementwise_op_is_covered() -> None:
    covered = {op for op in cases_ops().values()}
    assert covered == set(ELEMENTWISE)


@pytest.mark.cudasim
@pytest.mark.parametrize("name", sorted(cases_ops()))
def test_edge_values_in_simulator(name: str, simulator_edges) -> None:
    ulps, where = simulator_edges[name]
    assert ulps <= bound(name), f"{name}: {ulps} ulps > {bound(name)} at {where}"


if __name__ == "__main__":
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0"):
        sys.exit("set NUMBA_ENABLE_CUDASIM=1 (the simulator must be on before numba is imported)")
    res = run_child()
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        with open(sys.argv[2], "w") as fh:
            json.dump(res, fh)
    else:
        print(table(res))
