"""The graph IR: nodes, ops, builders, the verifier, the textual form and the passes."""

from .node import Graph, LoopInfo, Node, proj, rewrite, substitute, toposort
from .ops import Op, ShapeError, TensorType

__all__ = ["Graph", "LoopInfo", "Node", "Op", "ShapeError", "TensorType", "proj", "rewrite",
           "substitute", "toposort"]
