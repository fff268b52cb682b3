"""Model statistics: what a pass changed, measured the same way for every pass."""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir


def constant_tensors(model: ir.Model):
    """Tensors stored in the model: initializers and the values of Constant nodes."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
                yield node.attributes["value"].as_tensor()


def tensor_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in constant_tensors(model))


@dataclasses.dataclass(frozen=True)
class Stats:
    nodes: int
    initializers: int
    params: int
    tensor_bytes: int
    ops: dict[str, int]

    @classmethod
    def of(cls, model: ir.Model) -> Stats:
        ops = collections.Counter()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            ops[
                f"{node.domain}::{node.op_type}"
                if node.domain not in ("", "ai.onnx")
                else node.op_type
            ] += 1
        tensors = list(constant_tensors(model))
        return cls(
            nodes=sum(ops.values()),
            initializers=sum(len(g.initializers) for g in model.graphs()),
            params=sum(t.size for t in tensors),
            tensor_bytes=sum(t.nbytes for t in tensors),
            ops=dict(sorted(ops.items())),
        )

    def delta(self, later: Stats) -> dict[str, int]:
        return {
            k: getattr(later, k) - getattr(self, k)
            for k in ("nodes", "initializers", "params", "tensor_bytes")
        }
