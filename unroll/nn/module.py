"""The Module base class: named parameters with values, nested modules, PyTorch-style state_dict.

A module owns parameter *values* (numpy arrays, drawn once from its seeded generator) and builds the
symbolic PARAM nodes on demand, named by their full dotted name (`rnn.weight_ih_l0`). A PARAM node
is identified by its name (nodes are interned), so calling a module twice reuses its nodes (weights
are shared), and the names of `parameters()` are exactly the keys of `state_dict()`, which is what
lets a compiled graph be called as `compiled(**model.state_dict(), x=...)`.

Names follow PyTorch: a module's own parameters in registration order, then each child's under
`<attribute>.`. A module built with `name="enc"` puts `enc.` in front of all its names; assigning a
module as an attribute of another gives it the attribute's path instead (like torch, the parent
decides). Assign submodules before calling them: a module refuses to be renamed once its nodes exist.

Parameter identity: a parameter belongs to the module that declared it, and two modules never share
one unless the same module (or the same PARAM node) is used twice. Since nodes are identified by
name, this is a guarantee about names, kept by *claiming* them:

  - The first time any module of a tree (a top-level module and its descendants) builds a PARAM node,
    the whole tree claims its full names at once. A name stays claimed while its module is alive.
  - If a name is claimed by another live module, the tree's top-level module takes the next free
    prefix before anything is built: an unnamed one `""` (torch's bare names, so one lone LSTM keeps
    `weight_ih_l0`), then its lower-cased class name (`gru.`, `decoderrnn.`), then `gru_1.`, ...;
    one built with `name="enc"` takes `enc.`, then `enc_1.`, ... So PyTorch's seq2seq tutorial, an
    `EncoderRNN` and a `DecoderRNN` that both have `self.embedding` and `self.gru`, gets
    `embedding.weight`, `gru.weight_ih_l0`, ... for the encoder built first and
    `decoderrnn.embedding.weight`, ... for the decoder: two sets of weights, no warning.
  - A clash that renaming cannot resolve (a module added to a tree whose names were already built)
    raises `NameClashError`; nothing is ever shared silently.

`state_dict()` keys are the (claimed) full names, so `run(**lstm.state_dict())` feeds a module
whatever its names; `load_state_dict` also accepts names relative to the module, which is what a
torch module of the same structure gives (`decoder.load_state_dict(torch_decoder.state_dict())`).
`ur.nn.state(encoder, decoder)` merges several modules' values into one feed dict (and claims their
names first). Before anything is built a module reports its natural names; read them after building
(or call `parameters()` first) when they must be final.

Training code updates values through the same dict interface (a subset is fine with strict=False):

    step = ur.compile([loss, *ur.grad(loss, model.parameters())])
    loss_v, *grads = step(x=xv, y=yv, **model.state_dict())
    model.load_state_dict({k: v - lr * g for (k, v), g in zip(model.state_dict().items(), grads)})

Modules have torch's `training` flag (`train()`, `eval()`; True at construction). It changes what
`forward` builds, never a compiled graph: build the graph again after switching. In training mode
dropout (`ur.nn.Dropout`, the `dropout=` of RNN/LSTM/GRU between layers) multiplies by a mask that
is an explicit graph input (`input "dropout_mask"`, values 0 or 1/(1-p)); `ur.nn.dropout_feeds(graph,
seed)` draws every mask of a graph from one seeded generator, so a seed decides the masks and the
same seed gives the same masks.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..ir.dims import evaluate
from .. import dsl
from ..ir.node import Graph, Node, user_location
from ..ir.ops import DTYPE_SHORT, Op, ShapeError, normalize_dtype


class StateDictError(ValueError):
    """`load_state_dict` got names or shapes that do not match the module's parameters."""


class NameClashError(ValueError):
    """A module's parameter name is claimed by another live module and cannot be changed."""


# full parameter name -> the live module whose parameter it is (see "Parameter identity" above)
_CLAIMS: "weakref.WeakValueDictionary[str, Module]" = weakref.WeakValueDictionary()
# dropout mask INPUT node -> its drop probability; mask input name -> the live module that made it
_MASKS: "weakref.WeakKeyDictionary[Node, float]" = weakref.WeakKeyDictionary()
_MASK_OWNERS: "weakref.WeakValueDictionary[str, Module]" = weakref.WeakValueDictionary()


def _dtype_name(dtype: object) -> str:
    text = str(dtype)
    return normalize_dtype(text[len("torch."):] if text.startswith("torch.") else dtype)


class Module:
    """Base class of every model. Subclasses call `super().__init__(name, dtype, seed)`, declare
    parameters with `add_param` and submodules by attribute assignment (or `register_module`), and
    implement `forward`. Parameters are read as attributes: `self.weight` is the PARAM node."""

    def __init__(self, name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        object.__setattr__(self, "_params", {})        # local name -> (shape, init spec)
        object.__setattr__(self, "_values", {})        # local name -> np.ndarray
        object.__setattr__(self, "_modules", {})       # attribute name -> Module
        object.__setattr__(self, "_name", name or None)  # the name= given (a top-level prefix)
        object.__setattr__(self, "_prefix", f"{name}." if name else "")
        object.__setattr__(self, "_parent", None)      # weakref to the module that registered this
        object.__setattr__(self, "_claimed", set())    # local names whose full names are claimed
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_masks_made", 0)     # dropout mask inputs built (their names)
        object.__setattr__(self, "dtype", _dtype_name(dtype))
        object.__setattr__(self, "_rng", np.random.default_rng(seed))

    # ---- declaring -----------------------------------------------------------------------------

    def add_param(self, name: str, shape: tuple[int, ...], init: str) -> None:
        """Declare a parameter and draw its value now. `init` is an ur.param spec: "zeros", "ones",
        "uniform:a" (U(-a, a)) or "normal:std"; the module's generator draws in declaration order."""
        shape = tuple(int(d) for d in shape)
        kind, _, value = init.partition(":")
        if kind == "zeros":
            arr = np.zeros(shape)
        elif kind == "ones":
            arr = np.ones(shape)
        elif kind == "uniform":
            arr = self._rng.uniform(-float(value), float(value), shape)
        elif kind == "normal":
            arr = self._rng.normal(0.0, float(value), shape)
        else:
            raise ValueError(f"add_param {name!r}: unknown init {init!r}; expected zeros, ones, "
                             f"uniform:a or normal:std")
        self._params[name] = (shape, init)
        self._values[name] = arr.astype(self.dtype)

    def register_module(self, name: str, module: "Module") -> None:
        """Make `module` a child named `name` (what attribute assignment does)."""
        if not isinstance(module, Module):
            raise TypeError(f"register_module {name!r}: expected a Module, found {type(module).__name__}")
        node: Module | None = self
        while node is not None:
            if node is module:
                raise ValueError(f"register_module {name!r}: {module._describe()} cannot be its own "
                                 f"descendant\n  at {user_location()}")
            node = node._parent_module()
        if module._parent_module() is not None and module._root() is self._root():
            self._modules[name] = module  # shared within one model: keeps its first name, as torch
            object.__setattr__(self, name, module)  # lists it once, under its first path
            return
        module._rename(self._prefix + name + ".")
        object.__setattr__(module, "_parent", weakref.ref(self))
        self._modules[name] = module
        object.__setattr__(self, name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_modules" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning "
                                 f"attributes\n  at {user_location()}")
        if isinstance(value, Module):
            self.register_module(name, value)
        else:
            self._modules.pop(name, None)  # e.g. `self.downsample = None` replaces a child
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        params = self.__dict__.get("_params", {})
        if name in params:
            return self.param_node(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or parameter {name!r}")

    def child_seed(self) -> int:
        """A seed for a child module, drawn from this module's generator (distinct, reproducible)."""
        return int(self._rng.integers(2**31 - 1))

    def _parent_module(self) -> "Module | None":
        return self._parent() if self._parent is not None else None

    def _root(self) -> "Module":
        module, seen = self, {id(self)}
        while (parent := module._parent_module()) is not None and id(parent) not in seen:
            seen.add(id(parent))
            module = parent
        return module

    def _rename(self, prefix: str) -> None:
        """Give this module and its descendants a new name prefix (parents decide names)."""
        renames: list[tuple[Module, str]] = []
        stack: list[tuple[Module, str]] = [(self, prefix)]
        seen: set[int] = set()
        while stack:
            module, pre = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            renames.append((module, pre))  # depth-first in registration order: a shared module
            stack.extend(reversed([(child, pre + key + ".")  # keeps its first path, as torch lists it
                                   for key, child in module._modules.items()]))
        for module, pre in renames:  # check all first: no half-renamed tree
            if module._prefix != pre and module._claimed:
                first = module._prefix + next(iter(module._params))
                raise ValueError(f"{module._describe()}: its parameter nodes already exist (named like "
                                 f"{first!r}), so it cannot take the names {pre + '*'!r}; assign it to "
                                 f"its parent before calling it\n  at {user_location()}")
        for module, pre in renames:
            object.__setattr__(module, "_prefix", pre)

    # ---- names: claiming them for the whole tree -----------------------------------------------

    def _claim(self) -> None:
        """Claim the full names of every not yet claimed parameter of this module's tree, choosing
        the top-level module's prefix first when nothing of the tree is built (module docstring)."""
        root = self._root()
        modules = [m for _, m in root.named_modules()]
        pending = [(m, k) for m in modules for k in m._params if k not in m._claimed]
        if not pending:
            return
        fixed = any(m._claimed for m in modules)
        if fixed:
            clashes = _clashes(pending)
            if clashes:
                gc.collect()  # a module kept alive only by a reference cycle must not hold names
                clashes = _clashes(pending)
            if clashes:
                (module, local), owner = clashes[0]
                raise NameClashError(
                    f"{module._describe()}: parameter {module._prefix + local!r} is already a parameter "
                    f"of {owner._describe()}, and the names of {root._describe()} are fixed since its "
                    f"parameters were built; add submodules before calling any part of the model, or "
                    f"give one of them another name\n  at {user_location()}")
        else:
            collected = False
            for prefix in root._candidate_prefixes():
                root._rename(prefix)
                if not _clashes(pending):
                    break
                if not collected:  # retry the natural names once without garbage modules
                    gc.collect()
                    collected = True
                    if not _clashes(pending):
                        break
        for m, k in pending:
            _CLAIMS[m._prefix + k] = m
            m._claimed.add(k)

    def _candidate_prefixes(self) -> Iterator[str]:
        """A top-level module's prefixes in order of preference (module docstring)."""
        base = self._name or type(self).__name__.lower()
        yield f"{self._name}." if self._name else ""
        if self._name is None:
            yield f"{base}."
        for i in range(1, 1 << 30):
            yield f"{base}_{i}."

    # ---- reading -------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The dotted prefix of this module's parameter names ("" for an unnamed top module)."""
        return self._prefix

    def param_node(self, name: str) -> Node:
        """The PARAM node of one of this module's own parameters (the same node on every call)."""
        shape, init = self._params[name]
        if name not in self._claimed:
            self._claim()
        return dsl.param(self._prefix + name, shape, init, self.dtype)

    def named_modules(self) -> Iterator[tuple[str, "Module"]]:
        """This module and its descendants with their attribute paths, in registration order; a
        module registered twice is listed once (its parameters are shared)."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [("", self)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield path, module
            stack.extend(reversed([(f"{path}.{k}" if path else k, m) for k, m in module._modules.items()]))

    def modules(self) -> list["Module"]:
        return [m for _, m in self.named_modules()]

    def children(self) -> list["Module"]:
        return list(self._modules.values())

    def named_parameters(self) -> list[tuple[str, Node]]:
        """(full name, PARAM node) in state_dict order (building them claims the names)."""
        nodes = [(m, k, m.param_node(k)) for _, m in self.named_modules() for k in m._params]
        return [(m._prefix + k, node) for m, k, node in nodes]

    def parameters(self) -> list[Node]:
        """The PARAM nodes in state_dict order; their names are the state_dict keys."""
        return [node for _, node in self.named_parameters()]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Full parameter name -> current value (the module's arrays, not copies, like torch)."""
        return {m._prefix + k: v for _, m in self.named_modules() for k, v in m._values.items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy values in, checking names and shapes. Keys are full names (as `state_dict()` gives)
        or names relative to this module (as a bare torch module's state_dict gives). Arrays are
        converted to the module's dtype. `strict=False` loads a subset and ignores unknown names."""
        own: dict[str, tuple[Module, str]] = {}
        for _, m in self.named_modules():
            for k in m._params:
                own[m._prefix + k] = (m, k)
        aliases = self._shared_aliases(own)  # torch's state_dict lists a shared module per path
        resolved: dict[str, Any] = {}
        by_alias: set[str] = set()  # full names reached through another path of a shared module
        unexpected = []
        for key, value in state.items():
            path = key if key in own else self._prefix + key
            full = aliases.get(path, path)
            if full not in own:
                unexpected.append(key)
            elif full in resolved:
                if path == full and full not in by_alias:
                    raise StateDictError(f"{self._describe()}.load_state_dict: {full!r} given twice "
                                         f"(with and without the prefix {self._prefix!r})")
                if not np.array_equal(np.asarray(_numpy(resolved[full])), np.asarray(_numpy(value))):
                    raise StateDictError(f"{self._describe()}.load_state_dict: {key!r} names the shared "
                                         f"parameter {full!r} again, with a different value")
            else:
                resolved[full] = value
                if path != full:
                    by_alias.add(full)
        missing = [k for k in own if k not in resolved]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if unexpected:
                parts.append(f"unexpected {', '.join(map(repr, unexpected))}")
            raise StateDictError(f"{self._describe()}.load_state_dict: {'; '.join(parts)}; expected "
                                 f"names: {', '.join(own)}")
        converted = {}
        for full, value in resolved.items():
            module, local = own[full]
            arr = np.asarray(_numpy(value))
            shape = module._params[local][0]
            if arr.shape != shape:
                raise StateDictError(f"{self._describe()}.load_state_dict: parameter {full!r} expected "
                                     f"shape {list(shape)}, found {list(arr.shape)}")
            if arr.dtype.kind not in "fiu":
                raise StateDictError(f"{self._describe()}.load_state_dict: parameter {full!r} expected "
                                     f"a {module.dtype} array, found dtype {arr.dtype}")
            converted[full] = (module, local, np.array(arr, dtype=module.dtype))
        for module, local, arr in converted.values():  # all checked first: no half-loaded module
            module._values[local] = arr

    def _shared_aliases(self, own: dict[str, tuple["Module", str]]) -> dict[str, str]:
        """Other paths to a module registered more than once -> the full names it has."""
        aliases: dict[str, str] = {}
        stack: list[tuple[str, Module]] = [(self._prefix, self)]
        seen_paths = 0
        while stack and seen_paths < 100_000:
            pre, module = stack.pop()
            seen_paths += 1
            for k in module._params:
                if pre + k not in own:
                    aliases[pre + k] = module._prefix + k
            stack.extend((pre + key + ".", child) for key, child in module._modules.items())
        return aliases

    # ---- modes ---------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Module":
        """Set the training flag of this module and its descendants (torch's train()); returns self.
        It decides what `forward` builds next (dropout masks or not), not existing graphs."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        """train(False): dropout becomes the identity in graphs built from now on."""
        return self.train(False)

    def dropout_mask(self, shape: Sequence[int], p: float, tag: str = "dropout_mask",
                     dtype: object = None) -> Node:
        """A fresh graph input holding a dropout mask of `shape` (values 0 or 1/(1-p), drawn by
        `ur.nn.dropout_feeds`), named after this module: `rnn.dropout_mask` for its first mask,
        then `rnn.dropout_mask_1`, ... (each call draws its own mask, as torch does)."""
        if self._params:
            self.parameters()  # claim the names first: the mask is named after them
        base = f"{self._prefix}{tag}"
        while True:
            count = self._masks_made
            object.__setattr__(self, "_masks_made", count + 1)
            name = f"{base}_{count}" if count else base
            owner = _MASK_OWNERS.get(name)
            if owner is None or owner is self:
                break
        _MASK_OWNERS[name] = self
        node = dsl.input(name, tuple(shape), self.dtype if dtype is None else dtype)
        _MASKS[node] = float(p)
        return node

    # ---- calling -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def _describe(self) -> str:
        """How error messages name this module: its class, arguments and name."""
        named = f" {self._prefix[:-1]!r}" if self._prefix else ""
        return f"{type(self).__name__}({self.extra_repr()}){named}"

    def extra_repr(self) -> str:
        return ""

    def check_input(self, x: Node, shape: tuple[int | None, ...], what: str = "input") -> None:
        """Raise a ShapeError naming this module if x's shape does not match `shape` (None: any
        size) or its dtype is not the module's. `shape` may also be a tuple of allowed shapes."""
        allowed = shape if shape and isinstance(shape[0], tuple) else (shape,)
        if not isinstance(x, Node):
            raise TypeError(f"{self._describe()}: expected a symbolic {what} (ur.input, ...), found "
                            f"{type(x).__name__}\n  at {user_location()}")
        found = x.tensor_type
        ok = any(len(s) == found.ndim and all(e is None or e == d for e, d in zip(s, found.shape))
                 for s in allowed) and found.dtype == self.dtype
        if not ok:
            expected = " or ".join(_pattern(s, self.dtype) for s in allowed)
            raise ShapeError(f"{self._describe()}: {what} expected shape {expected}, found {found}"
                             f"\n  at {user_location()}")

    def __repr__(self) -> str:
        head, extra = type(self).__name__, self.extra_repr()
        children = [f"  ({k}): " + repr(m).replace("\n", "\n  ") for k, m in self._modules.items()]
        if not children:
            return f"{head}({extra})"
        return "\n".join([f"{head}({extra}," if extra else f"{head}(", *children, ")"])


def _numpy(value: Any) -> Any:
    """A torch tensor's values as numpy (anything else unchanged)."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _clashes(pending: list[tuple[Module, str]]) -> list[tuple[tuple[Module, str], Module]]:
    """The (module, local name) pairs whose full name another live module has claimed."""
    out = []
    for m, k in pending:
        owner = _CLAIMS.get(m._prefix + k)
        if owner is not None and owner is not m:
            out.append(((m, k), owner))
    return out


def _pattern(shape: tuple[int | None, ...], dtype: str) -> str:
    dims = ",".join("*" if d is None else str(d) for d in shape)
    return f"{DTYPE_SHORT[dtype]}[{dims}]"


# ---- several modules ---------------------------------------------------------------------------

def state(*modules: Module) -> dict[str, np.ndarray]:
    """The values of several modules as one feed dict: `run(x=xv, **ur.nn.state(encoder, decoder))`.
    Claims each module's names first (so the keys are the graph's names); a module given twice (or a
    module and its child) is fine, two different values under one name are an error."""
    out: dict[str, np.ndarray] = {}
    for module in modules:
        if not isinstance(module, Module):
            raise TypeError(f"ur.nn.state: expected modules, found {type(module).__name__}")
        module.parameters()
        for key, value in module.state_dict().items():
            if key in out and out[key] is not value:
                raise NameClashError(f"ur.nn.state: two different values are named {key!r}")
            out[key] = value
    return out


def dropout_feeds(outputs: Node | Sequence[Node] | Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Values for every dropout mask input of a graph (built in training mode), drawn from one
    `np.random.default_rng(seed)` in the graph's input order: mask = (u >= p) / (1 - p) with u
    uniform in [0, 1), 0 where p = 1 (torch's F.dropout, inverted scaling). The same graph and seed
    give the same masks; feed a new seed per training step, as torch draws new masks per call
    (`ur.TrainStep` and `ur.fit` do that themselves for masks the batch does not hold)."""
    return draw_masks(dropout_inputs(outputs), np.random.default_rng(seed))


def draw_masks(masks: Sequence[Node], rng: np.random.Generator, sizes: dict[str, int] | None = None
               ) -> dict[str, np.ndarray]:
    """Fresh values for these mask inputs from `rng`; `sizes` gives named sizes their values (a
    shape-polymorphic graph's masks are (T, B, H))."""
    feeds: dict[str, np.ndarray] = {}
    for node in masks:
        p = _MASKS[node]
        keep = rng.random(evaluate(node.shape, sizes or {})) >= p
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        feeds[node.name] = (keep * scale).astype(node.dtype)  # type: ignore[index]
    return feeds


def dropout_inputs(outputs: Node | Sequence[Node] | Graph) -> list[Node]:
    """The dropout mask inputs of a graph, in input order."""
    graph = outputs if isinstance(outputs, Graph) else dsl.graph(outputs)
    return [n for n in graph.inputs if n.op is Op.INPUT and n in _MASKS]


class Sequential(Module):
    """Children named "0", "1", ... called in order (torch.nn.Sequential's names)."""

    def __init__(self, *modules: Module, name: str | None = None) -> None:
        dtypes = {m.dtype for m in modules}
        super().__init__(name, dtypes.pop() if len(dtypes) == 1 else "float32")
        for i, m in enumerate(modules):
            self.register_module(str(i), m)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x
