"""The verifier: re-infers every type, checks closed loop scopes and input declarations.

Run after every pass in tests. Errors quote the offending node, its source line and the IR around it.
"""

from __future__ import annotations

from .node import Graph, LoopInfo, Node, infer_type, nested_body, toposort
from .ops import LEAVES, Op, ShapeError


class VerifyError(ValueError):
    """The IR breaks an invariant; the message shows the node and where it was built."""


def _fail(node: Node, what: str, graph: Graph) -> VerifyError:
    context = ""
    try:
        from .text import print_node_context
        context = "\n" + print_node_context(graph, node)
    except Exception:  # the printer must never hide the real error
        pass
    return VerifyError(f"{what}: {node!r} (built at {node.loc}){context}")


def verify(graph: Graph, *, _body: bool = False) -> Graph:
    """Check the graph and every nested body; return it unchanged so passes can chain."""
    stack: list[tuple[Graph, bool]] = [(graph, _body)]
    while stack:
        g, is_body = stack.pop()
        _verify_one(g, is_body)
        for node in g.nodes():
            body = nested_body(node)
            if body is not None:
                stack.append((body, True))
    return graph


def _verify_one(g: Graph, is_body: bool) -> None:
    declared = set(g.inputs)
    if is_body:
        for i, a in enumerate(g.inputs):
            if a.op is not Op.ARG or a.arg != i:
                raise _fail(a, f"body input {i} must be arg {i}", g)
    else:
        names: dict[str, Node] = {}
        for n in g.inputs:
            if n.op not in (Op.INPUT, Op.PARAM):
                raise _fail(n, "graph inputs must be input or param leaves", g)
            if names.setdefault(n.name, n) is not n:  # type: ignore[arg-type]
                raise _fail(n, f"two inputs named {n.name!r}", g)
    if g.output_names is not None and len(g.output_names) != len(g.outputs):
        raise VerifyError(f"graph has {len(g.outputs)} outputs but {len(g.output_names)} output names")
    for node in toposort(g.outputs):
        if node.op in LEAVES:
            if node.op is Op.CONST:
                continue
            if node.op is Op.ARG and not isinstance(node.arg, int):
                raise _fail(node, "a tracing placeholder escaped its scan (closure over a step value?)", g)
            if node not in declared:
                kind = "a body uses a value from outside its loop" if is_body else "undeclared input"
                raise _fail(node, kind, g)
            continue
        try:
            expected = infer_type(node.op, node.src, node.arg)
        except ShapeError as err:
            raise _fail(node, f"ill-typed node ({err})", g) from None
        if expected != node.type:
            raise _fail(node, f"stored type {node.type_str()} differs from inferred {expected}", g)
        if node.op is Op.LOOP:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            if info.length < 0 or info.n_consts + info.n_carry > len(node.src):
                raise _fail(node, "malformed loop signature", g)
