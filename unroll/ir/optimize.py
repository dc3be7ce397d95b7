"""`ur.optimize` and `ur.explain`: the default pass pipeline, per-pass statistics and IR diffs.

The pipeline is the function `default_pipeline()`: a readable list of (name, pass) in order, every
pass a pure Graph -> Graph function from its own module. `optimize(g, disable=("fuse_cells",))`
skips passes by name. `explain(g)` (or `optimize(g, report=True)`) shows, after each pass, the node
count and per-time-step costs of every loop (matmuls, fused kernels, unfused elementwise kernels,
estimated FLOPs and bytes moved), and `report.diff("hoist")` the textual IR diff of one pass.

Cost model (an estimate for comparing passes, not a measurement): a matmul costs 2*M*N*K flops;
an elementwise op one flop per output element; a reduction one per input element; a FUSED node the
flops of its body. Bytes moved are the bytes of every operand read and every result written by an
op that runs as a kernel (a FUSED node counts only its inputs and outputs: that is what fusion
saves); views (reshape, broadcast, slice, proj) move nothing; concat, pad, transpose copy.
A loop's cost per step is the cost of its body (a nested loop counts its length times its body).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .fuse_cells import fuse_cells, fuse_top_level
from .fuse_matmuls import fuse_matmuls
from .hoist import hoist, hoist_any_size
from .node import Graph, LoopInfo, Node, nested_body, toposort
from .ops import ELEMENTWISE, LEAVES, REDUCE, Op, TensorType
from .simplify import simplify
from .verify import VerifyError, verify

Pass = Callable[[Graph], Graph]

PASSES: dict[str, Pass] = {
    "simplify": simplify,
    "fuse_matmuls": fuse_matmuls,
    "hoist": hoist,
    "hoist_any_size": hoist_any_size,   # hoist for graphs with named sizes (no size-dependent cap)
    "fuse_cells": fuse_cells,
    "fuse_top_level": fuse_top_level,
}


def default_pipeline() -> list[tuple[str, Pass]]:
    """The passes `ur.optimize` runs, in order."""
    return [
        ("simplify", simplify),          # fold constants, identities, merge duplicate loops, DCE
        ("fuse_matmuls", fuse_matmuls),  # gate matmuls sharing h (or x) -> one matmul + slices
        ("hoist", hoist),                # x-projections before loops, weight-gradient sums after
        ("simplify", simplify),          # drop what hoisting left dead, fold the moved code
        ("fuse_cells", fuse_cells),      # each step's elementwise math -> one FUSED kernel
        ("simplify", simplify),          # final cleanup
    ]


def _resolve(passes: Sequence[str | Pass | tuple[str, Pass]] | None,
             disable: Sequence[str]) -> list[tuple[str, Pass]]:
    chosen: list[tuple[str, Pass]] = []
    for p in default_pipeline() if passes is None else passes:
        if isinstance(p, str):
            if p not in PASSES:
                raise ValueError(f"optimize: unknown pass {p!r}; expected one of {', '.join(PASSES)}")
            chosen.append((p, PASSES[p]))
        elif isinstance(p, tuple):
            chosen.append(p)
        else:
            chosen.append((getattr(p, "__name__", "pass"), p))
    unknown = [d for d in disable if d not in {n for n, _ in chosen} and d not in PASSES]
    if unknown:
        raise ValueError(f"optimize: cannot disable unknown pass(es) {unknown}; the pipeline has "
                         f"{', '.join(dict.fromkeys(n for n, _ in chosen))}")
    return [(n, p) for n, p in chosen if n not in disable]


def optimize(graph: Graph | Node | Sequence[Node], passes: Sequence[str | Pass | tuple[str, Pass]] | None = None,
             disable: Sequence[str] = (), report: bool = False, check: bool = True):
    """Run the pipeline (or `passes`, names or functions, in order) minus `disable`d pass names.
    Returns the optimized Graph, or (graph, Report) with report=True. check=True verifies the IR
    after every pass, naming the pass that broke it."""
    if not isinstance(graph, Graph):
        graph = Graph.of([graph] if isinstance(graph, Node) else list(graph))
    steps = _resolve(passes, disable)
    rep = Report([Step("input", graph)]) if report else None
    for name, fn in steps:
        graph = fn(graph)
        if check:
            try:
                verify(graph)
            except VerifyError as err:
                raise VerifyError(f"after pass {name!r}: {err}") from None
        if rep is not None:
            rep.steps.append(Step(name, graph))
    return (graph, rep) if rep is not None else graph


def explain(graph: Graph | Node | Sequence[Node], passes: Sequence[str | Pass | tuple[str, Pass]] | None = None,
            disable: Sequence[str] = ()) -> "Report":
    """The Report of optimizing `graph`: print it for the per-pass table, `.diff(name)` for IR diffs."""
    return optimize(graph, passes, disable, report=True)[1]


# ---- statistics -----------------------------------------------------------------------------------

def _bytes(t: TensorType) -> int:
    return t.size * (1 if t.dtype == "bool" else 4 if t.dtype in ("float32", "int32") else 8)


COPIES = frozenset({Op.CONCAT, Op.PAD, Op.TRANSPOSE, Op.ONEHOT})


@dataclass
class Cost:
    """Per-step (or whole-graph) totals of one graph level."""

    matmuls: float = 0
    fused: float = 0
    elementwise: float = 0
    flops: float = 0
    bytes: float = 0

    def add(self, other: "Cost", times: float = 1) -> None:
        for f in ("matmuls", "fused", "elementwise", "flops", "bytes"):
            setattr(self, f, getattr(self, f) + times * getattr(other, f))


def node_cost(node: Node) -> Cost:
    """The cost of running one node once (a loop: all its steps)."""
    c = Cost()
    op = node.op
    if op in LEAVES or op in (Op.PROJ, Op.RESHAPE, Op.BROADCAST, Op.SLICE):
        return c
    if op is Op.LOOP:
        info: LoopInfo = node.arg  # type: ignore[assignment]
        c.add(graph_cost(info.body), info.length)
        return c
    io = sum(_bytes(s.tensor_type) for s in node.src) + sum(
        _bytes(t) for t in (node.type if isinstance(node.type, tuple) else (node.type,)))
    if op is Op.FUSED:
        c.fused, c.bytes = 1, io
        c.flops = sum(n.tensor_type.size for n in toposort(node.arg.outputs) if n.op in ELEMENTWISE)  # type: ignore[union-attr]
    elif op is Op.MATMUL:
        c.matmuls, c.bytes = 1, io
        c.flops = 2 * node.tensor_type.size * node.src[0].shape[-1]
    elif op in ELEMENTWISE:
        c.elementwise, c.bytes, c.flops = 1, io, node.tensor_type.size
    elif op in REDUCE or op is Op.ARGMAX:
        c.bytes, c.flops = io, node.src[0].tensor_type.size
    elif op in COPIES:
        c.bytes = io
    return c


def graph_cost(graph: Graph) -> Cost:
    total = Cost()
    for node in graph.nodes():
        total.add(node_cost(node))
    return total


def loops_of(graph: Graph) -> list[Node]:
    """The loops of a graph, nested ones included, outermost first in dependency order."""
    found: list[Node] = []
    stack = [graph]
    while stack:
        g = stack.pop(0)
        for node in g.nodes():
            if node.op is Op.LOOP:
                found.append(node)
                stack.append(node.arg.body)  # type: ignore[union-attr]
    return found


def count_nodes(graph: Graph) -> int:
    total, stack = 0, [graph]
    while stack:
        g = stack.pop()
        for node in g.nodes():
            total += 1
            body = nested_body(node)
            if body is not None:
                stack.append(body)
    return total


@dataclass
class Stats:
    nodes: int
    loops: list[Cost]       # per loop, cost of one step
    total: Cost             # the whole graph, loops run to their lengths

    @staticmethod
    def of(graph: Graph) -> "Stats":
        return Stats(count_nodes(graph), [graph_cost(lp.arg.body) for lp in loops_of(graph)],  # type: ignore[union-attr]
                     graph_cost(graph))


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}" if x != int(x) else str(int(x))


@dataclass
class Step:
    name: str
    graph: Graph
    stats: Stats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = Stats.of(self.graph)

    def text(self) -> str:
        from .text import print_graph
        return print_graph(self.graph)


COLUMNS = (("nodes", None), ("mm/step", "matmuls"), ("fused/step", "fused"), ("ew/step", "elementwise"),
           ("flops/step", "flops"), ("bytes/step", "bytes"))


@dataclass
class Report:
    """The graph after each pass (steps[0] is the input) with statistics; str() is the table."""

    steps: list[Step]

    @property
    def graph(self) -> Graph:
        return self.steps[-1].graph

    def rows(self) -> list[list[str]]:
        rows = []
        for s in self.steps:
            row = [s.name, str(s.stats.nodes)]
            for _, attr in COLUMNS[1:]:
                row.append("+".join(_num(getattr(c, attr)) for c in s.stats.loops) or "-")
            row += [_num(s.stats.total.flops), _num(s.stats.total.bytes)]
            rows.append(row)
        return rows

    def table(self) -> str:
        head = ["pass"] + [c for c, _ in COLUMNS] + ["flops total", "bytes total"]
        rows = [head] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        note = ("per-step columns list each loop (outermost first, in dependency order) joined by +; "
                "mm = matmuls, fused = FUSED kernels, ew = unfused elementwise ops")
        return "\n".join(lines + [note] + self.memory_lines())

    @property
    def plan(self):
        """The MemoryBudget plan behind the input graph's gradients (autodiff.MEMORY_PLANS), or None."""
        from .autodiff import MEMORY_PLANS
        return next((MEMORY_PLANS[o] for o in self.steps[0].graph.outputs if o in MEMORY_PLANS), None)

    def peaks(self) -> list[tuple[str, int]]:
        """(pass, predicted peak bytes of one call after it) for each step (ir/memory.py's model)."""
        from .memory import predict
        return [(s.name, predict(s.graph).total) for s in self.steps]

    def memory_lines(self) -> list[str]:
        """The MemoryBudget plan (checkpoints, recomputed steps, predicted peak) and the predicted
        peak after each pass; nothing for a graph no budget planned."""
        plan = self.plan
        if plan is None:
            return []
        from .memory import mb
        return [""] + plan.lines() + ["  predicted peak (CPU backend's allocation) after each pass: "
                                      + ", ".join(f"{name} {mb(p)}" for name, p in self.peaks())]

    def __str__(self) -> str:
        return self.table()

    def _index(self, which: int | str) -> int:
        if isinstance(which, int):
            return which
        for i, s in enumerate(self.steps[1:], 1):
            if s.name == which:
                return i
        raise KeyError(f"no pass named {which!r} in this report; passes: {[s.name for s in self.steps[1:]]}")

    def diff(self, which: int | str, context: int = 3) -> str:
        """Unified diff of the printed IR before and after pass `which` (its name, first match, or
        its index in steps)."""
        i = self._index(which)
        before, after = self.steps[i - 1], self.steps[i]
        return "".join(difflib.unified_diff(before.text().splitlines(True), after.text().splitlines(True),
                                            f"before {after.name}", f"after {after.name}", n=context))
