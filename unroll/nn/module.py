"""The Module base class: named parameters with values, nested modules, PyTorch-style state_dict.

A module owns parameter *values* (numpy arrays, drawn once from its seeded generator) and builds the
symbolic PARAM nodes on demand, named by their full dotted name (`rnn.weight_ih_l0`). Nodes are
interned, so building a parameter again (calling a module twice) returns the same node: weights are
shared, and the names of `parameters()` are exactly the keys of `state_dict()`, which is what lets a
compiled graph be called as `compiled(**model.state_dict(), x=...)`.

Names follow PyTorch: a module's own parameters in registration order, then each child's under
`<attribute>.`. A module built with `name="enc"` puts `enc.` in front of all its names; assigning a
module as an attribute of another gives it the attribute's path instead (like torch, the parent
decides). Assign submodules before calling them: a module refuses to be renamed once its nodes exist.

Training code updates values through the same dict interface (a subset is fine with strict=False):

    step = ur.compile([loss, *ur.grad(loss, model.parameters())])
    loss_v, *grads = step(x=xv, y=yv, **model.state_dict())
    model.load_state_dict({k: v - lr * g for (k, v), g in zip(model.state_dict().items(), grads)})

Two *unnamed* top-level modules of the same kind and shape produce the same names, hence the same
parameter nodes: give them `name=`s or make them attributes of one parent Module. Because that
sharing is almost always a mistake, building a parameter node whose name another live module already
uses raises a `SharedNameWarning`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterator, Mapping

import numpy as np

from .. import dsl
from ..ir.node import Node, user_location
from ..ir.ops import DTYPE_SHORT, ShapeError, normalize_dtype


class StateDictError(ValueError):
    """`load_state_dict` got names or shapes that do not match the module's parameters."""


class SharedNameWarning(UserWarning):
    """Two different live modules build parameters with the same name, so they share weights."""


# full parameter name -> the live module that first built a node with it
_OWNERS: "weakref.WeakValueDictionary[str, Module]" = weakref.WeakValueDictionary()


class Module:
    """Base class of every model. Subclasses call `super().__init__(name, dtype, seed)`, declare
    parameters with `add_param` and submodules by attribute assignment (or `register_module`), and
    implement `forward`. Parameters are read as attributes: `self.weight` is the PARAM node."""

    def __init__(self, name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        object.__setattr__(self, "_params", {})        # local name -> (shape, init spec)
        object.__setattr__(self, "_values", {})        # local name -> np.ndarray
        object.__setattr__(self, "_modules", {})       # attribute name -> Module
        object.__setattr__(self, "_prefix", f"{name}." if name else "")
        object.__setattr__(self, "_built", False)      # True once a PARAM node was handed out
        object.__setattr__(self, "dtype", normalize_dtype(dtype))
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
        module._rename(self._prefix + name + ".")
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

    def _rename(self, prefix: str) -> None:
        """Give this module and its descendants a new name prefix (parents decide names)."""
        renames: list[tuple[Module, str]] = []
        stack: list[tuple[Module, str]] = [(self, prefix)]
        while stack:
            module, pre = stack.pop()
            renames.append((module, pre))
            stack.extend((child, pre + key + ".") for key, child in module._modules.items())
        for module, pre in renames:  # check all first: no half-renamed tree
            if module._prefix != pre and module._built and module._params:
                first = module._prefix + next(iter(module._params))
                raise ValueError(f"{module._describe()}: its parameter nodes already exist (named like "
                                 f"{first!r}), so it cannot take the names {pre + '*'!r}; assign it to "
                                 f"its parent before calling it\n  at {user_location()}")
        for module, pre in renames:
            object.__setattr__(module, "_prefix", pre)

    # ---- reading -------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The dotted prefix of this module's parameter names ("" for an unnamed top module)."""
        return self._prefix

    def param_node(self, name: str) -> Node:
        """The PARAM node of one of this module's own parameters (the same node on every call)."""
        shape, init = self._params[name]
        object.__setattr__(self, "_built", True)
        full = self._prefix + name
        owner = _OWNERS.setdefault(full, self)
        if owner is not self:
            warnings.warn(f"{self._describe()} and {owner._describe()} both name a parameter {full!r}, "
                          f"so they share it; give the modules distinct name= values or make them "
                          f"attributes of one parent Module (at {user_location()})",
                          SharedNameWarning, stacklevel=2)
        return dsl.param(full, shape, init, self.dtype)

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

    def children(self) -> list["Module"]:
        return list(self._modules.values())

    def named_parameters(self) -> list[tuple[str, Node]]:
        """(full name, PARAM node) in state_dict order."""
        return [(m._prefix + k, m.param_node(k)) for _, m in self.named_modules() for k in m._params]

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
        resolved: dict[str, Any] = {}
        unexpected = []
        for key, value in state.items():
            full = key if key in own else self._prefix + key
            if full not in own:
                unexpected.append(key)
            elif full in resolved:
                raise StateDictError(f"{self._describe()}.load_state_dict: {full!r} given twice "
                                     f"(with and without the prefix {self._prefix!r})")
            else:
                resolved[full] = value
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
            arr = np.asarray(value)
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


def _pattern(shape: tuple[int | None, ...], dtype: str) -> str:
    dims = ",".join("*" if d is None else str(d) for d in shape)
    return f"{DTYPE_SHORT[dtype]}[{dims}]"


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
