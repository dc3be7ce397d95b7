"""The textual IR: print a Graph as stable, diff-friendly text and parse it back.

Example (a tanh RNN over 5 steps, `h = tanh(x_t @ w + h)`; `print(graph)` shows this)::

    %0 = param "w" init=uniform:0.5 : f32[3,4]
    %1 = input "x" : f32[5,2,3]
    %2 = const 0.0 : f32[2,4]
    %3 = loop length=5 reverse=false consts(%0) carry(%2) xs(%1) : (f32[2,4], f32[5,2,4]) {
      ^body(%a0: f32[3,4], %a1: f32[2,4], %a2: f32[2,3]):
        %4 = matmul %a2, %a0 : f32[2,4]
        %5 = add %4, %a1 : f32[2,4]
        %6 = tanh %5 : f32[2,4]
        return %6, %6
    }
    %7 = proj %3 #1 : f32[5,2,4]
    return %7 as "ys"

Grammar (one statement per line; the parser ignores indentation and blank lines)::

    graph      := [signature] statement* return
    signature  := "^body(" [NAME ":" type ("," NAME ":" type)*] "):"   a body's args, in index order
    statement  := NAME "=" expr ":" type ["{" NEWLINE graph "}"] [comment]
    expr       := "input" STRING
                | "param" STRING "init=" (WORD | STRING)        init spec, e.g. uniform:0.125
                | "const" (NUMBER | ARRAY)                       true/false for bool; floats as repr()
                | "arg" VALUE                                    a stray body argument (broken IR only)
                | "proj" NAME INDEX                              INDEX is "#" INT, e.g. #0
                | "loop" "length=" INT "reverse=" BOOL
                         "consts(" names ")" "carry(" names ")" "xs(" names ")"     then "{" body "}"
                | "fused" names                                                     then "{" body "}"
                | OP names attrs                                 every other op, attrs below
    names      := [NAME ("," NAME)*]
    return     := "return" [NAME ["as" STRING] ("," NAME ["as" STRING])*]
    type       := DTYPE "[" [INT ("," INT)*] "]"                 f32 f64 i32 i64 bool, e.g. f32[16,64]
                | "(" [type ("," type)*] ")"                     a multi-output node (loop, fused)
    comment    := "# " TEXT       side data the printer adds: "# step 3, role backward, at f.py:12"
                                  ("#" and a digit is an INDEX, so a comment needs the space)
    NAME       := "%" [A-Za-z0-9_.]+        printed %0, %1, ... (and %a0, %a1, ... for body args)
    STRING     := a JSON string, e.g. "x"
    NUMBER     := an int, or a float as Python's repr writes it: 0.5, 1e-05, -0.0, inf, -inf, nan
    VALUE      := INT | NUMBER | STRING | "(" [VALUE ("," VALUE)*] ")" | "[" ... "]"
    ARRAY      := "[" [ELEMENT ("," ELEMENT)*] "]"    ELEMENT := NUMBER | "true" | "false" | ARRAY
                                    a non-uniform constant, one nesting level per axis of its type,
                                    e.g. const [[1.0, 2.0], [3.0, 4.0]] : f32[2,2]

    attrs by op:  sum, max       axes=(0,1) keepdims=false
                  argmax         axis=1           concat   axis=0          onehot  depth=10
                  reshape        shape=(16,64)    broadcast shape=(16,64)   transpose perm=(1,0)
                  cast           dtype=f64        slice    [0:16:1, 0:64:1] (start:stop:step per axis)
                  pad            [(1,2), (0,0)]   (lo, hi) per axis
                  others (unary, binary, compare, where, matmul, stop_gradient) take no attrs.
                  A tuple attr is always a tuple: (5) is the 1-tuple (5,).

Meaning:
- Values are numbered in print order: a top-level graph's inputs first (in Graph.inputs order), then
  every other node in dependency order; a loop's body is printed inside `{ }` right after the loop's
  line, with its own values continuing the numbering (so every name in the text is unique).
- A top-level graph's inputs are its input/param statements in order, or its signature when it has
  one (a body printed on its own). Output names (Graph.output_names) are the `as "..."` parts.
- Bodies are closed scopes: inside `{ }` only the signature's args and the body's own statements are
  visible (loops take outer values as consts). Nested bodies may reuse the names %a0, %a1, ...
- Side data (node.step, node.role) and, with `print_graph(g, locs=True)`, the source line are printed
  as trailing comments. The parser restores them on nodes that do not have them yet; other comments
  are ignored. Source lines are off by default so golden text does not depend on the machine.
- A const is printed as one number when every element is equal, else as an ARRAY (its FrozenArray
  arg, see ops.py); the parser stores an ARRAY with equal elements as one number, as build.const does.
- `parse` rebuilds every node with Node.make, so types are re-inferred and must equal the written
  ones; since nodes are interned, `parse(print_graph(g)) == g`. (A NaN scalar constant parses to a
  new node: NaN != NaN; array constants compare by their bytes, so theirs round-trip. A top-level
  input leaf that is not a graph input, which verify rejects, parses as one.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .dims import Dim, SizeRatio
from .build import INIT_KINDS, const_arg, init_spec_error
from .node import Graph, LoopInfo, Node, NodeType, nested_body, toposort
from .ops import DTYPE_SHORT, INT_DTYPES, REDUCE, SHORT_DTYPE, FrozenArray, Op, ShapeError, TensorType


class ParseError(ValueError):
    """The text is not valid IR; the message names the line and what was expected."""


# ---- printing -----------------------------------------------------------------------------------

def _bool(value: object) -> str:
    return "true" if value else "false"


def _tuple(values: object) -> str:
    return "(" + ",".join(str(v if isinstance(v, Dim) else int(v)) for v in values) + ")"  # type: ignore[union-attr]


def _scalar_text(value: object, dtype: str) -> str:
    if dtype == "bool":
        return _bool(value)
    if dtype in INT_DTYPES:
        return str(int(value))  # type: ignore[call-overload]
    return repr(float(value))  # type: ignore[arg-type]  # repr round-trips exactly


def _array_text(array: np.ndarray, dtype: str) -> str:
    """Nested lists, one level per axis: [[1.0, 2.0], [3.0, 4.0]]. Recursion follows the rank."""
    if array.ndim == 0:
        return _scalar_text(array.item(), dtype)
    return "[" + ", ".join(_array_text(row, dtype) for row in array) + "]"


def _const_text(node: Node) -> str:
    dtype = node.type.dtype  # type: ignore[union-attr]
    if isinstance(node.arg, FrozenArray):
        return _array_text(node.arg.array, dtype)
    if isinstance(node.arg, SizeRatio):   # printed, not parsed: see ir/dims.py
        return str(node.arg)
    return _scalar_text(node.arg, dtype)


_SIMPLE_WORD = re.compile(r"[A-Za-z_]\w*(?::[A-Za-z0-9_.+-]+)?$")


def _param_text(arg: tuple[str, str]) -> str:
    name, init = arg
    init_text = init if _SIMPLE_WORD.match(init) else json.dumps(init)
    return f"{json.dumps(name)} init={init_text}"


# op -> the text after its operands; ops not listed print no attrs (their arg is None)
ATTR_TEXT: dict[Op, Callable[[object], str]] = {
    **{op: lambda a: f"axes={_tuple(a[0])} keepdims={_bool(a[1])}" for op in REDUCE},  # type: ignore[index]
    Op.ARGMAX: lambda a: f"axis={int(a)}",  # type: ignore[call-overload]
    Op.CONCAT: lambda a: f"axis={int(a)}",  # type: ignore[call-overload]
    Op.ONEHOT: lambda a: f"depth={int(a)}",  # type: ignore[call-overload]
    Op.RESHAPE: lambda a: f"shape={_tuple(a)}",
    Op.BROADCAST: lambda a: f"shape={_tuple(a)}",
    Op.TRANSPOSE: lambda a: f"perm={_tuple(a)}",
    Op.CAST: lambda a: f"dtype={DTYPE_SHORT[a]}",  # type: ignore[index]
    Op.SLICE: lambda a: "[" + ", ".join(f"{s}:{e}:{k}" for s, e, k in a) + "]",  # type: ignore[attr-defined]
    Op.PAD: lambda a: "[" + ", ".join(f"({lo},{hi})" for lo, hi in a) + "]",  # type: ignore[attr-defined]
}


@dataclass
class _Line:
    text: str
    nodes: tuple[Node, ...]  # the nodes this line defines (a signature defines several)


class _Printer:
    """Prints graphs into lines; one counter numbers values across nested bodies."""

    def __init__(self, locs: bool) -> None:
        self.locs = locs
        self.counter = 0
        self.lines: list[_Line] = []

    def fresh(self) -> str:
        name = f"%{self.counter}"
        self.counter += 1
        return name

    def graph(self, g: Graph, indent: str, is_body: bool) -> None:
        """Print one scope. Recursion here follows body nesting (a few levels), never graph depth."""
        names: dict[Node, str] = {}
        if is_body or any(n.op not in (Op.INPUT, Op.PARAM) for n in g.inputs):
            for i, n in enumerate(g.inputs):
                names.setdefault(n, f"%a{i}")
            sig = ", ".join(f"%a{i}: {n.type_str()}" for i, n in enumerate(g.inputs))
            sig_indent = indent[:-2] if is_body else indent
            self.lines.append(_Line(f"{sig_indent}^body({sig}):", tuple(g.inputs)))
        else:
            for n in g.inputs:
                if n not in names:
                    self.statement(n, names, indent)
        for node in toposort(g.outputs):
            if node not in names:
                self.statement(node, names, indent)
        outs = []
        for i, out in enumerate(g.outputs):
            label = f" as {json.dumps(g.output_names[i])}" if g.output_names and i < len(g.output_names) else ""
            outs.append(names[out] + label)
        self.lines.append(_Line(f"{indent}return" + (" " + ", ".join(outs) if outs else ""), ()))

    def statement(self, node: Node, names: dict[Node, str], indent: str) -> None:
        name = names[node] = self.fresh()
        text = f"{indent}{name} = {self.expr(node, names)} : {node.type_str()}"
        body = nested_body(node)
        if body is not None:
            text += " {"
        self.lines.append(_Line(text + self.comment(node), (node,)))
        if body is not None:
            self.graph(body, indent + "    ", is_body=True)
            self.lines.append(_Line(f"{indent}}}", ()))

    def expr(self, node: Node, names: dict[Node, str]) -> str:
        op, arg = node.op, node.arg
        refs = [names[s] for s in node.src]
        if op is Op.INPUT:
            return f"input {json.dumps(arg)}"
        if op is Op.PARAM:
            return f"param {_param_text(arg)}"  # type: ignore[arg-type]
        if op is Op.CONST:
            return f"const {_const_text(node)}"
        if op is Op.ARG:
            return f"arg {_value_text(arg)}"
        if op is Op.PROJ:
            return f"proj {refs[0]} #{arg}"
        if op is Op.LOOP:
            info: LoopInfo = arg  # type: ignore[assignment]
            c, h = info.n_consts, info.n_consts + info.n_carry
            return (f"loop length={info.length} reverse={_bool(info.reverse)} consts({', '.join(refs[:c])}) "
                    f"carry({', '.join(refs[c:h])}) xs({', '.join(refs[h:])})")
        text = f"{op.value} {', '.join(refs)}" if refs else op.value
        if op in ATTR_TEXT:
            try:
                text += " " + ATTR_TEXT[op](arg)
            except Exception:  # a malformed arg still prints (verify shows broken IR with this)
                text += f" arg={arg!r}"
        elif arg is not None and op is not Op.FUSED:
            text += f" arg={arg!r}"
        return text

    def comment(self, node: Node) -> str:
        parts = []
        if node.step is not None:
            parts.append(f"step {node.step}")
        if node.role is not None:
            parts.append(f"role {node.role}")
        if self.locs and node.loc is not None:
            parts.append(f"at {node.loc}")
        return "  # " + ", ".join(parts) if parts else ""


def _value_text(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_value_text, value)) + ")"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _lines(graph: Graph, locs: bool) -> list[_Line]:
    printer = _Printer(locs)
    printer.graph(graph, "", is_body=False)
    return printer.lines


def print_graph(graph: Graph, locs: bool = False) -> str:
    """The graph as text (see the module docstring); `locs=True` appends `# at file:line`."""
    return "\n".join(line.text for line in _lines(graph, locs)) + "\n"


def print_node_context(graph: Graph, node: Node, radius: int = 3) -> str:
    """The lines of `graph`'s text around the first line that defines `node`, marked with -->."""
    lines = _lines(graph, locs=False)
    at = next((i for i, line in enumerate(lines) if any(n is node for n in line.nodes)), None)
    if at is None:
        return f"    ({node!r} does not appear in the printed graph)"
    lo, hi = max(0, at - radius), min(len(lines), at + radius + 1)
    out = ["    ..."] if lo > 0 else []
    out += [("--> " if i == at else "    ") + lines[i].text for i in range(lo, hi)]
    if hi < len(lines):
        out.append("    ...")
    return "\n".join(out)


# ---- tokens -------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:
     (?P<str>"(?:[^"\\]|\\.)*")
    |(?P<idx>\#\d+)
    |(?P<comment>\#.*)
    |(?P<name>%[A-Za-z0-9_.]+)
    |(?P<caret>\^[A-Za-z_]\w*)
    |(?P<num>[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|inf\b|nan\b))
    |(?P<word>[A-Za-z_]\w*(?::[^\s,()\[\]]+)?)
    |(?P<punct>[()\[\],:={}])
    )""", re.VERBOSE)


@dataclass
class _Token:
    kind: str  # str idx comment name caret num word punct
    text: str


def _tokenize(line: str, lineno: int) -> list[_Token]:
    tokens, pos, end, match = [], 0, len(line.rstrip()), _TOKEN.match
    while pos < end:
        m = match(line, pos)
        if m is None or m.end() == pos:
            raise ParseError(f"line {lineno}: unexpected character {line[pos:].lstrip()[:1]!r}\n  {line.strip()}")
        kind = m.lastgroup
        tokens.append(_Token(kind, m.group(kind)))  # type: ignore[arg-type]
        pos = m.end()
    return tokens


class _Cursor:
    """Reads the tokens of one line; every `expect` names what it wanted in its error."""

    def __init__(self, tokens: list[_Token], lineno: int, line: str) -> None:
        self.tokens, self.pos, self.lineno, self.line = tokens, 0, lineno, line

    def error(self, what: str) -> ParseError:
        tok = self.peek()
        found = repr(tok.text) if tok else "the end of the line"
        return ParseError(f"line {self.lineno}: expected {what}, found {found}\n  {self.line.strip()}")

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind in ("punct", "word") and tok.text == text

    def take(self, text: str) -> bool:
        if self.at(text):
            self.pos += 1
            return True
        return False

    def expect(self, text: str, what: str | None = None) -> None:
        if not self.take(text):
            raise self.error(what or repr(text))

    def kind(self, kind: str, what: str) -> str:
        tok = self.peek()
        if tok is None or tok.kind != kind:
            raise self.error(what)
        self.pos += 1
        return tok.text

    def end(self) -> None:
        if self.peek() is not None:
            raise self.error("the end of the line")

    # ---- values -----------------------------------------------------------------------------

    def int(self, what: str = "an integer") -> int:
        text = self.kind("num", what)
        try:
            return int(text)
        except ValueError:
            raise ParseError(f"line {self.lineno}: expected {what}, found {text!r}\n  {self.line.strip()}") from None

    def bool(self) -> bool:
        if self.take("true"):
            return True
        if self.take("false"):
            return False
        raise self.error("true or false")

    def ints(self, what: str) -> tuple[int, ...]:
        """(1,2,3) or (): always a tuple."""
        self.expect("(", f"{what} like (0,1)")
        out: list[int] = []
        while not self.take(")"):
            if out:
                self.expect(",", f"',' or ')' in {what}")
            out.append(self.int(f"an integer in {what}"))
        return tuple(out)

    def keyword(self, key: str) -> None:
        self.expect(key, f"{key}=")
        self.expect("=", f"'=' after {key}")

    def dtype(self) -> str:
        text = self.kind("word", "a dtype (f32, f64, i32, i64, bool)")
        if text not in SHORT_DTYPE:
            raise ParseError(f"line {self.lineno}: expected a dtype (f32, f64, i32, i64, bool), found "
                             f"{text!r}\n  {self.line.strip()}")
        return SHORT_DTYPE[text]

    def type(self) -> NodeType:
        if self.take("("):
            types: list[TensorType] = []
            while not self.take(")"):
                if types:
                    self.expect(",", "',' or ')' in a tuple type")
                types.append(self.type())  # type: ignore[arg-type]
            return tuple(types)
        dtype = self.dtype()
        self.expect("[", "'[' after the dtype, as in f32[16,64]")
        dims: list[int] = []
        while not self.take("]"):
            if dims:
                self.expect(",", "',' or ']' in a shape")
            dim = self.int("a dimension")
            if dim < 0:  # TensorType would refuse it without the line
                raise ParseError(f"line {self.lineno}: expected a dimension >= 0, found {dim}\n  {self.line.strip()}")
            dims.append(dim)
        return TensorType(tuple(dims), dtype)

    def value(self) -> object:
        """A generic value: number, string, or a tuple/list of values (read as a tuple)."""
        tok = self.peek()
        if tok is not None and tok.kind == "str":
            self.pos += 1
            return json.loads(tok.text)
        for open_, close in (("(", ")"), ("[", "]")):
            if self.take(open_):
                items: list[object] = []
                while not self.take(close):
                    if items:
                        self.expect(",", f"',' or '{close}'")
                    items.append(self.value())
                return tuple(items)
        text = self.kind("num", "a value")
        return float(text) if any(c in text for c in ".eEn") else int(text)


# ---- parsing ------------------------------------------------------------------------------------

def _parse_array(c: _Cursor) -> list[object]:
    """An array constant's nested lists: [[1.0, 2.0], [3.0, 4.0]]; elements are numbers or true/false.
    Recursion follows the rank."""
    c.expect("[", "'[' starting an array constant")
    items: list[object] = []
    while not c.take("]"):
        if items:
            c.expect(",", "',' or ']' in an array constant")
        if c.at("["):
            items.append(_parse_array(c))
        elif c.at("true") or c.at("false"):
            items.append(c.bool())
        else:
            text = c.kind("num", "a number, true, false or '[' in an array constant")
            items.append(float(text) if any(ch in text for ch in ".eEn") else int(text))
    return items


def _parse_slice(c: _Cursor) -> tuple[tuple[int, int, int], ...]:
    c.expect("[", "'[' starting slice bounds like [0:16:1, 0:64:1]")
    triples: list[tuple[int, int, int]] = []
    while not c.take("]"):
        if triples:
            c.expect(",", "',' or ']' in slice bounds")
        start = c.int("a slice start")
        c.expect(":", "':' in start:stop:step")
        stop = c.int("a slice stop")
        c.expect(":", "':' in start:stop:step")
        triples.append((start, stop, c.int("a slice step")))
    return tuple(triples)


def _parse_pad(c: _Cursor) -> tuple[tuple[int, int], ...]:
    c.expect("[", "'[' starting pads like [(1,2), (0,0)]")
    pairs: list[tuple[int, int]] = []
    while not c.take("]"):
        if pairs:
            c.expect(",", "',' or ']' in pads")
        lo_hi = c.ints("a (lo,hi) pair")
        if len(lo_hi) != 2:
            raise ParseError(f"line {c.lineno}: expected a (lo,hi) pair, found {lo_hi}\n  {c.line.strip()}")
        pairs.append((lo_hi[0], lo_hi[1]))
    return tuple(pairs)


def _kw_int(key: str) -> Callable[[_Cursor], int]:
    def read(c: _Cursor) -> int:
        c.keyword(key)
        return c.int(f"an integer {key}")
    return read


def _kw_ints(key: str) -> Callable[[_Cursor], tuple[int, ...]]:
    def read(c: _Cursor) -> tuple[int, ...]:
        c.keyword(key)
        return c.ints(key)
    return read


def _parse_reduce(c: _Cursor) -> tuple[tuple[int, ...], bool]:
    axes = _kw_ints("axes")(c)
    c.keyword("keepdims")
    return axes, c.bool()


def _parse_cast(c: _Cursor) -> str:
    c.keyword("dtype")
    return c.dtype()


# op -> reads its attrs (the inverse of ATTR_TEXT)
ATTR_PARSE: dict[Op, Callable[[_Cursor], object]] = {
    **{op: _parse_reduce for op in REDUCE},
    Op.ARGMAX: _kw_int("axis"),
    Op.CONCAT: _kw_int("axis"),
    Op.ONEHOT: _kw_int("depth"),
    Op.RESHAPE: _kw_ints("shape"),
    Op.BROADCAST: _kw_ints("shape"),
    Op.TRANSPOSE: _kw_ints("perm"),
    Op.CAST: _parse_cast,
    Op.SLICE: _parse_slice,
    Op.PAD: _parse_pad,
}
assert ATTR_PARSE.keys() == ATTR_TEXT.keys()

_OPS_BY_NAME = {op.value: op for op in Op}


@dataclass
class _Header:
    """A loop/fused statement whose body is being read."""

    lineno: int
    line: str
    name: str
    op: Op
    groups: list[list[Node]]  # loop: consts, carry, xs; fused: its sources
    length: int
    reverse: bool
    type: NodeType
    side: dict[str, str]


@dataclass
class _Scope:
    """One graph being read: the top level or a body."""

    header: _Header | None
    names: dict[str, Node] = field(default_factory=dict)
    inputs: list[Node] = field(default_factory=list)
    has_signature: bool = False
    started: bool = False  # a statement was read (a signature must come first)
    outputs: tuple[Node, ...] | None = None
    output_names: tuple[str, ...] | None = None
    # input/param name -> (op, line) that declared it; one dict for the whole text (bodies share it)
    leaf_lines: dict[str, tuple[str, int]] = field(default_factory=dict)


def parse(text: str) -> Graph:
    """The graph written in `text` (the grammar is in this module's docstring)."""
    stack = [_Scope(header=None)]
    lineno = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = _tokenize(line, lineno)
        side: dict[str, str] = {}
        if tokens and tokens[-1].kind == "comment":
            side = _side_data(tokens.pop().text)
        if not tokens:
            continue
        c = _Cursor(tokens, lineno, line)
        scope = stack[-1]
        if c.at("}"):
            c.pos += 1
            c.end()
            if scope.header is None:
                raise ParseError(f"line {lineno}: '}}' without an open loop or fused body")
            if scope.outputs is None:
                raise ParseError(f"line {lineno}: expected 'return' before '}}' closing the body opened "
                                 f"at line {scope.header.lineno}")
            stack.pop()
            _close_body(scope, stack[-1])
            continue
        if scope.outputs is not None:
            what = "'}'" if scope.header is not None else "nothing (the graph ended with 'return')"
            raise c.error(f"{what} after 'return'")
        first = tokens[0]
        if first.kind == "caret":
            _signature(c, scope)
        elif c.take("return"):
            scope.outputs, scope.output_names = _return(c, scope)
        elif first.kind == "name":
            if scope.header is not None and not scope.has_signature:
                raise c.error(f"'^body(...):' as the first line of the body opened at line "
                              f"{scope.header.lineno}")
            scope.started = True
            header = _statement(c, scope, side)
            if header is not None:
                stack.append(_Scope(header=header, leaf_lines=scope.leaf_lines))
        else:
            raise c.error("a statement '%name = op ...', 'return', '^body(...):' or '}'")
    if len(stack) > 1:
        raise ParseError(f"line {lineno}: expected '}}' closing the body opened at line {stack[-1].header.lineno}"
                         f" before the end of the text")  # type: ignore[union-attr]
    top = stack[0]
    if top.outputs is None:
        raise ParseError(f"line {lineno}: expected 'return' before the end of the text")
    return Graph(tuple(top.inputs), top.outputs, top.output_names)


def _side_data(comment: str) -> dict[str, str]:
    """'# step 3, role backward, at f.py:12' -> {'step': '3', 'role': 'backward', 'at': 'f.py:12'}."""
    body = comment[1:].strip()
    side: dict[str, str] = {}
    head, sep, loc = body.partition("at ") if body.startswith("at ") else body.partition(", at ")
    if sep:
        side["at"] = loc.strip()
    for part in head.split(","):
        key, _, value = part.strip().partition(" ")
        if key in ("step", "role") and value:
            side[key] = value.strip()
    return side


def _signature(c: _Cursor, scope: _Scope) -> None:
    if scope.has_signature or scope.started:
        raise c.error("a statement (a signature '^body(...):' comes only first in a graph)")
    c.kind("caret", "'^body('")
    c.expect("(", "'(' after ^body")
    while not c.take(")"):
        if scope.inputs:
            c.expect(",", "',' or ')' in the body signature")
        name = c.kind("name", "an argument name like %a0")
        c.expect(":", f"':' and a type after {name}")
        type_ = c.type()
        if not isinstance(type_, TensorType):
            raise ParseError(f"line {c.lineno}: expected a tensor type for {name}, found a tuple\n  {c.line.strip()}")
        node = Node.leaf(Op.ARG, type_, len(scope.inputs), loc=f"<ir>:{c.lineno}")
        _define(c, scope, name, node)
        scope.inputs.append(node)
    c.expect(":", "':' ending the signature")
    c.end()
    scope.has_signature = True


def _define(c: _Cursor, scope: _Scope, name: str, node: Node) -> None:
    if name in scope.names:
        raise ParseError(f"line {c.lineno}: {name} is defined twice\n  {c.line.strip()}")
    scope.names[name] = node


def _ref(c: _Cursor, scope: _Scope) -> Node:
    name = c.kind("name", "a value name like %3")
    node = scope.names.get(name)
    if node is None:
        closed = " (loop bodies are closed: pass outer values in as consts)" if scope.header else ""
        raise ParseError(f"line {c.lineno}: {name} is not defined before its use in this scope{closed}"
                         f"\n  {c.line.strip()}")
    return node


def _refs(c: _Cursor, scope: _Scope, close: str | None = None) -> list[Node]:
    """NAME, NAME, ... up to `close` (consumed), or while names follow when there is no `close`."""
    out: list[Node] = []
    tok = c.peek()
    if (close is not None and c.take(close)) or (close is None and (tok is None or tok.kind != "name")):
        return out
    out.append(_ref(c, scope))
    while c.take(","):
        out.append(_ref(c, scope))
    if close is not None:
        c.expect(close, f"',' or '{close}'")
    return out


def _return(c: _Cursor, scope: _Scope) -> tuple[tuple[Node, ...], tuple[str, ...] | None]:
    outs: list[Node] = []
    names: list[str] = []
    while c.peek() is not None:
        if outs:
            c.expect(",", "',' between outputs")
        outs.append(_ref(c, scope))
        if c.take("as"):
            names.append(json.loads(c.kind("str", 'an output name like "loss"')))
    if names and len(names) != len(outs):
        raise ParseError(f"line {c.lineno}: expected a name ('as \"...\"') on every output or on none"
                         f"\n  {c.line.strip()}")
    return tuple(outs), (tuple(names) if names else None)


def _statement(c: _Cursor, scope: _Scope, side: dict[str, str]) -> _Header | None:
    name = c.kind("name", "a value name like %3")
    c.expect("=", f"'=' after {name}")
    opname = c.kind("word", "an op name")
    op = _OPS_BY_NAME.get(opname)
    if op is None:
        raise ParseError(f"line {c.lineno}: expected an op name ({', '.join(sorted(_OPS_BY_NAME))}), found "
                         f"{opname!r}\n  {c.line.strip()}")
    loc = side.get("at") or f"<ir>:{c.lineno}"
    if op in (Op.LOOP, Op.FUSED):
        if op is Op.LOOP:
            c.keyword("length")
            length = c.int("the loop length")
            c.keyword("reverse")
            reverse = c.bool()
            groups = []
            for group in ("consts", "carry", "xs"):
                c.expect(group, f"{group}(...)")
                c.expect("(", f"'(' after {group}")
                groups.append(_refs(c, scope, ")"))
        else:
            length, reverse, groups = 0, False, [_refs(c, scope)]
        c.expect(":", "':' and the node's type")
        type_ = c.type()
        c.expect("{", "'{' opening the body")
        c.end()
        return _Header(c.lineno, c.line, name, op, groups, length, reverse, type_, side)

    src: list[Node] = []
    arg: object = None
    if op is Op.INPUT:
        arg = json.loads(c.kind("str", 'an input name like "x"'))
    elif op is Op.PARAM:
        pname = json.loads(c.kind("str", 'a parameter name like "w"'))
        c.keyword("init")
        tok = c.peek()
        init = json.loads(c.kind("str", "")) if tok is not None and tok.kind == "str" else \
            c.kind("word", "an init spec like uniform:0.125")
        problem = init_spec_error(init)
        if problem is not None:  # ur.param refuses it too; init_values would have no way to draw it
            raise ParseError(f"line {c.lineno}: param {json.dumps(pname)}: {problem}; expected {INIT_KINDS}"
                             f"\n  {c.line.strip()}")
        arg = (pname, init)
    elif op is Op.CONST:
        if c.at("["):
            arg = _parse_array(c)
        elif c.at("true") or c.at("false"):
            arg = c.bool()
        else:
            text = c.kind("num", "a number, true, false or an array like [1.0, 2.0] after const")
            arg = float(text) if any(ch in text for ch in ".eEn") else int(text)
    elif op is Op.ARG:
        arg = c.value()
    elif op is Op.PROJ:
        src = [_ref(c, scope)]
        arg = int(c.kind("idx", "an output index like #0")[1:])
    else:
        src = _refs(c, scope)
        if op in ATTR_PARSE:
            arg = ATTR_PARSE[op](c)
    c.expect(":", "':' and the node's type")
    type_ = c.type()
    c.end()
    if op in (Op.INPUT, Op.PARAM):
        _declare_leaf(c, scope, op, arg)
    if op in (Op.INPUT, Op.PARAM, Op.CONST, Op.ARG):
        node = _leaf(c, op, type_, arg, loc)
        if scope.header is None and op in (Op.INPUT, Op.PARAM) and not scope.has_signature:
            scope.inputs.append(node)
    else:
        node = _make(c.lineno, c.line, op, src, arg, type_, loc)
    _side(node, side)
    _define(c, scope, name, node)
    return None


def _declare_leaf(c: _Cursor, scope: _Scope, op: Op, arg: object) -> None:
    """One input or param per name in a text: feeds are matched by name, so a second declaration
    (of another shape, or the same one) could never be fed apart from the first."""
    name = arg[0] if op is Op.PARAM else arg  # type: ignore[index]
    first_op, first_line = scope.leaf_lines.setdefault(name, (op.value, c.lineno))  # type: ignore[arg-type]
    if first_line != c.lineno:
        raise ParseError(f"line {c.lineno}: {op.value} {json.dumps(name)}: the name is declared twice (first as "
                         f"{first_op} at line {first_line}); expected one input or param per name"
                         f"\n  {c.line.strip()}")


def _const_literals(c: _Cursor, arg: object, dtype: str) -> None:
    """A bool const is written true/false and a number const with numbers, as the printer writes
    them: `const 2 : bool[]` or `const true : f32[]` would otherwise convert silently."""
    items = list(np.ravel(np.array(arg, dtype=object))) if isinstance(arg, list) else [arg]
    for item in items:
        if isinstance(item, bool) != (dtype == "bool"):
            expected = "true or false" if dtype == "bool" else "numbers"
            found = json.dumps(item) if isinstance(item, bool) else repr(item)
            raise ParseError(f"line {c.lineno}: const: expected {expected} for a {DTYPE_SHORT[dtype]} constant, "
                             f"found {found}\n  {c.line.strip()}")


def _leaf(c: _Cursor, op: Op, type_: NodeType, arg: object, loc: str) -> Node:
    if not isinstance(type_, TensorType):
        raise ParseError(f"line {c.lineno}: expected a tensor type for {op.value}, found a tuple\n  {c.line.strip()}")
    if op is Op.CONST:  # the arg build.const would store: the dtype's scalar type, or a FrozenArray
        if isinstance(arg, list):
            shape = np.shape(arg) if _rectangular(arg) else None
            if shape != type_.shape:
                found = f"shape {list(shape)}" if shape is not None else "rows of different lengths"
                raise ParseError(f"line {c.lineno}: expected an array constant of shape {list(type_.shape)} "
                                 f"(the written type), found {found}\n  {c.line.strip()}")
        _const_literals(c, arg, type_.dtype)
        try:
            arg = const_arg(arg, type_.shape, type_.dtype)
        except ShapeError as err:
            raise ParseError(f"line {c.lineno}: {str(err).splitlines()[0]}\n  {c.line.strip()}") from None
    return Node.leaf(op, type_, arg, loc=loc)


def _rectangular(rows: object) -> bool:
    """Nested lists whose rows at each level have one length (numpy would reject ragged ones)."""
    if not isinstance(rows, list):
        return True
    kinds = {(isinstance(r, list), len(r) if isinstance(r, list) else 0) for r in rows}
    return len(kinds) <= 1 and all(_rectangular(r) for r in rows)


def _make(lineno: int, line: str, op: Op, src: list[Node], arg: object, type_: NodeType, loc: str) -> Node:
    try:
        node = Node.make(op, src, arg, loc=loc)
    except ShapeError as err:
        raise ParseError(f"line {lineno}: {str(err).splitlines()[0]}\n  {line.strip()}") from None
    if node.type != type_:
        written = type_ if isinstance(type_, TensorType) else "(" + ", ".join(map(str, type_)) + ")"
        raise ParseError(f"line {lineno}: the written type {written} differs from the type {op.value} "
                         f"gives, {node.type_str()}\n  {line.strip()}")
    return node


def _side(node: Node, side: dict[str, str]) -> None:
    if node.step is None and side.get("step", "").lstrip("-").isdigit():
        node.step = int(side["step"])
    if node.role is None and "role" in side:
        node.role = side["role"]


def _close_body(body_scope: _Scope, outer: _Scope) -> None:
    h = body_scope.header
    assert h is not None and body_scope.outputs is not None
    body = Graph(tuple(body_scope.inputs), body_scope.outputs, body_scope.output_names)
    src = [n for group in h.groups for n in group]
    if h.op is Op.LOOP:
        consts, carry, _ = h.groups
        arg: object = LoopInfo(body, h.length, len(consts), len(carry), h.reverse)
    else:
        arg = body
    node = _make(h.lineno, h.line, h.op, src, arg, h.type, h.side.get("at") or f"<ir>:{h.lineno}")
    _side(node, h.side)
    if h.name in outer.names:
        raise ParseError(f"line {h.lineno}: {h.name} is defined twice\n  {h.line.strip()}")
    outer.names[h.name] = node

