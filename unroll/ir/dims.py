"""Symbolic sizes: named dimensions (`T`, `B`) and polynomials of them, for shape-polymorphic graphs.

`ur.input("x", ("T", "B", 8))` gives x the shape `(Dim T, Dim B, 8)`. Everything built from it carries
the symbols: `x.reshape(-1, 8)` has shape `(T*B, 8)`, a scan over x runs `T` steps, `ur.mean` divides
by `1/(T*B*8)` (a `SizeRatio` constant). When a compiled graph is called, the sizes are read off the
feeds (`bind`), the graph is specialised to them (`specialize`: every size and size-derived constant
evaluated) and run; the Numba backend's generated source does not depend on sizes, so every T and
batch size reuses one compiled module.

A `Dim` is a polynomial with integer coefficients over symbol names, each symbol a size >= 1 (as in
JAX's shape polymorphism). Arithmetic with ints and other Dims stays symbolic; a result that is a
constant comes back as a plain int. Equality is structural (T*B == B*T; T != 8); an order comparison
is answered where it holds for every size >= 1 (T - 1 >= 0, T + 1 > T) and is an error otherwise.
Anything that needs a concrete number -- `range(T)`, `int(T)`, an array of T elements, `T // 3` --
raises `SymbolicSizeError`, which names the size and says what to do: a size is never silently
replaced by some value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Mapping, Union

Monomial = tuple[tuple[str, int], ...]   # ((symbol, power), ...) sorted by symbol; () is the constant


class SymbolicSizeError(TypeError):
    """An operation needed the concrete value of a symbolic size."""


def _mono_mul(a: Monomial, b: Monomial) -> Monomial:
    powers = dict(a)
    for name, p in b:
        powers[name] = powers.get(name, 0) + p
    return tuple(sorted(powers.items()))


def _mono_str(m: Monomial) -> str:
    return "*".join(name if p == 1 else f"{name}^{p}" for name, p in m)


class Dim:
    """A symbolic size: sum of coeff * monomial. Build with `Dim.symbol(name)` and arithmetic."""

    __slots__ = ("terms", "_hash")

    def __init__(self, terms: Mapping[Monomial, int]) -> None:
        self.terms: tuple[tuple[Monomial, int], ...] = tuple(sorted((m, c) for m, c in terms.items() if c))
        self._hash = hash(self.terms)

    @staticmethod
    def symbol(name: str) -> "Dim":
        if not name.isidentifier():
            raise ValueError(f"a dimension name must be an identifier, found {name!r}")
        return Dim({((name, 1),): 1})

    @staticmethod
    def _make(terms: dict[Monomial, int]) -> "Size":
        terms = {m: c for m, c in terms.items() if c}
        if not terms:
            return 0
        if list(terms) == [()]:
            return terms[()]
        return Dim(terms)

    # ---- arithmetic ------------------------------------------------------------------------------

    @staticmethod
    def _terms(x: "Size") -> dict[Monomial, int]:
        if isinstance(x, Dim):
            return dict(x.terms)
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"a size combines with ints and sizes, found {x!r}")
        return {(): int(x)}

    def __add__(self, other: "Size") -> "Size":
        terms = self._terms(self)
        for m, c in self._terms(other).items():
            terms[m] = terms.get(m, 0) + c
        return Dim._make(terms)

    __radd__ = __add__

    def __neg__(self) -> "Size":
        return Dim._make({m: -c for m, c in self.terms})

    def __sub__(self, other: "Size") -> "Size":
        return self + (-other if isinstance(other, Dim) else -int(other))

    def __rsub__(self, other: "Size") -> "Size":
        return -self + other

    def __mul__(self, other: "Size") -> "Size":
        terms: dict[Monomial, int] = {}
        for ma, ca in self.terms:
            for mb, cb in self._terms(other).items():
                m = _mono_mul(ma, mb)
                terms[m] = terms.get(m, 0) + ca * cb
        return Dim._make(terms)

    __rmul__ = __mul__

    def __floordiv__(self, other: "Size") -> "Size":
        """Exact division only: by an int dividing every coefficient, or by a monomial or a Dim
        that divides every term (T*B // B == T); anything else has no symbolic result."""
        quotient = exact_quotient(self, other)
        if quotient is None:
            raise SymbolicSizeError(f"{self} // {other} is not a whole size for every value of "
                                    f"{', '.join(sorted(self.symbols))}; use sizes that divide exactly")
        return quotient

    def __rfloordiv__(self, other: "Size") -> "Size":
        if isinstance(other, int) and other == 0:
            return 0
        raise SymbolicSizeError(f"{other} // {self} depends on the value of {self}")

    def __mod__(self, other: "Size") -> "Size":
        if exact_quotient(self, other) is not None:
            return 0
        raise SymbolicSizeError(f"{self} % {other} depends on the value of {', '.join(sorted(self.symbols))}")

    def __truediv__(self, other: "Size") -> "SizeRatio":
        return SizeRatio(self, 1) / other

    def __rtruediv__(self, other: "Size | float") -> "SizeRatio":
        return SizeRatio(other, self)

    # ---- comparison -----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dim):
            return self.terms == other.terms
        return False   # a non-constant polynomial never equals a constant

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return self._hash

    def _at_least_zero(self, diff: "Size", text: str) -> bool:
        """Whether diff >= 0 for every assignment of sizes >= 1; an error where that depends on
        the sizes."""
        if not isinstance(diff, Dim):
            return diff >= 0
        if lower_bound(diff) >= 0:
            return True
        if lower_bound(-diff) > 0:   # type: ignore[arg-type]
            return False
        names = ", ".join(sorted(diff.symbols))
        raise SymbolicSizeError(f"{text} depends on the values of {names}: this operation cannot be built on "
                                f"a shape-polymorphic graph (give {names} a number)")

    def __ge__(self, other: "Size") -> bool:
        return self._at_least_zero(self - other, f"{self} >= {other}")

    def __gt__(self, other: "Size") -> bool:
        return self._at_least_zero(self - other - 1, f"{self} > {other}")

    def __le__(self, other: "Size") -> bool:
        return self._at_least_zero(other - self, f"{self} <= {other}")

    def __lt__(self, other: "Size") -> bool:
        return self._at_least_zero(other - self - 1, f"{self} < {other}")

    # ---- no concrete value -------------------------------------------------------------------------

    def _concrete(self, what: str) -> SymbolicSizeError:
        return SymbolicSizeError(
            f"{what} needs the concrete value of the symbolic size {self}; this operation cannot be "
            f"built on a shape-polymorphic graph (give {', '.join(sorted(self.symbols))} a number)")

    def __index__(self) -> int:
        raise self._concrete("an integer index or range")

    def __int__(self) -> int:
        raise self._concrete("int()")

    def __float__(self) -> float:
        raise self._concrete("float()")

    def __bool__(self) -> bool:
        if lower_bound(self) > 0 or lower_bound(-self) > 0:  # type: ignore[arg-type]
            return True
        raise self._concrete("a truth test")

    # ---- reading -----------------------------------------------------------------------------------

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(name for m, _ in self.terms for name, _ in m)

    def is_symbol(self) -> str | None:
        """The name when this is exactly one symbol (T), else None."""
        if len(self.terms) == 1 and self.terms[0][1] == 1 and len(self.terms[0][0]) == 1 \
                and self.terms[0][0][0][1] == 1:
            return self.terms[0][0][0][0]
        return None

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms, key=lambda t: (-len(t[0]), t[0])):
            if not m:
                parts.append(str(c))
            elif c == 1:
                parts.append(_mono_str(m))
            elif c == -1:
                parts.append("-" + _mono_str(m))
            else:
                parts.append(f"{c}*{_mono_str(m)}")
        return "+".join(parts).replace("+-", "-")

    def __repr__(self) -> str:
        return f"Dim({self})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


Size = Union[int, Dim]


def lower_bound(d: Dim) -> int:
    """A lower bound of d over sizes >= 1 where every non-constant coefficient is >= 0 (the value at
    all sizes 1), else a very negative number."""
    if any(c < 0 for m, c in d.terms if m):
        return -(2 ** 62)
    return sum(c for _, c in d.terms)


def exact_quotient(a: Size, b: Size) -> Size | None:
    """a // b where it divides exactly for every size, else None."""
    if isinstance(b, Dim):
        if isinstance(a, Dim) and a == b:
            return 1
        if len(b.terms) != 1:
            return None
        (mb, cb), = b.terms
        if not isinstance(a, Dim):
            return None
        terms: dict[Monomial, int] = {}
        for m, c in a.terms:
            powers = dict(m)
            for name, p in mb:
                if powers.get(name, 0) < p:
                    return None
                powers[name] -= p
            if c % cb:
                return None
            terms[tuple(sorted((n, p) for n, p in powers.items() if p))] = c // cb
        return Dim._make(terms)
    if isinstance(a, Dim):
        if b == 0 or any(c % b for _, c in a.terms):
            return None
        return Dim._make({m: c // b for m, c in a.terms})
    return a // b if b and a % b == 0 else None


@dataclass(frozen=True)
class SizeRatio:
    """num / den with num, den sizes (or num a float): a constant derived from sizes, such as the
    1/count of a mean. `evaluate` gives the float once the sizes are known."""

    num: Union[int, float, Dim]
    den: Size

    def __truediv__(self, other: Size) -> "SizeRatio":
        return SizeRatio(self.num, self.den * other)

    def __mul__(self, other: Union[int, float, Dim]) -> "SizeRatio":
        return SizeRatio(self.num * other, self.den)

    __rmul__ = __mul__

    def __float__(self) -> float:
        raise SymbolicSizeError(f"{self} needs the concrete sizes ({', '.join(sorted(symbols_of(self)))})")

    def __str__(self) -> str:
        num = f"({self.num})" if isinstance(self.num, Dim) and len(self.num.terms) > 1 else str(self.num)
        den = f"({self.den})" if isinstance(self.den, Dim) and (len(self.den.terms) > 1 or
                                                                  self.den.terms[0][1] != 1) else str(self.den)
        return f"{num}/{den}"


def is_symbolic(x: object) -> bool:
    """Whether x (a size, shape, arg, nested tuples) holds a symbolic size anywhere."""
    if isinstance(x, (Dim, SizeRatio)):
        return True
    if isinstance(x, (tuple, list)):
        return any(is_symbolic(v) for v in x)
    return False


def symbols_of(x: object) -> frozenset[str]:
    if isinstance(x, Dim):
        return x.symbols
    if isinstance(x, SizeRatio):
        return symbols_of(x.num) | symbols_of(x.den)
    if isinstance(x, (tuple, list)):
        return frozenset().union(*(symbols_of(v) for v in x)) if x else frozenset()
    return frozenset()


def evaluate(x: object, sizes: Mapping[str, int]) -> object:
    """x with every symbolic size replaced by its value (tuples and lists walked; others as is)."""
    if isinstance(x, Dim):
        total = 0
        for m, c in x.terms:
            total += c * math.prod(sizes[name] ** p for name, p in m)
        return total
    if isinstance(x, SizeRatio):
        num, den = evaluate(x.num, sizes), evaluate(x.den, sizes)
        return float(Fraction(num) / Fraction(den)) if isinstance(num, int) else num / den  # type: ignore[operator]
    if isinstance(x, tuple):
        return tuple(evaluate(v, sizes) for v in x)
    if isinstance(x, list):
        return [evaluate(v, sizes) for v in x]
    return x


def as_dim(x: object) -> Size:
    """A shape entry as given by the user: an int, or a name (a new symbol), or a Dim."""
    if isinstance(x, str):
        return Dim.symbol(x)
    if isinstance(x, Dim):
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        try:
            return int(x)  # numpy ints
        except (TypeError, ValueError):
            raise TypeError(f"a dimension is an int or a name, found {x!r}") from None
    return x


def unify(bindings: dict[str, int], dims: Iterable[tuple[Size, int]]) -> None:
    """Bind the bare symbols among (symbolic dim, actual size) pairs into `bindings`."""
    for d, actual in dims:
        if isinstance(d, Dim) and d.is_symbol() is not None:
            bindings.setdefault(d.is_symbol(), actual)  # type: ignore[arg-type]


__all__ = ["Dim", "Size", "SizeRatio", "SymbolicSizeError", "as_dim", "evaluate", "exact_quotient",
           "is_symbolic", "lower_bound", "symbols_of", "unify"]


# ---- helpers for builders and type rules ------------------------------------------------------------

def size(x: object) -> Size:
    """A dimension from an arg: a Dim stays symbolic, anything else becomes an int."""
    return x if isinstance(x, Dim) else int(x)  # type: ignore[call-overload]


def assume_le(a: Size, b: Size) -> bool:
    """a <= b where that is decided for every size; True where it depends on the sizes (the
    concrete graph built at run time checks it again, with the real sizes)."""
    try:
        return bool(a <= b)
    except SymbolicSizeError:
        return True


def slice_indices(start: object, stop: object, step: object, dim: Size) -> tuple[Size, Size, int]:
    """Python's slice(start, stop, step).indices(dim) for a positive step, with a symbolic dim or
    bounds: negative bounds count from the end; a bound is clamped into [0, dim] where that is
    decided for every size, else kept (and checked against the real size at run time)."""
    step_i = 1 if step is None else int(step)  # type: ignore[call-overload]
    if not is_symbolic((start, stop, dim)):
        return slice(start, stop, step_i).indices(dim)  # type: ignore[arg-type, return-value]
    if step_i <= 0:
        return 0, 0, step_i

    def bound(v: object, default: Size) -> Size:
        if v is None:
            return default
        v = size(v)
        if isinstance(v, int) and v < 0:
            v = dim + v
        if not assume_le(0, v):
            return 0
        return dim if not assume_le(v, dim) else v
    return bound(start, 0), bound(stop, dim), step_i


def slice_length(start: Size, stop: Size, step: int) -> Size:
    """len(range(start, stop, step)) for a positive step."""
    if not is_symbolic((start, stop)):
        return len(range(start, stop, step))  # type: ignore[arg-type]
    span = stop - start
    if step == 1:
        return span
    length = exact_quotient(span + (step - 1), step)
    if length is None:
        raise SymbolicSizeError(f"a slice of {span} elements with step {step} has no symbolic length; "
                                f"use a size that the step divides")
    return length
