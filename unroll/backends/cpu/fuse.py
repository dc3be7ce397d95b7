"""Loop fusion in the CPU kernel language: adjacent loop nests over the same ranges become one nest
wherever that cannot change a result.

The emitters write one loop nest per elementwise node (a value is computed where it is stored, and
stored where more than one consumer reads it), so an LSTM or GRU backward step is a dozen nests over
the same (batch, hidden) ranges, each reading what the ones before it wrote at the same element.
Merging them shortens what LLVM optimises (each nest gets its own vectorised body, runtime alias
checks and remainder loop: most of a cell's compile time) and a step's memory traffic (a value is
used while it is still in a register or in L1).

Two nests merge when every buffer (with the views made of it) that one writes and the other touches
is touched by both only
- at the same element, through the same name and index, and that index names a different element in
  every iteration (each loop variable is one whole component, alone or plus an offset free of loop
  variables): then iteration i of the second nest depends only on iteration i of the first; or
- in disjoint segments of a concatenation (`v`, `N + v`, `2 * N + v` for `v in range(N)`), where the
  two nests never meet at all;
and no scalar one assigns is named by the other. Nests that allocate, call, branch or raise stay as
they are. The test is syntactic and conservative: views of one buffer under two names never merge.

This is a transformation of the ast the native renderer reads, so the Numba fallback, which compiles
the same source, keeps the unfused loops (and its error lines keep matching the generated text).
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field

__all__ = ["fuse_loops"]


@dataclass
class _Access:
    name: str
    index: ast.expr
    key: str            # ast.dump of the index: equal keys are the same element
    store: bool


@dataclass
class _Nest:
    """A perfect loop nest: its loop variables and ranges, and the statements of its innermost body."""
    loop: ast.For
    variables: list[str]
    ranges: list[str]
    range_ends: dict[str, str]        # loop variable -> ast.dump of N where the range is range(N)
    body: list[ast.stmt]
    accesses: list[_Access] = field(default_factory=list)
    scalars: set[str] = field(default_factory=set)   # scalars assigned in the body
    names: set[str] = field(default_factory=set)     # every name the body mentions


def fuse_loops(fdef: ast.FunctionDef) -> ast.FunctionDef:
    """`fdef` (a generated kernel) with adjacent compatible loop nests merged, at every block depth."""
    storage = _storage(fdef)
    fused = copy.copy(fdef)
    fused.body = _fuse_block(fdef.body, storage)
    return ast.fix_missing_locations(fused)


# ---- array storage ------------------------------------------------------------------------------


class _UnionFind(dict):
    def find(self, name: str) -> str:
        while self.get(name, name) != name:
            name = self[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self[ra] = rb


def _storage(fdef: ast.FunctionDef) -> dict[str, frozenset[str]]:
    """name -> the buffers it may name. Views (`a[t]`, `a.reshape(...)`) and plain copies of a
    name share their source's buffer. Carries swapped at the end of a step (`a, b = b, a`) name
    distinct buffers at any moment when each of them is only ever assigned `np.empty` or the swap;
    a view of one of them may outlive a swap, so it may name any buffer of the group. Where a
    swapped name is assigned anything else, the whole group counts as one buffer."""
    views, swaps = _UnionFind(), _UnionFind()
    assigned: dict[str, set[str]] = {}
    for node in ast.walk(fdef):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                if isinstance(t, ast.Name):
                    assigned.setdefault(t.id, set()).add("swap")
                    if isinstance(v, ast.Name):
                        swaps.union(t.id, v.id)
                    else:
                        assigned[t.id].add("other")
            continue
        if not isinstance(target, ast.Name):
            continue
        source = _viewed_name(value)
        kind = "empty" if _is_empty(value) else "other"
        assigned.setdefault(target.id, set()).add(kind)
        if source is not None:
            views.union(target.id, source)
    groups: dict[str, set[str]] = {}
    for name in list(swaps) + [v for v in swaps.values()]:
        groups.setdefault(swaps.find(name), set()).add(name)
    simple: dict[str, frozenset[str]] = {}   # swapped name -> its group, where the group is simple
    for members in groups.values():
        if all(assigned.get(m, set()) <= {"empty", "swap"} for m in members):
            simple.update({m: frozenset(members) for m in members})
        else:
            first = next(iter(members))
            for m in members:
                views.union(m, first)
    names = {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name)} | {a.arg for a in fdef.args.args}
    storage = {}
    for name in names:
        root = views.find(name)
        if root in simple:
            storage[name] = frozenset([name]) if name == root else simple[root]
        else:
            storage[name] = frozenset([root])
    return storage


def _is_empty(value: ast.expr) -> bool:
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "empty"
            and isinstance(value.func.value, ast.Name) and value.func.value.id == "np")


def _viewed_name(value: ast.expr) -> str | None:
    """The name whose storage `value` shares: `x`, `x[...]`, `x.reshape(...)`; else None."""
    if isinstance(value, ast.Name):
        return value.id
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name):
        return value.value.id
    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "reshape"
            and isinstance(value.func.value, ast.Name)):
        return value.func.value.id
    return None


# ---- nests --------------------------------------------------------------------------------------


def _nest(stmt: ast.stmt) -> _Nest | None:
    """`stmt` as a perfect nest of `for v in range(...)` whose innermost body only assigns, or None."""
    variables, ranges, ends = [], [], {}
    node = stmt
    while isinstance(node, ast.For):
        if (node.orelse or not isinstance(node.target, ast.Name) or not isinstance(node.iter, ast.Call)
                or not isinstance(node.iter.func, ast.Name) or node.iter.func.id != "range"):
            return None
        variables.append(node.target.id)
        ranges.append(ast.dump(node.iter))
        if len(node.iter.args) == 1:
            ends[node.target.id] = ast.dump(node.iter.args[0])
        if len(node.body) == 1 and isinstance(node.body[0], ast.For):
            node = node.body[0]
            continue
        body = node.body
        break
    else:
        return None
    if len(set(variables)) != len(variables):
        return None
    nest = _Nest(stmt, variables, ranges, ends, list(body))   # type: ignore[arg-type]
    for s in body:
        if isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], (ast.Name, ast.Subscript)):
            _record(nest, s.targets[0], store=True, load=False)
            _record_reads(nest, s.value)
        elif isinstance(s, ast.AugAssign) and isinstance(s.target, (ast.Name, ast.Subscript)):
            _record(nest, s.target, store=True, load=True)
            _record_reads(nest, s.value)
        else:
            return None
    if any(_calls_beyond_scalar_math(s) for s in body):
        return None
    return nest


def _calls_beyond_scalar_math(stmt: ast.stmt) -> bool:
    """Calls that write memory or allocate (anything but scalar math and casts) keep a nest apart."""
    for n in ast.walk(stmt):
        if isinstance(n, ast.Call):
            func = n.func
            if isinstance(func, ast.Attribute) and func.attr in ("empty", "reshape"):
                return True
            if isinstance(func, ast.Name) and func.id in ("xxgemm", "packed_gemm", "pack_panels", "blas_threads"):
                return True
    return False


def _record(nest: _Nest, target: ast.expr, store: bool, load: bool) -> None:
    if isinstance(target, ast.Name):
        nest.scalars.add(target.id)
        nest.names.add(target.id)
        return
    assert isinstance(target, ast.Subscript)
    if not isinstance(target.value, ast.Name):
        nest.accesses.append(_Access("?", target.slice, "?", True))   # unknown storage: never merged
        return
    name = target.value.id
    nest.names.add(name)
    nest.accesses.append(_Access(name, target.slice, ast.dump(target.slice), store))
    if load:
        nest.accesses.append(_Access(name, target.slice, ast.dump(target.slice), False))
    _record_reads(nest, target.slice)


def _record_reads(nest: _Nest, expr: ast.expr) -> None:
    for n in ast.walk(expr):
        if isinstance(n, ast.Name):
            nest.names.add(n.id)
        elif isinstance(n, ast.Subscript):
            if isinstance(n.value, ast.Name):
                nest.accesses.append(_Access(n.value.id, n.slice, ast.dump(n.slice), False))
            else:
                nest.accesses.append(_Access("?", n.slice, "?", False))


# ---- the merge test -----------------------------------------------------------------------------


def _components(index: ast.expr) -> list[ast.expr]:
    return list(index.elts) if isinstance(index, ast.Tuple) else [index]


def _free_of(expr: ast.expr, variables: set[str]) -> bool:
    return not any(isinstance(n, ast.Name) and n.id in variables for n in ast.walk(expr))


def _loop_variable_of(component: ast.expr, variables: set[str]) -> str | None:
    """v for a component `v` or `offset + v` / `v + offset` (offset free of loop variables)."""
    if isinstance(component, ast.Name) and component.id in variables:
        return component.id
    if isinstance(component, ast.BinOp) and isinstance(component.op, ast.Add):
        for var, offset in ((component.right, component.left), (component.left, component.right)):
            if isinstance(var, ast.Name) and var.id in variables and _free_of(offset, variables):
                return var.id
    return None


def _injective(index: ast.expr, variables: list[str]) -> bool:
    """Whether `index` names a different element in every iteration of the nest."""
    names = set(variables)
    seen = []
    for component in _components(index):
        var = _loop_variable_of(component, names)
        if var is not None:
            seen.append(var)
        elif not _free_of(component, names):
            return False
    return sorted(seen) == sorted(variables)


def _segment(component: ast.expr, nest: _Nest) -> tuple[str, str, int] | None:
    """(v, N, k) for a component `k * N + v` with `v in range(N)` (k = 0: `v`; k = 1: `N + v`)."""
    if isinstance(component, ast.Name) and component.id in nest.range_ends:
        return component.id, nest.range_ends[component.id], 0
    if not (isinstance(component, ast.BinOp) and isinstance(component.op, ast.Add)
            and isinstance(component.right, ast.Name) and component.right.id in nest.range_ends):
        return None
    var, end, offset = component.right.id, nest.range_ends[component.right.id], component.left
    if ast.dump(offset) == end:
        return var, end, 1
    if (isinstance(offset, ast.BinOp) and isinstance(offset.op, ast.Mult) and isinstance(offset.left, ast.Constant)
            and isinstance(offset.left.value, int) and ast.dump(offset.right) == end):
        return var, end, offset.left.value
    return None


def _disjoint(a: _Access, b: _Access, nest: _Nest) -> bool:
    """Whether `a` and `b` (the same name) touch disjoint segments of a concatenated axis."""
    ca, cb = _components(a.index), _components(b.index)
    if len(ca) != len(cb):
        return False
    differing = [k for k, (x, y) in enumerate(zip(ca, cb)) if ast.dump(x) != ast.dump(y)]
    if len(differing) != 1:
        return False
    sa, sb = _segment(ca[differing[0]], nest), _segment(cb[differing[0]], nest)
    return sa is not None and sb is not None and sa[:2] == sb[:2] and sa[2] != sb[2]


def _compatible(a: _Access, b: _Access, nest: _Nest) -> bool:
    if a.name == "?" or b.name == "?" or a.name != b.name:
        return False
    if a.key == b.key:
        return _injective(a.index, nest.variables)
    return _disjoint(a, b, nest)


def _can_merge(first: _Nest, second: _Nest, storage: dict[str, frozenset[str]]) -> bool:
    if first.ranges != second.ranges or first.variables != second.variables:
        return False
    if first.scalars & second.names or second.scalars & first.names:
        return False
    if any(a.name == "?" for a in first.accesses + second.accesses):   # storage not known by name
        return False
    for x, y in ((first, second), (second, first)):
        for a in x.accesses:
            if not a.store:
                continue
            buffers = storage.get(a.name, frozenset([a.name]))
            for b in y.accesses:
                if buffers & storage.get(b.name, frozenset([b.name])) and not _compatible(a, b, first):
                    return False
    return True


def _merged(first: _Nest, second: _Nest) -> _Nest:
    """One nest running `first`'s body then `second`'s in each iteration (a fresh ast)."""
    loops = []
    node: ast.stmt = first.loop
    for _ in first.variables:
        assert isinstance(node, ast.For)
        loops.append(node)
        node = node.body[0]
    body = first.body + second.body
    for loop in reversed(loops):
        body = [ast.For(target=loop.target, iter=loop.iter, body=body, orelse=[], type_comment=None)]
    nest = _Nest(body[0], first.variables, first.ranges, first.range_ends, first.body + second.body)   # type: ignore[arg-type]
    nest.accesses = first.accesses + second.accesses
    nest.scalars = first.scalars | second.scalars
    nest.names = first.names | second.names
    return nest


def _fuse_block(stmts: list[ast.stmt], storage: dict[str, frozenset[str]]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    pending: _Nest | None = None
    for stmt in stmts:
        nest = _nest(stmt)
        if nest is None:
            stmt = _fuse_inside(stmt, storage)
        if pending is not None and nest is not None and _can_merge(pending, nest, storage):
            pending = _merged(pending, nest)
            continue
        if pending is not None:
            out.append(pending.loop)
        if nest is not None:
            pending = nest
        else:
            pending = None
            out.append(stmt)
    if pending is not None:
        out.append(pending.loop)
    return out


def _fuse_inside(stmt: ast.stmt, storage: dict[str, frozenset[str]]) -> ast.stmt:
    """`stmt` (not itself a nest) with the blocks it holds fused: a time loop's body, an if's branches."""
    if isinstance(stmt, ast.For):
        return ast.For(target=stmt.target, iter=stmt.iter, body=_fuse_block(stmt.body, storage),
                       orelse=stmt.orelse, type_comment=None)
    if isinstance(stmt, ast.If):
        return ast.If(test=stmt.test, body=_fuse_block(stmt.body, storage), orelse=_fuse_block(stmt.orelse, storage))
    return stmt
