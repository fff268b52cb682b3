"""keep_8bit=auto: the layers whose 4-bit form costs the outputs most, per byte that 8 bits would add,
kept at 8 bits within a size budget.

A layer's cost is its relative output error at 4 bits (round to nearest) on the calibration data,
estimated from the statistics the pass collects anyway in its one run over that data: for a MatMul
with inputs X and weight error E, ||X E||^2 / ||X W||^2 = tr(E^T H E) / tr(W^T H W) with H = X^T X.
A table (or a MatMul without statistics, inside a subgraph) has no input to weigh by: its relative
weight error. Layers are then taken by cost per extra byte until the extra bytes would pass ``BUDGET``
of the 4-bit weights' bytes. Measuring instead each layer's effect on the outputs (each made 4-bit
alone, the whole model run) cost O(layers x model): 28 minutes for SmolLM2-135M's 211 layers on 16
windows; the estimate costs one run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import constant
from onnxopt.passes.wquant.algos import block_8bit, rtn

BUDGET = 0.015  # extra bytes for 8-bit layers, as a fraction of the 4-bit weights' bytes (MiniLM: 14.75 -> 14.96 MB)
SCALE_BYTES = 4  # float32


def auto_8bit(
    targets: list[ir.Node], options, hessians: dict[str, np.ndarray], exact: set[ir.Node]
) -> set[ir.Node]:
    """The ``targets`` to keep at 8 bits. ``options`` (the WeightQuantize pass) gives block and
    symmetric; ``hessians`` X^T X by MatMul input name; ``exact`` the targets 4 bits hold exactly
    (see grid.py): they cost nothing."""
    costs = {
        n: 0.0 if n in exact else relative_error(n, options, hessians.get(n.inputs[0].name))
        for n in targets
    }
    bytes4 = {n: _bytes_4bit(n, options) for n in targets}
    extra = {n: _bytes_8bit(n) - bytes4[n] for n in targets}
    budget = BUDGET * sum(bytes4.values())
    kept, spent = set(), 0.0
    for node in sorted(targets, key=lambda n: -costs[n] / extra[n]):
        if costs[node] > 0 and spent + extra[node] <= budget:
            kept.add(node)
            spent += extra[node]
    return kept


def relative_error(node: ir.Node, options, hessian: np.ndarray | None) -> float:
    """The node's relative output error at 4 bits: weighed by ``hessian`` (X^T X) when given."""
    w = constant(weight_of(node))
    w = w.T if node.op_type == "Gather" else w.reshape(w.shape[-2:])
    error = rtn(w, options.block, options.symmetric).dequantize() - w
    if hessian is None or node.op_type == "Gather":
        return float(
            np.sum(np.square(error, dtype=np.float64))
            / max(np.sum(np.square(w, dtype=np.float64)), 1e-30)
        )
    h = hessian.astype(np.float64)
    return float(np.sum((h @ error) * error) / max(np.sum((h @ w) * w), 1e-30))


def _bytes_4bit(node: ir.Node, options) -> float:
    """Bytes of the node's weight [K, N] as 4-bit blocks along K (a table [V, D]: along D), with their
    scales and zero points."""
    shape = tuple(weight_of(node).const_value.shape)
    k, n = shape[::-1] if node.op_type == "Gather" else shape[-2:]
    return _blocked_bytes(k, n, options.block, 4, zero_points=not options.symmetric)


def _bytes_8bit(node: ir.Node) -> float:
    """Bytes of the node's weight as keep_8bit stores it."""
    shape = tuple(weight_of(node).const_value.shape)
    if node.op_type == "Gather":  # int8 table, one scale per column
        return shape[0] * shape[1] + shape[1] * SCALE_BYTES
    k, n = shape[-2:]
    return _blocked_bytes(k, n, block_8bit(k), 8, zero_points=False)


def _blocked_bytes(k: int, n: int, block: int, bits: int, zero_points: bool) -> float:
    blocks = -(-k // block) * n
    return blocks * (block * bits / 8 + SCALE_BYTES + (bits / 8 if zero_points else 0))


def weight_of(node: ir.Node) -> ir.Value:
    """The constant a MatMul (B) or an embedding Gather (the table) reads."""
    return node.inputs[1] if node.op_type == "MatMul" else node.inputs[0]
