"""keep_8bit=auto: the layers whose 4-bit form costs the outputs most, per byte that 8 bits would add,
kept at 8 bits within a size budget.

Each candidate is quantized to 4 bits alone (round to nearest, the rest float) and the model run on the
first calibration samples; its cost is how far the worst output's cosine falls. Layers are then taken
by cost per extra byte (a small table that every token reads first) until the extra bytes would pass
``BUDGET`` of the 4-bit weights' bytes. The trials use round to nearest whatever ``algo`` is, to stay quick.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt import compare
from onnxopt.passes._calibrate import first_batch
from onnxopt.passes.quant.search import EVAL_ROWS, worst_cosine
from onnxopt.passes.wquant.algos import block_8bit

BUDGET = 0.015  # extra bytes for 8-bit layers, as a fraction of the 4-bit weights' bytes (MiniLM: 14.75 -> 14.96 MB)
SCALE_BYTES = 4  # float32


def auto_8bit(model: ir.Model, targets: list[ir.Node], options, quantize_one) -> set[ir.Node]:
    """The ``targets`` to keep at 8 bits. ``quantize_one(node)`` makes one node 4-bit by round to
    nearest; ``options`` (the WeightQuantize pass) gives calib, block and symmetric."""
    feeds = first_batch(model, options.calib, EVAL_ROWS)
    reference = compare.run_ir(model, feeds)
    costs = {}
    order = _nodes(model)
    for node in targets:
        trial = model.clone()
        quantize_one(_nodes(trial)[order.index(node)])
        trial.opset_imports.setdefault("com.microsoft", 1)
        costs[node] = 1.0 - worst_cosine(reference, trial, feeds)
    bytes4 = {n: _bytes_4bit(n, options) for n in targets}
    extra = {n: _bytes_8bit(n) - bytes4[n] for n in targets}
    budget = BUDGET * sum(bytes4.values())
    kept, spent = set(), 0.0
    for node in sorted(targets, key=lambda n: -costs[n] / extra[n]):
        if costs[node] > 0 and spent + extra[node] <= budget:
            kept.add(node)
            spent += extra[node]
    return kept


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


def _nodes(model: ir.Model) -> list[ir.Node]:
    """Every node, subgraphs included, in an order a clone repeats."""
    return [n for g in model.graphs() for n in g]
