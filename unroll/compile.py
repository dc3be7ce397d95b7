"""`ur.compile`: pick a backend, resolve its pass pipeline, check the caller's arrays, return a callable.

A backend module (listed in `unroll.backends.BACKENDS`) exposes
`compile_graph(graph, passes, **options) -> fn(list_of_arrays) -> list_of_arrays` and `PASSES`, the
names of the `ir.optimize` passes it wants, in order. `pass_pipeline` is the one place that turns
that declaration and the user's `optimize=` / `passes=` into the list a backend runs; the backend
runs exactly that list (the Numba backend first looks for a recorded result of it in its cache).
A module may set `FLEXIBLE_SHAPES = True` when its code reads sizes from the arrays (then only
ranks, dtypes and the non-time/batch dims fixed by the weights are checked by the backend itself).

Fed values are also checked against the graph's run-time conditions (`ir/checks.py`: a sequence
length within 1..T), on the host before any backend runs, so every backend raises the same error.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Sequence

import numpy as np

from .backends import BACKENDS
from .ir.checks import FeedCheck, FeedError, FeedValueError, feed_checks
from .ir.constants import lift_array_constants
from .ir.loops import merge_loops
from .ir.node import Graph, Node
from .ir.ops import FLOAT_DTYPES, INT_DTYPES
from .ir.optimize import PASSES as KNOWN_PASSES
from .ir.specialize import bind_sizes, canonical_sizes, feed_shapes, is_polymorphic, specialize

__all__ = ["Compiled", "FeedError", "FeedValueError", "PolymorphicCompiled", "compile", "pass_pipeline"]

Pass = Any  # a pass name, a Graph -> Graph function, or a (name, function) pair

# disabling a pass also disables the passes that are its variants
_VARIANTS = {"fuse_cells": ("fuse_top_level",), "hoist": ("hoist_any_size",)}


class Compiled:
    """A compiled graph: call it with arrays by input name; it returns arrays in output order."""

    def __init__(self, graph: Graph, backend: str, run: Callable[[list[np.ndarray]], list[np.ndarray]],
                 single: bool, flexible_shapes: bool = False, impl: Any = None,
                 checks: list[FeedCheck] | None = None) -> None:
        self.graph = graph
        self.backend = backend
        self.single = single
        self.flexible_shapes = flexible_shapes
        self.impl = impl  # the backend's object (generated source lives there)
        self._run = run
        self.checks = checks if checks is not None else feed_checks(graph)

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def source(self) -> str | None:
        return getattr(self.impl, "source", None)

    def check_feeds(self, feeds: dict[str, Any]) -> list[np.ndarray]:
        names = self.input_names
        missing = [n for n in names if n not in feeds]
        extra = sorted(set(feeds) - set(names))
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(
                    f"{n!r} ({node.type})" for n, node in zip(names, self.graph.inputs) if n in missing))
            if extra:
                parts.append(f"unexpected {', '.join(map(repr, extra))}")
            raise FeedError(f"compiled graph: {'; '.join(parts)}; expected inputs: {', '.join(names)}")
        arrays = []
        device_ok = self.backend == "cuda"  # GPU arrays are checked here and used in place
        for name, node in zip(names, self.graph.inputs):
            value = feeds[name]
            if device_ok and hasattr(value, "__cuda_array_interface__"):
                arrays.append(_check_device_array(name, node, value))
            else:
                arrays.append(_coerce(name, node, value, self.flexible_shapes))
        for check in self.checks:
            value = arrays[self.graph.inputs.index(check.input)]
            if hasattr(value, "__cuda_array_interface__"):  # a device array: its host copy (lengths are small)
                value = value.copy_to_host() if hasattr(value, "copy_to_host") else None
            if value is not None:
                check.run(np.asarray(value))
        return arrays

    def __call__(self, **feeds: Any) -> Any:
        outs = self._run(self.check_feeds(feeds))
        return outs[0] if self.single else list(outs)

    def __repr__(self) -> str:
        return f"<Compiled {self.backend}: ({', '.join(self.input_names)}) -> {len(self.graph.outputs)} outputs>"


class PolymorphicCompiled:
    """A compiled shape-polymorphic graph (inputs with named sizes, `ur.input("x", ("T", "B", 8))`).

    A call reads the sizes off the fed arrays (`ir.specialize.bind_sizes`: arrays that disagree about
    a size are a SizeMismatchError naming both inputs), specialises the graph to them once per set of
    sizes and runs that. The Numba backend's generated source takes sizes at run time, so the
    specialisations share one compiled module: a new T or batch size costs the passes and code
    generation (milliseconds), not a Numba compile (`numba_compiles` stays put; tests check it).
    Sizes 0 and 1 stay literal in generated code, so a batch of 1 is a module of its own."""

    def __init__(self, graph: Graph, single: bool, build: Callable[..., "Compiled"], replays: bool = False
                 ) -> None:
        self.graph = graph
        self.single = single
        self._build = build
        self._replays = replays
        self.template: Compiled | None = None
        self.specializations: dict[tuple[tuple[str, int], ...], Compiled] = {}
        self.last: Compiled | None = None

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def backend(self) -> str | None:
        return self.last.backend if self.last is not None else None

    @property
    def source(self) -> str | None:
        return self.last.source if self.last is not None else None

    @property
    def impl(self) -> Any:
        return self.last.impl if self.last is not None else None

    def for_sizes(self, **sizes: int) -> "Compiled":
        """The concrete compiled graph for these sizes (built on first use). On a backend that can
        replay (`respecialize`), the graph is first compiled once at canonical sizes (distinct
        primes: no two sizes coincide, so no size names merge) and every set of sizes replays that
        generation, sharing its compiled code; sizes that cannot (a size of 1, written as a literal)
        compile on their own, once."""
        key = tuple(sorted((k, int(v)) for k, v in sizes.items()))
        compiled = self.specializations.get(key)
        if compiled is None:
            if self._replays and self.template is None:
                self.template = self._build(specialize(self.graph, canonical_sizes(self.graph)))
            templates = ([self.template] if self.template is not None else []) + list(self.specializations.values())
            compiled = self.specializations[key] = self._build(specialize(self.graph, dict(key)), templates)
        self.last = compiled
        return compiled

    def __call__(self, **feeds: Any) -> Any:
        names = self.input_names
        missing = [n for n in names if n not in feeds]
        if missing:
            raise FeedError(f"compiled graph: missing {', '.join(map(repr, missing))}; expected inputs: "
                            f"{', '.join(names)}")
        sizes = bind_sizes(self.graph, feed_shapes([feeds[n] for n in names]))
        return self.for_sizes(**sizes)(**feeds)

    def __repr__(self) -> str:
        return (f"<PolymorphicCompiled ({', '.join(f'{n}: {t.type}' for n, t in zip(self.input_names, self.graph.inputs))})"
                f" -> {len(self.graph.outputs)} outputs, {len(self.specializations)} specialisations>")


class _FeedingConstants:
    """A backend's callable for a graph whose array constants were lifted to trailing inputs."""

    def __init__(self, run: Any, constants: list[np.ndarray]) -> None:
        self.run, self.constants = run, constants
        self.impl = getattr(run, "impl", run)

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.run(list(arrays) + self.constants)


def _check_device_array(name: str, node: Node, value: Any) -> Any:
    """A GPU array (numba, CuPy, PyTorch) fed to the cuda backend: exact dtype and shape, no copy."""
    iface = value.__cuda_array_interface__
    dtype, shape = np.dtype(iface["typestr"]), tuple(iface["shape"])
    if dtype != np.dtype(node.dtype) or shape != node.shape:
        raise FeedError(f"input {name!r}: expected a device array of {node.type}, found dtype {dtype} "
                        f"with shape {list(shape)} (device arrays are not converted)")
    return value


def _coerce(name: str, node: Node, value: Any, flexible: bool) -> np.ndarray:
    arr = np.asarray(value)
    want = node.dtype
    ok_kind = (want in FLOAT_DTYPES and arr.dtype.kind in "fiu") or \
              (want in INT_DTYPES and arr.dtype.kind in "iu") or (want == "bool" and arr.dtype.kind == "b")
    if not ok_kind:
        raise FeedError(f"input {name!r}: expected dtype {want} (shape {list(node.shape)}), "
                        f"found {arr.dtype} with shape {list(arr.shape)}")
    bad_shape = arr.ndim != node.ndim if flexible else arr.shape != node.shape
    if bad_shape:
        raise FeedError(f"input {name!r}: expected shape {list(node.shape)} ({node.type}), "
                        f"found {list(arr.shape)}")
    return np.asarray(arr, dtype=want, order="C")  # ascontiguousarray would make a 0-d feed 1-d


def pass_pipeline(backend: str, optimize: bool = True, passes: dict | None = None) -> tuple[Pass, ...]:
    """The passes `backend` runs on a graph: its declared `PASSES`, or `passes["passes"]` in their
    place, minus the names in `passes["disable"]`; none with `optimize=False`."""
    module = backend_module(backend)
    options = dict(passes or {})
    unknown = sorted(set(options) - {"passes", "disable"})
    if unknown:
        raise TypeError(f"compile: passes= takes the keys 'passes' and 'disable', found {unknown}")
    if not optimize:
        return ()
    chosen = tuple(options.get("passes") or module.PASSES)
    names = [p if isinstance(p, str) else p[0] if isinstance(p, tuple) else None for p in chosen]
    bad = [p for p in names if p is not None and p not in KNOWN_PASSES]
    disable = tuple(options.get("disable", ()))
    bad += [d for d in disable if d not in KNOWN_PASSES]
    if bad:
        raise ValueError(f"compile: unknown pass(es) {bad}; expected names from {', '.join(KNOWN_PASSES)}")
    off = set(disable) | {v for d in disable for v in _VARIANTS.get(d, ())}
    return tuple(p for p, name in zip(chosen, names) if name not in off)


def backend_module(backend: str) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


@functools.cache
def default_backend() -> str:
    """The backend `compile`, `fit` and `TrainStep` use when none is named: "numba" when Numba
    imports (the fastest on a CPU), else "numpy" (the reference interpreter). Decided once."""
    try:
        importlib.import_module("numba")
    except Exception:  # noqa: BLE001 - missing or broken: the reference still runs everything
        return "numpy"
    return "numba"


def compile(outputs: Node | Sequence[Node] | Graph, backend: str | None = None, optimize: bool = True,  # noqa: A001
            passes: dict | None = None, **options: Any) -> Compiled:
    """Compile a node, a list of nodes or a Graph. Called with arrays by input name, the result
    returns one array for a single node, else a list in output order.

    backend: "numba" (Numba CPU code), "numpy" (the reference interpreter: no compile time, the
    executable spec) or "cuda". Default None: `default_backend()`, i.e. "numba" when Numba imports,
    else "numpy"; pass backend="numpy" for the reference.

    The backend runs `pass_pipeline(backend, optimize, passes)` on the graph first: its own
    declared passes (`unroll.backends.<target>.PASSES`), `passes={"passes": [...]}` to replace
    them, `passes={"disable": ("hoist",)}` to drop some, `optimize=False` for none.

    A graph whose inputs have named sizes (`ur.input("x", ("T", "B", 8))`) compiles to a
    `PolymorphicCompiled`: it runs every size, reading the sizes off the feeds."""
    single = isinstance(outputs, Node)
    if isinstance(outputs, Graph):
        graph = outputs
    else:
        graph = Graph.of([outputs] if single else list(outputs))  # type: ignore[list-item]
    backend = backend or default_backend()
    if is_polymorphic(graph):   # symbolic sizes: one concrete graph per set of sizes, built on call
        replays = hasattr(backend_module(backend), "respecialize") and not options
        # one compiled step serves every size: no pass decision may depend on one size's numbers
        pipeline = tuple("hoist_any_size" if p == "hoist" else p for p in pass_pipeline(backend, optimize, passes))
        poly_passes = {"passes": list(pipeline)} if pipeline else None
        return PolymorphicCompiled(graph, single, lambda concrete, templates=(): _compile_concrete(
            concrete, single, backend, bool(pipeline), poly_passes, options, templates), replays)
    return _compile_concrete(graph, single, backend, optimize, passes, options)


def _compile_concrete(graph: Graph, single: bool, backend: str, optimize: bool, passes: dict | None,
                      options: dict, templates: Sequence["Compiled"] = ()) -> "Compiled":
    """compile() of a graph with concrete sizes. With `templates` (other specialisations of the same
    polymorphic graph, compiled before), a backend that can (`respecialize`) reuses their code."""
    checks = feed_checks(graph)  # from the graph as built: merging and passes may rebuild anchors
    # [loss, *grad(loss)] names the user's forward loop and the gradient's extended copy of it:
    # run the forward once (one graph walk when there is nothing to merge)
    merged = merge_loops(list(graph.outputs))
    if any(a is not b for a, b in zip(merged, graph.outputs)):
        graph = Graph(graph.inputs, tuple(merged), graph.output_names)
    module = backend_module(backend)
    # code generators keep scalar constants only: numpy-array operands become inputs fed here
    lifted, constants = (graph, []) if backend == "numpy" else lift_array_constants(graph)
    pipeline = pass_pipeline(backend, optimize, passes)
    compiled = None
    if hasattr(module, "respecialize") and not options:
        seen = set()
        for template in templates:   # each distinct module once (a batch of 1 has its own)
            if id(template.impl.dispatcher) not in seen:
                seen.add(id(template.impl.dispatcher))
                compiled = module.respecialize(template.impl, lifted, pipeline)
                if compiled is not None:
                    break
    if compiled is None:
        compiled = module.compile_graph(lifted, passes=pipeline, **options)
    if constants:
        compiled = _FeedingConstants(compiled, constants)
    return Compiled(graph, backend, compiled, single, getattr(module, "FLEXIBLE_SHAPES", False),
                    impl=getattr(compiled, "impl", compiled), checks=checks)
