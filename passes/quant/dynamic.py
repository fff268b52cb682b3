"""Dynamic int8: weights stored int8, activations quantized at run time.

MatMul and Gemm with a constant 2-D weight become DynamicQuantizeLinear → MatMulInteger → Cast →
Mul(activation scale × weight scales), the form onnxruntime fuses into DynamicQuantizeMatMul and
MatMulIntegerToFloat (uint8 activations with one scale per tensor, which is all those fused kernels
take). Input channels found to be outliers in calibration stay float beside the int8 product. Gather
on an embedding table keeps an int8 table and a DequantizeLinear per embedding dim after the lookup.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._calibrate import channel_max, outlier_channels
from onnxopt.passes._common import (
    add_initializer,
    constant,
    fresh_name,
    is_standard,
    rank,
    replace_value,
)
from onnxopt.passes.quant.ort_profile import scope
from onnxopt.passes.quant.qmath import quantize_symmetric

SOURCE_OP = "quant.source_op"  # meta key: the op a MatMulInteger replaced
# dynamic int8 leaves smaller tables float: they save nothing, and their lookups cost as much as a
# large table's (MiniLM-L6's 2-row token-type table: a 1.5 ms dequantization per [32, 64] batch)
MIN_TABLE_BYTES = 64 * 1024


def dynamic_quantizer(model: ir.Model, options):
    """``(quantize, scopes, timed)``: ``quantize(model, keep_float)`` rewrites the wanted MatMul/Gemm/Gather
    nodes of a float model, with outlier channels found here once; ``scopes`` are those it can quantize,
    ``timed`` those whose int8 is for speed (an int8 embedding table is for size: it stays whatever its
    DequantizeLinear costs). ``None`` when there are none."""
    wanted = set(options.op_types)
    nodes = [
        n for g in model.graphs() for n in g if is_standard(n, *wanted) and not options.excluded(n)
    ]
    if not nodes:
        return None
    outliers = find_outliers(model, nodes, options) if options.calib else {}

    def quantize(target: ir.Model, keep_float: set[str]) -> bool:
        modified = False
        for graph in list(target.graphs()):
            shared: dict[ir.Value, tuple] = {}
            for node in list(graph):
                if (
                    node.graph is not graph
                    or not is_standard(node, *wanted)
                    or options.excluded(node)
                    or scope(node) in keep_float
                ):
                    continue
                if node.op_type == "Gather":
                    modified |= quantize_gather(node, options.per_channel, MIN_TABLE_BYTES)
                else:
                    modified |= quantize_matmul(node, options, outliers, shared)
        return modified

    scopes = list(dict.fromkeys(scope(n) for n in nodes))
    return quantize, scopes, list(dict.fromkeys(scope(n) for n in nodes if n.op_type != "Gather"))


def find_outliers(model: ir.Model, nodes: list[ir.Node], options) -> dict[str, np.ndarray]:
    """Per quantized input (by name), the channels whose range dwarfs the rest (per-tensor int8 would lose the rest)."""
    xs = {node.inputs[0] for node in nodes if node.op_type != "Gather" and _weight(node)}
    ranges = channel_max(model, list(xs), options.calib)
    found = {
        x.name: outlier_channels(ranges[x.name], options.outliers, options.max_outliers)
        for x in xs
        if x.name in ranges
    }
    return {name: cols for name, cols in found.items() if cols.size}


def quantize_matmul(node: ir.Node, options, outliers: dict, shared: dict) -> bool:
    """MatMul or Gemm → DynamicQuantizeLinear, MatMulInteger, Cast, Mul (and the float outliers, the bias)."""
    weight = _weight(node)
    if weight is None:
        return False
    x, w, bias = weight
    graph = node.graph
    base = node.name or node.outputs[0].name or "quant"
    cols = outliers.get(x.name)
    follow = None
    if cols is not None:
        w, kept = w.copy(), w[cols]
        w[cols] = 0
        if bias is None and (follow := _bias_add(node, w.shape[1])) is not None:
            follow, bias = follow
    axis = 1 if options.per_channel else None
    # without the outliers the weights fill the int8 range densely, and non-VNNI kernels would saturate
    q, scale = quantize_symmetric(w, axis, reduce_range=options.reduce_range or cols is not None)
    wq = add_initializer(graph, q, fresh_name(graph, base, "weight_int8"))
    wzp = add_initializer(
        graph, np.zeros(scale.shape, np.int8), fresh_name(graph, base, "weight_zero_point")
    )
    wscale = add_initializer(graph, scale, fresh_name(graph, base, "weight_scale"))
    new = []
    if x not in shared:
        new += _quantize_input(x, cols, w.shape[0], base, shared)
    xq, xscale, xzp, outlying = shared[x]
    acc = ir.node("MatMulInteger", [xq, wq, xzp, wzp], name=f"{base}.int8")
    acc.meta[SOURCE_OP] = (
        node.op_type
    )  # MatMul and Gemm look alike once rewritten; the report names which
    as_float = ir.node("Cast", [acc.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}.cast")
    scales = ir.node("Mul", [xscale, wscale], name=f"{base}.scale")
    out = ir.node("Mul", [as_float.outputs[0], scales.outputs[0]], name=f"{base}.dequantize")
    new += [acc, as_float, scales, out]
    # the bias first, where onnxruntime fuses it into the int8 kernel; after the outliers' Add it
    # stayed apart (or became a BiasGelu, slower than Gelu here): MiniLM-L6 with calib, 50 Adds
    if bias is not None:
        b = add_initializer(graph, bias, fresh_name(graph, base, "bias"))
        out = ir.node("Add", [out.outputs[0], b], name=f"{base}.bias")
        new.append(out)
    if cols is not None:  # the outlier channels, in float
        wf = add_initializer(
            graph, np.ascontiguousarray(kept), fresh_name(graph, base, "outlier_weight")
        )
        rest = ir.node("MatMul", [outlying, wf], name=f"{base}.outliers")
        out = ir.node("Add", [out.outputs[0], rest.outputs[0]], name=f"{base}.with_outliers")
        new += [rest, out]
    _replace(node, new)
    if follow is not None:  # the bias Add it took in
        _replace(follow, [], out.outputs[0])
    return True


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node, np.ndarray] | None:
    """The Add of a constant bias [n] that alone reads ``node``'s output, and that bias."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    if not is_standard(add, "Add") or add.graph is not node.graph:
        return None
    other = constant(add.inputs[1 - uses[0].idx])
    if other is None or other.dtype != np.float32 or other.shape not in ((n,), (1, n)):
        return None
    return add, other.reshape(n).copy()


def _quantize_input(
    x: ir.Value, cols: np.ndarray | None, k: int, base: str, shared: dict
) -> list[ir.Node]:
    """DynamicQuantizeLinear of ``x``; with outlier channels, of ``x`` without them, and those apart."""
    if cols is None:
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}.quantize_input")
        shared[x] = (*dql.outputs, None)
        return [dql]
    graph = next(iter(x.uses())).node.graph
    mask = np.ones(k, np.float32)
    mask[cols] = 0
    keep = ir.node(
        "Mul",
        [x, add_initializer(graph, mask, fresh_name(graph, base, "inlier_mask"))],
        name=f"{base}.inliers",
    )
    pick = ir.node(
        "Gather",
        [x, add_initializer(graph, cols, fresh_name(graph, base, "outlier_channels"))],
        {"axis": -1},
        name=f"{base}.outliers_of_input",
    )
    dql = ir.node(
        "DynamicQuantizeLinear", [keep.outputs[0]], num_outputs=3, name=f"{base}.quantize_input"
    )
    shared[x] = (*dql.outputs, pick.outputs[0])
    return [keep, pick, dql]


def quantize_gather(node: ir.Node, per_channel: bool, min_bytes: int = 0) -> bool:
    """Gather on a float embedding table → Gather on an int8 table, then back to float: one scale
    per embedding dim with ``per_channel`` (Cast and Mul: the same numbers as a per-axis
    DequantizeLinear, whose onnxruntime 1.32 CPU kernel took 1.6 ms against 0.23 ms on MiniLM's
    [32, 64, 384] lookups), else a DequantizeLinear with one scale for the table. Tables under
    ``min_bytes`` stay float."""
    table = constant(node.inputs[0])
    indices = node.inputs[1]
    if (
        table is None
        or table.dtype != np.float32
        or table.ndim != 2
        or table.nbytes < min_bytes
        or node.attributes.get_int("axis", 0) != 0
    ):
        return False
    if indices is None or rank(indices) is None:
        return False
    q, scale = quantize_symmetric(table, 1 if per_channel else None, reduce_range=False)
    graph = node.graph
    base = node.name or node.outputs[0].name or "gather"
    tq = add_initializer(graph, q, fresh_name(graph, base, "table_int8"))
    ts = add_initializer(graph, scale, fresh_name(graph, base, "table_scale"))
    lookup = ir.node("Gather", [tq, indices], {"axis": 0}, name=f"{base}.int8")
    if per_channel:
        as_float = ir.node(
            "Cast", [lookup.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}.cast"
        )
        scaled = ir.node("Mul", [as_float.outputs[0], ts], name=f"{base}.dequantize")
        _replace(node, [lookup, as_float, scaled])
        return True
    tzp = add_initializer(
        graph, np.zeros(scale.shape, np.int8), fresh_name(graph, base, "table_zero_point")
    )
    dq = ir.node("DequantizeLinear", [lookup.outputs[0], ts, tzp], name=f"{base}.dequantize")
    _replace(node, [lookup, dq])
    return True


def _weight(node: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(input, float32 weight [K, N], bias [N] or None) of a MatMul or Gemm this pass can quantize."""
    x = node.inputs[0]
    if x is None or x.dtype != ir.DataType.FLOAT:
        return None
    w = constant(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return x, w, None
    a = node.attributes
    if a.get_int("transA", 0) or rank(x) != 2:
        return None
    w = w.T if a.get_int("transB", 0) else w
    w = w * np.float32(a.get_float("alpha", 1.0))
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if bias is None or bias.size not in (1, w.shape[1]) or bias.ndim > 1:
            return None
        bias = np.broadcast_to(
            bias.astype(np.float32) * np.float32(a.get_float("beta", 1.0)), (w.shape[1],)
        ).copy()
    return x, np.ascontiguousarray(w), bias


def _replace(node: ir.Node, new: list[ir.Node], out: ir.Value | None = None) -> None:
    """``new`` (in order) computes what ``node`` did; its last node (or ``out``) takes over
    ``node``'s output."""
    node.graph.insert_before(node, new)
    old, out = node.outputs[0], new[-1].outputs[0] if out is None else out
    out.shape, out.type = old.shape, old.type
    replace_value(old, out)
    node.graph.remove(node, safe=True)
    if (
        not out.is_graph_output()
    ):  # the result keeps its name, so reports can match it to the float model's
        name, old.name = old.name, None
        out.name = name


def dynamic_matmuls(model: ir.Model, options) -> list[ir.Node]:
    """The main graph's MatMul and Gemm nodes that ``quantize_matmul`` rewrites."""
    wanted = set(options.op_types) - {"Gather"}
    return [
        n for n in model.graph if is_standard(n, *wanted) and not options.excluded(n) and _weight(n)
    ]
