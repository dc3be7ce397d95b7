"""The CUDA backend: a graph lowered to generated numba.cuda kernels over preallocated device buffers.

    step = ur.compile([loss, *grads], backend="cuda")                 # numpy in, numpy out
    step = ur.compile([loss, *grads], backend="cuda", device_outputs=True)
    feeds = step.impl.to_device(x=xv, y=yv, **model.state_dict())    # parameters stay on the GPU
    loss, *grads = step(**feeds)                                      # device arrays in and out
    print(step.impl.plan)                                             # which path each loop took

Lowering (`Program`): after `ur.optimize`, every node is either *materialized* (inputs, loop
results, matmuls, reductions, graph outputs, values used twice that are not cheap views) or
*inlined* into the kernels that read it. Kernels, generated as source (see cuda.codegen):
- fused elementwise: one thread per element computing one or more independent materialized nodes,
  with every inlined producer rendered from the scalar expression table shared with the CPU backend;
- reductions: block tree + deterministic cross-block combination (kernels.reduction_kernel);
- matmul: tiled shared-memory GEMM reading its operands through views (the hoisted input
  projection and the weight gradients; cuBLAS is not reachable from numba);
- loops: one persistent kernel for all T steps (cuda.loop), forward and backward, reading view and
  constant sources (W.T, zeros, gate slices) and small single-use sequence expressions (the loss
  gradient) in place; loops it cannot run (nested loops, option persistent=False, a kernel that
  fails to compile, fit or launch) run as a host loop over steps that launches the body's kernels
  each step. `plan` records each loop's path and the reason.

Execution (`CudaCompiled`): device buffers are allocated on the first call and reused; host arrays
are copied in, device arrays (numba, CuPy, PyTorch: anything with __cuda_array_interface__) are
used in place; outputs come back as numpy arrays, or as device arrays with device_outputs=True (the
program's buffers, overwritten by the next call unless copy_outputs=True; ready in stream order:
the legacy default stream waits for them, other streams after `step.impl.synchronize()`). On a GPU
the launches of a call are captured once into a CUDA graph and replayed (a numba launch costs ~50 us
of Python).

Out-of-range onehot ids (an Embedding fed an id outside the vocabulary): a kernel cannot raise, so
the kernel computing a onehot writes (1, id) into that onehot's small error buffer (int64[2]) when
an id is outside [0, depth) (its row is zeros, and the launch carries on); after each call the host
reads the buffers back and raises IndexError("onehot: id ... is out of range for depth ...", with
where the onehot was built), as the numpy reference does, and clears them. Reading them waits for
the call's kernels: with device_outputs=True that is one synchronization per call, and only for
graphs that contain a onehot; check_ids=False skips the check (out-of-range ids then give zero rows).

No GPU and no simulator: compile raises CudaUnavailableError naming the alternatives. numba.cuda
is imported only when a graph is compiled for this backend.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ...ir.node import Graph, LoopInfo, Node, proj, toposort
from ...ir.ops import ELEMENTWISE, LEAVES, MOVEMENT, Op
from .codegen import NP_DTYPES, inline_fused
from .kernels import (
    KernelSpec,
    Tuning,
    elementwise_kernel,
    matmul_kernel,
    reduction_kernel,
)
from .loop import (
    DeviceProps,
    LoopOptions,
    NotPersistent,
    check_persistent,
    plan_loop,
)

FLEXIBLE_SHAPES = False  # kernels are specialized to the graph's static shapes

# ur.optimize's default pipeline: fuse_cells' one FUSED node per step is one kernel launch per step
PASSES: tuple[str, ...] = ("simplify", "fuse_matmuls", "hoist", "simplify", "fuse_cells", "simplify")

_CHEAP = frozenset({Op.STOP_GRADIENT, Op.CAST, Op.NEG, Op.CONST}) | (MOVEMENT - {Op.PAD, Op.CONCAT})


@dataclass(frozen=True)
class Options:
    passes: tuple = PASSES            # the pass pipeline (ur.compile resolves it: compile.pass_pipeline)
    device_outputs: bool = False      # return device arrays (the program's buffers) instead of numpy
    copy_outputs: bool = False        # device outputs: fresh copies instead of the program's buffers
    persistent: bool = True           # False: every loop runs as a host loop over steps
    cuda_graph: str | bool = "auto"   # capture each call's launches into a CUDA graph (GPU only)
    check_ids: bool = True            # raise IndexError for onehot ids outside [0, depth) (see below)
    loop: LoopOptions = LoopOptions()
    tuning: Tuning = Tuning()


def parse_options(options: dict[str, Any], simulator: bool) -> Options:
    opts = dict(options)
    if "passes" in opts:
        opts["passes"] = tuple(opts["passes"])
    loop_keys = {"blocks", "threads", "sync", "smem_weights", "work_per_block"}
    loop = {k: opts.pop(k) for k in list(opts) if k in loop_keys}
    if loop.get("threads") is None:
        loop.pop("threads", None)
    base = Options(tuning=Tuning.simulator() if simulator else Tuning(),
                   loop=LoopOptions(threads=32) if simulator else LoopOptions())
    known = {f for f in Options.__dataclass_fields__ if f != "loop"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise TypeError(f"cuda backend: unknown options {', '.join(unknown)}; expected "
                        f"{', '.join(sorted(known | loop_keys))}")
    if loop.get("sync", "atomic") not in ("atomic", "cg"):
        raise ValueError(f"cuda backend: sync must be 'atomic' or 'cg', found {loop['sync']!r}")
    return replace(base, **opts, loop=replace(base.loop, **loop))


# ---- lowering (no device needed) ---------------------------------------------------------------------

@dataclass
class Launch:
    spec: KernelSpec
    loop: Node | None = None          # the LOOP a persistent kernel runs
    plan_index: int = -1              # its entry in Program.plan


@dataclass
class HostLoop:
    node: Node
    body: Program
    reason: str
    pre: list[KernelSpec] = field(default_factory=list)  # materializes sources a kernel would inline


def _describe_loop(n: Node) -> str:
    info: LoopInfo = n.arg  # type: ignore[assignment]
    return f"loop T={info.length} {'reverse' if info.reverse else 'forward'} at {n.loc}"


class Program:
    """A graph as a list of kernel launches and host loops, planned without touching a device."""

    def __init__(self, graph: Graph, options: Options, props: DeviceProps, prefix: str = "") -> None:
        self.graph = graph
        self.options, self.props, self.prefix = options, props, prefix
        self.inputs = list(graph.inputs)
        self.outputs = inline_fused(list(graph.outputs))
        self.steps: list[Launch | HostLoop] = []
        self.plan: list[dict] = []
        self._lower()

    def specs(self) -> list[KernelSpec]:
        out: list[KernelSpec] = []
        for step in self.steps:
            out.extend([step.spec] if isinstance(step, Launch) else step.pre + step.body.specs())
        return out

    @property
    def launches(self) -> int:
        return len(self.steps)

    def _lower(self) -> None:
        order = toposort(self.outputs)
        self.materialized = self._materialize(order)
        self._kernels(order)

    def _materialize(self, order: list[Node]) -> set[Node]:
        """The nodes that get a buffer; every other node is inlined into the kernels reading it."""
        users: Counter = Counter()
        for n in order:
            for s in n.src:
                users[s] += 1
        for r in self.outputs:
            users[r] += 1
        mat: set[Node] = set(self.inputs)

        def view_of_materialized(n: Node) -> bool:
            while n not in mat and n.op in _CHEAP and n.op is not Op.CONST:
                n = n.src[0]
            return n in mat or n.op in LEAVES

        for n in order:
            if n.op in (Op.INPUT, Op.PARAM, Op.ARG, Op.PROJ):
                mat.add(n)
            elif n.op is Op.LOOP:
                # a persistent kernel reads constant and view sources (W.T, zeros, gate slices of
                # the hoisted projection) in place; a host loop needs every source in a buffer
                # sequences that only this loop reads and that are a small elementwise expression
                # (the loss gradient dy) are computed in the kernel too: one pass less over T*B*H
                mat.add(n)
                inline_ok = self.options.persistent and _persistent_ok(n)
                info: LoopInfo = n.arg  # type: ignore[assignment]
                first_x = info.n_consts + info.n_carry
                for i, s in enumerate(n.src):
                    if inline_ok and (s.op is Op.CONST or view_of_materialized(s) or
                                      (i >= first_x and _small_expression(s, users, mat))):
                        continue
                    mat.add(s)
            elif n.op is Op.MATMUL:
                mat.add(n)
                mat.update(s for s in n.src if not view_of_materialized(s))
            elif n.op in (Op.SUM, Op.REDUCE_MAX, Op.ARGMAX):
                mat.add(n)
            elif n.op is Op.FUSED:
                raise AssertionError("fused nodes are inlined before lowering")
            elif n.op is not Op.CONST and users[n] >= 2 and n.op not in _CHEAP:
                mat.add(n)
        mat.update(o for o in self.outputs if o.op not in (Op.INPUT, Op.PARAM, Op.ARG))
        return mat

    def _kernels(self, order: list[Node]) -> None:
        """The steps: materialized nodes in order, independent elementwise ones grouped per launch."""
        mat = self.materialized
        is_mat = mat.__contains__
        tuning = self.options.tuning

        group: list[Node] = []
        group_set: set[Node] = set()

        def name(kind: str) -> str:
            return f"{self.prefix}{kind}{len(self.steps)}"

        def flush() -> None:
            if group:
                self.steps.append(Launch(elementwise_kernel(name("ew"), list(group), is_mat, tuning)))
                group.clear()
                group_set.clear()

        def deps(n: Node) -> set[Node]:
            out, stack, seen = set(), list(n.src), set()
            while stack:
                s = stack.pop()
                if s in seen:
                    continue
                seen.add(s)
                if s in mat:
                    out.add(s)
                else:
                    stack.extend(s.src)
            return out

        for n in order:
            if n not in mat or n.op in (Op.INPUT, Op.PARAM, Op.ARG, Op.PROJ):
                continue
            if n.op is Op.LOOP:
                flush()
                self._loop_step(n)
            elif n.op is Op.MATMUL:
                flush()
                if n.tensor_type.size:
                    self.steps.append(Launch(matmul_kernel(name("mm"), n, is_mat, tuning)))
            elif n.op in (Op.SUM, Op.REDUCE_MAX) and n.src[0].tensor_type.size // max(1, n.tensor_type.size) > 32:
                flush()
                if n.tensor_type.size:
                    self.steps.append(Launch(reduction_kernel(name("red"), n, is_mat, tuning)))
            else:  # elementwise, small reductions, argmax, materialized views: one thread per element
                if n.tensor_type.size == 0:
                    continue
                if group and deps(n) & group_set:
                    flush()
                group.append(n)
                group_set.add(n)
        flush()

    def _loop_step(self, n: Node) -> None:
        reason = "persistent=False"
        if self.options.persistent:
            try:
                plan = plan_loop(n, self.options.loop, self.props, self.materialized.__contains__)
                self.steps.append(Launch(plan.spec, loop=n, plan_index=len(self.plan)))
                self.plan.append({"loop": _describe_loop(n), **plan.description})
                return
            except NotPersistent as err:
                reason = str(err)
        self.steps.append(self.host_loop(n, reason))

    def fall_back(self, index: int, reason: str) -> HostLoop:
        """Replace the persistent kernel at steps[index] by a host loop (its plan entry too)."""
        step = self.steps[index]
        assert isinstance(step, Launch) and step.loop is not None
        replacement = self.host_loop(step.loop, reason)
        self.plan[step.plan_index] = self.plan.pop()
        self.steps[index] = replacement
        return replacement

    def host_loop(self, n: Node, reason: str) -> HostLoop:
        info: LoopInfo = n.arg  # type: ignore[assignment]
        body = Program(Graph(info.body.inputs, tuple(info.body.outputs)), self.options, self.props,
                       prefix=f"{self.prefix}L{len(self.steps)}_")
        missing = [s for s in dict.fromkeys(n.src) if s not in self.materialized and s.tensor_type.size]
        pre = [elementwise_kernel(f"{self.prefix}src{len(self.steps)}_", missing,
                                  self.materialized.__contains__, self.options.tuning)] if missing else []
        self.materialized.update(missing)
        self.plan.append({"loop": _describe_loop(n), "path": "host loop", "reason": reason,
                          "launches_per_step": body.launches + info.n_carry + info.n_ys,
                          "body": body.plan})
        return HostLoop(n, body, reason, pre)


def _small_expression(node: Node, users: Counter, mat: set[Node], limit: int = 16) -> bool:
    """An elementwise/view expression of at most `limit` nodes over materialized values, each of its
    nodes read by one user only (inlining it then duplicates no work)."""
    stack, seen = [node], 0
    while stack:
        n = stack.pop()
        if n in mat or n.op in LEAVES:
            continue
        seen += 1
        if seen > limit or users[n] != 1 or not (n.op in ELEMENTWISE or n.op in MOVEMENT):
            return False
        stack.extend(n.src)
    return True


def _persistent_ok(loop: Node) -> bool:
    try:
        check_persistent(loop)
    except NotPersistent:
        return False
    return True


def build_program(graph: Graph | Node | Sequence[Node], props: DeviceProps = DeviceProps(),
                  optimize: bool = True, **options: Any) -> Program:
    """Plan and generate every kernel for `graph` without a device (PTX tests, inspection);
    `optimize=False` skips the passes (as `ur.compile` does)."""
    if not isinstance(graph, Graph):
        graph = Graph.of([graph] if isinstance(graph, Node) else list(graph))
    opts = parse_options(options if optimize else {**options, "passes": ()}, props.simulator)
    return Program(_prepare(graph, opts), opts, props)


def _prepare(graph: Graph, opts: Options) -> Graph:
    if not opts.passes:
        return graph
    from ...ir.optimize import optimize
    return optimize(graph, passes=list(opts.passes))


# ---- execution ---------------------------------------------------------------------------------------

def _flat(arr: Any) -> Any:
    return arr.reshape(arr.size) if arr.ndim != 1 else arr


def _input_name(n: Node) -> str:
    return n.name or f"arg{n.arg}"


def _pointer(arr: Any) -> int:
    iface = getattr(arr, "__cuda_array_interface__", None)
    return int(iface["data"][0]) if iface else id(arr)


class Executor:
    """Runs a Program: its device buffers are allocated on first use and reused by every run."""

    def __init__(self, program: Program, stream: Any, compiled: CudaCompiled) -> None:
        self.program, self.stream, self.compiled = program, stream, compiled
        self.buffers: dict[Node, Any] = {}
        self.scratch: dict[Any, Any] = {}
        self.consts: dict[Any, Any] = {}
        self.subs: dict[int, Executor] = {}
        self.loop_carries: dict[int, list[Any]] = {}
        self.checks: dict[Any, Node] = {}   # error-buffer scratch key -> the onehot it checks

    def buffer(self, node: Node) -> Any:
        buf = self.buffers.get(node)
        if buf is None:
            from . import runtime as rt
            buf = self.buffers[node] = rt.empty(node.tensor_type.size, node.dtype, self.stream)
        return buf

    def _arg(self, ref: tuple, spec: KernelSpec, env: dict[Node, Any]) -> Any:
        from . import runtime as rt
        kind, key = ref
        if kind == "node":
            if key not in env:
                env[key] = self.buffer(key)
            return env[key]
        if kind == "scratch":
            buf = self.scratch.get(key)
            if buf is None:
                size, dtype = spec.scratch[key]
                buf = self.scratch[key] = rt.upload(np.zeros(size, NP_DTYPES[dtype]), self.stream)
                if key in spec.checks:
                    self.checks[key] = spec.checks[key]
            return buf
        buf = self.consts.get(key)
        if buf is None:
            buf = self.consts[key] = rt.upload(spec.constants[key], self.stream)
        return buf

    def run(self, env: dict[Node, Any]) -> list[Any]:
        """Run every step; env maps the program's inputs to flat device arrays. Returns the
        outputs (flat device arrays)."""
        from . import runtime as rt
        for i, step in enumerate(self.program.steps):
            if isinstance(step, HostLoop):
                self._host_loop(step, env)
                continue
            args = [self._arg(ref, step.spec, env) for _, _, ref in step.spec.params]
            try:
                kern = rt.kernel(step.spec)
                if step.loop is not None:
                    self._check_coresident(kern, step)
                kern.launch(args, self.stream)
            except Exception as err:
                if step.loop is None:
                    raise
                # a persistent kernel that does not compile, fit or launch: run the loop step by step
                replacement = self.program.fall_back(i, f"persistent kernel failed: {type(err).__name__}: {err}")
                self._host_loop(replacement, env)
        return [env[o] if o in env else self.buffer(o) for o in self.program.outputs]

    def check_ids(self) -> None:
        """Raise the IndexError a onehot kernel recorded (an id outside [0, depth)). Reads every
        error buffer back (this waits for the stream) and clears the flagged ones before raising,
        so the next call starts clean."""
        flagged = [(node, flags) for node, flags in self._read_checks() if flags[0]]
        if flagged:
            from .kernels import raise_if_flagged
            raise_if_flagged(*flagged[0])

    def _read_checks(self) -> list[tuple[Node, np.ndarray]]:
        out = []
        for key, node in self.checks.items():
            buf = self.scratch[key]
            flags = buf.copy_to_host(stream=self.stream)
            self.stream.synchronize()
            if flags[0]:
                buf.copy_to_device(np.zeros_like(flags), stream=self.stream)
            out.append((node, flags))
        for sub in self.subs.values():
            out += sub._read_checks()
        return out

    @staticmethod
    def _check_coresident(kern: Any, step: Launch) -> None:
        blocks = step.spec.grid[0]
        fit = kern.max_coresident_blocks()
        if blocks > fit:
            raise NotPersistent(f"{blocks} blocks cannot all be resident (at most {fit})")

    def _host_loop(self, step: HostLoop, env: dict[Node, Any]) -> None:
        node = step.node
        info: LoopInfo = node.arg  # type: ignore[assignment]
        n_c, n_h = info.n_consts, info.n_carry
        sub = self.subs.get(id(step))
        if sub is None:
            sub = self.subs[id(step)] = Executor(step.body, self.stream, self.compiled)
        from . import runtime as rt
        for spec in step.pre:
            rt.kernel(spec).launch([self._arg(ref, spec, env) for _, _, ref in spec.params], self.stream)
        srcs = [env[s] if s in env else self.buffer(s) for s in node.src]
        # two sets of carry buffers: a body output may be one of its own inputs (a carry passed
        # through or saved as a per-step output), so the new carries go to the other set
        sets = self.loop_carries.get(id(step))
        if sets is None:
            from . import runtime as rt
            sets = self.loop_carries[id(step)] = [
                [rt.empty(s.tensor_type.size, s.dtype, self.stream) for s in node.src[n_c:n_c + n_h]]
                for _ in range(2)]
        for k in range(n_h):
            _copy(sets[0][k], srcs[n_c + k], node.src[n_c + k].tensor_type.size, self.stream)
        xs = srcs[n_c + n_h:]
        x_sizes = [a.tensor_type.size for a in info.body.inputs[n_c + n_h:]]
        y_nodes = [proj(node, n_h + j) for j in range(info.n_ys)]
        ys = [self.buffer(y) for y in y_nodes]
        y_sizes = [o.tensor_type.size for o in info.body.outputs[n_h:]]
        for y, yb in zip(y_nodes, ys):
            env[y] = yb
        body_inputs = step.body.inputs
        for s in range(info.length):
            t = info.length - 1 - s if info.reverse else s
            carries, new = sets[s % 2], sets[(s + 1) % 2]
            args = srcs[:n_c] + carries + [x[t * n:(t + 1) * n] for x, n in zip(xs, x_sizes)]
            outs = sub.run(dict(zip(body_inputs, args)))
            for j, (yb, n) in enumerate(zip(ys, y_sizes)):
                if n:
                    yb[t * n:(t + 1) * n].copy_to_device(outs[n_h + j][:n], stream=self.stream)
            for k in range(n_h):
                _copy(new[k], outs[k], info.body.outputs[k].tensor_type.size, self.stream)
        final = sets[info.length % 2]
        for k in range(n_h):
            out = proj(node, k)
            env[out] = self.buffer(out)
            _copy(env[out], final[k], out.tensor_type.size, self.stream)


def _copy(dst: Any, src: Any, n: int, stream: Any) -> None:
    if n:
        dst[:n].copy_to_device(src[:n], stream=stream)


class CudaCompiled:
    """The callable `compile_graph` returns: `(arrays in graph.inputs order) -> list of arrays`."""

    def __init__(self, program: Program, options: Options, simulator: bool,
                 inputs: Sequence[Node] | None = None) -> None:
        self.program, self.options, self.simulator = program, options, simulator
        self.graph = program.graph
        # callers pass arrays in the order of the graph they compiled; optimize may drop or reorder
        names = [_input_name(n) for n in (inputs if inputs is not None else program.inputs)]
        self._take = [names.index(_input_name(n)) for n in program.inputs]
        self._executor: Executor | None = None
        self._stream: Any = None
        self._graphs: OrderedDict[tuple, Any] = OrderedDict()
        self._seen: Counter = Counter()
        self._inputs_seen: dict[int, tuple[Any, Any, int]] = {}
        self._out_views: dict[int, tuple[Any, Any]] = {}
        self.cuda_graph_status = "off (simulator)" if simulator else \
            ("on" if options.cuda_graph in ("auto", True) else "off")

    @property
    def impl(self) -> CudaCompiled:
        return self

    @property
    def stream(self) -> Any:
        """The CUDA stream this graph's kernels run on (None before the first call)."""
        return self._stream

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    @property
    def plan(self) -> list[dict]:
        """One entry per loop: its path (persistent kernel or host loop), why, and its layout."""
        return self.program.plan

    @property
    def source(self) -> str:
        return "\n\n".join(f"# ---- {s.name}: {s.note}\n{s.body}" for s in self.program.specs())

    def to_device(self, feeds: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Copy arrays to the GPU once (e.g. parameters), cast to the graph's dtypes; pass the
        result back as feeds so nothing is copied per call."""
        from . import runtime as rt
        cuda = rt.cuda_module()
        dtypes = {n.name or f"arg{n.arg}": n.dtype for n in self.graph.inputs}
        out = {}
        for key, value in {**(feeds or {}), **more}.items():
            if rt.is_device_array(value):
                out[key] = value
                continue
            arr = np.asarray(value)
            if key in dtypes:
                arr = arr.astype(NP_DTYPES[dtypes[key]], copy=False)
            out[key] = cuda.to_device(np.ascontiguousarray(arr))
        return out

    def __call__(self, arrays: Sequence[Any]) -> list[Any]:
        from . import runtime as rt
        if self._executor is None:
            self._stream = rt.new_stream()
            self._executor = Executor(self.program, self._stream, self)
        ex, stream = self._executor, self._stream
        env: dict[Node, Any] = {}
        key = []
        for node, value in zip(self.program.inputs, [arrays[i] for i in self._take]):
            if rt.is_device_array(value):
                flat, ptr = self._device_input(node, value)
                env[node] = flat if node.tensor_type.size else ex.buffer(node)
                key.append(ptr)
            else:
                arr = np.ascontiguousarray(value, dtype=NP_DTYPES[node.dtype]).reshape(-1)
                buf = ex.buffer(node)
                if arr.size:
                    buf.copy_to_device(arr, stream=stream)
                env[node] = buf
                key.append(id(buf))
        outs = self._run(env, tuple(key))
        result = self._outputs(outs, stream)
        if self.options.check_ids:
            ex.check_ids()
        return result

    def _device_input(self, node: Node, value: Any) -> tuple[Any, int]:
        """A flat view of a device input and its address; cached per array object (a training
        loop feeds the same arrays every step: no new views, and the CUDA graph is reused)."""
        from . import runtime as rt
        hit = self._inputs_seen.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1], hit[2]
        dev = rt.as_device(value)
        size, dtype = node.tensor_type.size, NP_DTYPES[node.dtype]
        if np.dtype(dev.dtype) != dtype or dev.size != size:
            raise ValueError(f"input {node.name!r}: expected a {node.type} device array, found "
                             f"dtype {dev.dtype} with shape {tuple(dev.shape)}")
        flat = _flat(dev) if size else dev
        entry = (value, flat, _pointer(flat) if size else 0)
        if len(self._inputs_seen) > 64:
            self._inputs_seen.clear()
        self._inputs_seen[id(value)] = entry
        return entry[1], entry[2]

    def _run(self, env: dict[Node, Any], key: tuple) -> list[Any]:
        ex = self._executor
        assert ex is not None
        if self.cuda_graph_status != "on":
            return ex.run(env)
        self._seen[key] += 1
        graph = self._graphs.get(key)
        if graph is None and self._seen[key] >= 2:  # second call with these buffers: capture
            from . import runtime as rt
            captured_env = dict(env)
            try:
                graph = rt.CapturedGraph(self._stream, lambda: ex.run(captured_env))
            except Exception as err:  # keep working without graphs; say why
                self.cuda_graph_status = f"off ({type(err).__name__}: {err})"
                return ex.run(env)
            self._graphs[key] = graph
            while len(self._graphs) > 4:
                self._graphs.popitem(last=False)
            env.update(captured_env)
        if graph is None:
            return ex.run(env)
        graph.replay()
        return [env[o] if o in env else ex.buffer(o) for o in self.program.outputs]

    def _outputs(self, outs: list[Any], stream: Any) -> list[Any]:
        from . import runtime as rt
        nodes = self.program.outputs
        if self.options.device_outputs:
            result = []
            for i, (node, dev) in enumerate(zip(nodes, outs)):
                size = node.tensor_type.size
                if self.options.copy_outputs and size:
                    copy = rt.empty(size, node.dtype, stream)
                    copy.copy_to_device(dev[:size], stream=stream)
                    result.append(_shaped(copy, node))
                    continue
                cached = self._out_views.get(i)
                if cached is None or cached[0] is not dev:  # the program's buffers: views made once
                    cached = self._out_views[i] = (dev, _shaped(dev, node) if size else
                                                   rt.cuda_module().device_array(node.shape, NP_DTYPES[node.dtype]))
                result.append(cached[1])
            # no synchronize: the next step queues behind this one (CPU and GPU overlap, as with
            # PyTorch); work on the legacy default stream (numba's copy_to_host, PyTorch's default
            # stream) waits for it. Other streams: call step.impl.synchronize() first.
            return result
        hosts = []
        for node, dev in zip(nodes, outs):
            size = node.tensor_type.size
            hosts.append(dev[:size].copy_to_host(stream=stream) if size else np.empty(0, NP_DTYPES[node.dtype]))
        stream.synchronize()
        return [h.reshape(node.shape) for h, node in zip(hosts, nodes)]


def _shaped(dev: Any, node: Node) -> Any:
    view = dev[:node.tensor_type.size]
    try:
        return view.reshape(node.shape)
    except Exception:  # a 0-d view some array types cannot make: the 1-element array instead
        return view


def compile_graph(graph: Graph, **options: Any) -> CudaCompiled:
    """Lower `graph` for the GPU (or numba's simulator with NUMBA_ENABLE_CUDASIM=1). Options:
    passes (the pipeline, as `compile.pass_pipeline` resolves it; default PASSES), device_outputs
    (False), copy_outputs, persistent (True), cuda_graph ("auto"), check_ids (True), blocks / threads / sync
    ("atomic" | "cg") / smem_weights for persistent loops."""
    from . import runtime as rt
    rt.require_device()
    simulator = rt.simulator_enabled()
    opts = parse_options(options, simulator)
    props = rt.device_props()
    program = Program(_prepare(graph, opts), opts, props)
    return CudaCompiled(program, opts, simulator, inputs=graph.inputs)


__all__ = ["FLEXIBLE_SHAPES", "CudaCompiled", "Options", "Program", "build_program", "compile_graph"]
