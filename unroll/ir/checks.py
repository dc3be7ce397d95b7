"""Run-time conditions on fed values that a static type cannot state (a sequence length within
1..T), checked on the host by the compiled callable (`unroll.compile.Compiled`) before any backend
runs: the numpy, Numba and CUDA backends raise the same `FeedValueError`, which names the input, the
condition, the offending value and its index, and the user's line that built the check.

Why a side table and not an op: a check in the graph would have to raise from generated code on
every target (an emitter per target, as onehot's out-of-range IndexError has), while a fed value is
on the host before any launch, so one host check serves every target. It follows that only graph
inputs are checked; a condition on a computed value (lengths summed from a mask) is not.

A check is attached to an *anchor*: a node built from the input for the use the condition protects,
whose identity determines the condition (for lengths, the time mask over T steps). Nodes are
interned and one input node is shared by every graph that names it, so a check on the input itself
would carry one model's T into another graph; a graph gets the checks of the anchors it contains.
Like a node's source line, checks are side data: `ur.parse(ur.print_graph(g))`, and passes that
rebuild an anchor, drop them (`ur.compile` collects them from the graph it is given, before its
passes run).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .node import Graph, Node, all_nodes
from .ops import Op


class FeedError(ValueError):
    """The arrays passed to a compiled graph do not match its inputs."""


class FeedValueError(FeedError, RuntimeError):
    """A fed value breaks a run-time condition of the graph (a sequence length outside 1..T). torch
    raises RuntimeError for the same values (pack_padded_sequence), so this is one too."""


class Condition(Protocol):
    """What a fed value must satisfy. Implementations are frozen dataclasses: equal conditions
    attached twice (the same model called twice) are kept once."""

    def problem(self, value: np.ndarray) -> str | None:
        """What is wrong with `value` (naming the offending element and its index), or None."""
        ...


@dataclass(frozen=True)
class FeedCheck:
    """`condition` on the value fed to `input`; `where` is the user's line that built the anchor."""

    input: Node
    condition: Condition
    where: str

    def run(self, value: np.ndarray) -> None:
        problem = self.condition.problem(value)
        if problem is not None:
            raise FeedValueError(f"input {self.input.name!r} ({self.input.type}): {problem}\n"
                                 f"  (the check was built at {self.where})")


_CHECKS: "weakref.WeakKeyDictionary[Node, tuple[FeedCheck, ...]]" = weakref.WeakKeyDictionary()


def attach(anchor: Node, value: Node, condition: Condition, where: str) -> bool:
    """Check `condition` on `value` whenever a compiled graph containing `anchor` is called.
    Only a graph input can be checked: for any other `value` nothing is attached (returns False)."""
    if value.op is not Op.INPUT:
        return False
    check = FeedCheck(value, condition, where)
    present = _CHECKS.get(anchor, ())
    if all((c.input, c.condition) != (check.input, check.condition) for c in present):
        _CHECKS[anchor] = present + (check,)
    return True


def checks_on(anchor: Node) -> tuple[FeedCheck, ...]:
    return _CHECKS.get(anchor, ())


def feed_checks(graph: Graph) -> list[FeedCheck]:
    """The checks of every anchor in `graph` (nested bodies included) whose input `graph` takes."""
    if not _CHECKS:
        return []
    inputs = set(graph.inputs)
    found: list[FeedCheck] = []
    for node, _ in all_nodes(graph):
        for check in _CHECKS.get(node, ()):
            if check.input in inputs and check not in found:
                found.append(check)
    return found


def first_index(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True element of `mask` (row-major), for messages."""
    return tuple(int(i) for i in np.argwhere(mask)[0])
