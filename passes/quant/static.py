"""Static int8 in QDQ form: QuantizeLinear → DequantizeLinear pairs on activations with ranges from
calibration, int8 weights (per output channel) and int32 biases behind DequantizeLinear.

Placement follows what onnxruntime's CPU QDQ transformer turns into integer kernels: a node of
``INTEGER_OPS`` runs in int8 only when every data input comes from a DequantizeLinear and every output
goes to a QuantizeLinear, so each tensor that such a node reads or writes gets one Q→DQ pair and all its
readers read the DQ: no float detours between two integer kernels. Data-movement ops (Reshape,
Transpose, ...) sit between a DQ and a Q that onnxruntime drops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._calibrate import run_values
from onnxopt.passes._common import add_initializer, constant, fresh_name, is_standard
from onnxopt.passes.quant.bias import ChannelMean, channel_axis, corrected_bias
from onnxopt.passes.quant.calib_ranges import RangeCollector
from onnxopt.passes.quant.ort_profile import scope
from onnxopt.passes.quant.qmath import dequantize, quantize_symmetric
from onnxopt.passes.quant.smooth import SMOOTHING

# op type -> indices of its data inputs (the rest are weights, biases, shapes)
INTEGER_OPS = {
    "Conv": (0,),
    "MatMul": (0, 1),
    "Gemm": (0,),
    "Add": (0, 1),
    "Mul": (0, 1),
    "Sigmoid": (0,),
    "Concat": None,
    "MaxPool": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "Resize": (0,),
    "Reshape": (0,),
    "Transpose": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Flatten": (0,),
    "Split": (0,),
    "Slice": (0,),
    "LeakyRelu": (0,),
    "Softmax": (0,),
}
WEIGHTED = ("Conv", "MatMul", "Gemm")
# Ops that only move or select values: onnxruntime drops their Q/DQ (or runs them in int8) only when the
# output's scale and zero point are the input's, which also makes them exact in int8.
SAME_SCALE = (
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Split",
    "Slice",
    "MaxPool",
    "Resize",
)


def data_inputs(node: ir.Node) -> list[ir.Value]:
    indices = INTEGER_OPS[node.op_type]
    picked = (
        node.inputs
        if indices is None
        else [node.inputs[i] for i in indices if i < len(node.inputs)]
    )
    return [
        v for v in picked if v is not None and constant(v) is None and v.dtype == ir.DataType.FLOAT
    ]


def candidates(graph: ir.Graph, excluded) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes to run in int8 and the activations to quantize, in graph order."""
    nodes = [
        n
        for n in graph
        if is_standard(n, *INTEGER_OPS)
        and not excluded(n)
        and _supported(n)
        and not n.meta.get(SMOOTHING)
    ]
    values: dict[ir.Value, None] = {}
    for node in nodes:
        for v in data_inputs(node):
            values[v] = None
        for v in node.outputs:
            if v.dtype == ir.DataType.FLOAT:
                values[v] = None
    return nodes, list(values)


def _supported(node: ir.Node) -> bool:
    if node.op_type in WEIGHTED:
        w = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.op_type == "MatMul":
            return w is None or (w.ndim == 2 and w.dtype == np.float32)
        if w is None or w.dtype != np.float32:
            return False
        if node.op_type == "Gemm":
            a = node.attributes
            return (
                not a.get_int("transA", 0)
                and a.get_float("alpha", 1.0) == 1.0
                and a.get_float("beta", 1.0) == 1.0
            )
    return True


def calibrate(
    model: ir.Model,
    values: list[ir.Value],
    calib: str,
    method: str,
    percentile: float,
    channel_axes: dict[str, int] | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """The range of each value (by name) over the calibration data and, in the same runs, the mean of
    each channel of the values named in ``channel_axes`` (name -> channel axis)."""
    collectors = {v.name: RangeCollector() for v in values}
    means = {name: ChannelMean(axis) for name, axis in (channel_axes or {}).items()}
    for results in run_values(model, values, calib):
        for name, x in results.items():
            if name in collectors:
                collectors[name].update(x)
            if name in means:
                means[name].update(x)
    ranges = {name: c.range(method, percentile) for name, c in collectors.items()}
    return ranges, {name: m.mean() for name, m in means.items() if m.mean() is not None}


def activation_params(
    lo: float, hi: float, dtype: str, symmetric: bool = False
) -> tuple[np.float32, np.ndarray]:
    """Scale and zero point of a uint8 (or int8) range that holds 0 exactly; symmetric about 0 when
    asked (zero point 128, or 0 for int8)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    if dtype == "uint8":
        return scale, np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
    return scale, np.array(np.clip(np.rint(-128 - lo / scale), -128, 127), np.int8)


def insert_qdq(
    graph: ir.Graph, value: ir.Value, scale: np.float32, zero_point: np.ndarray
) -> ir.Value:
    """Q(value) → DQ; every reader of ``value`` reads the DQ instead. Returns the DQ's output."""
    base = value.name or "act"
    readers = [
        (u.node, u.idx) for u in value.uses() if not u.node.meta.get(SMOOTHING)
    ]  # that Mul wants x unrounded
    s = add_initializer(graph, np.array(scale, np.float32), fresh_name(graph, base, "scale"))
    z = add_initializer(graph, zero_point, fresh_name(graph, base, "zero_point"))
    q = ir.node("QuantizeLinear", [value, s, z], name=f"{base}.quantize")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{base}.dequantize")
    out = dq.outputs[0]
    out.type, out.shape = value.type, value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(graph[0], [q, dq])
    for node, index in readers:
        node.replace_input_with(index, out)
    if value.is_graph_output():  # the output keeps its name and now comes out of the DQ
        name = value.name
        value.name = fresh_name(graph, name, "float")
        out.name = name
        graph.outputs[graph.outputs.index(value)] = out
    return out


def quantize_weights(
    node: ir.Node,
    x_scale: np.float32,
    per_channel: bool,
    opset: int,
    mean: np.ndarray | None = None,
) -> None:
    """The node's weight becomes DQ(int8) and its bias DQ(int32 at x_scale × weight scale); with the
    input's per-channel ``mean``, the bias first absorbs the mean error of the int8 weight."""
    graph = node.graph
    w = constant(node.inputs[1])
    if w is None:
        return
    axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if node.attributes.get_int("transB", 0) else 1}[
        node.op_type
    ]
    per_channel = per_channel and opset >= 13
    q, scale = quantize_symmetric(w, axis if per_channel else None)
    base = node.name or node.outputs[0].name or node.op_type
    attrs = {"axis": axis} if per_channel else {}
    zero = np.zeros(scale.shape, np.int8)
    dq = ir.node(
        "DequantizeLinear",
        [
            add_initializer(graph, q, fresh_name(graph, base, "weight_int8")),
            add_initializer(graph, scale, fresh_name(graph, base, "weight_scale")),
            add_initializer(graph, zero, fresh_name(graph, base, "weight_zero_point")),
        ],
        attrs,
        name=f"{base}.weight",
    )
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    b = constant(node.inputs[2]) if has_bias else None
    if mean is not None and (b is not None or not has_bias):
        corrected = corrected_bias(
            node, w, dequantize(q, scale, 0, axis if per_channel else None), b, mean
        )
        if corrected is not None:
            b = corrected
            node.resize_inputs(max(len(node.inputs), 3))
    if b is None or b.ndim != 1:
        return
    bias_scale = (np.float64(x_scale) * scale.astype(np.float64)).astype(np.float32)
    bias_scale = np.broadcast_to(bias_scale, b.shape).copy() if per_channel else bias_scale
    bq = np.clip(np.rint(b / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
    battrs = {"axis": 0} if per_channel else {}
    bdq = ir.node(
        "DequantizeLinear",
        [
            add_initializer(graph, bq, fresh_name(graph, base, "bias_int32")),
            add_initializer(graph, bias_scale, fresh_name(graph, base, "bias_scale")),
            add_initializer(
                graph,
                np.zeros(bias_scale.shape, np.int32),
                fresh_name(graph, base, "bias_zero_point"),
            ),
        ],
        battrs,
        name=f"{base}.bias",
    )
    graph.insert_before(node, bdq)
    node.replace_input_with(2, bdq.outputs[0])


def static_quantizer(model: ir.Model, options):
    """``(quantize, scopes, scopes)``: ``quantize(model, keep_float)`` puts QDQ on a float model, with
    ranges calibrated here once; ``scopes`` are those it can quantize (all for speed). ``None`` when
    nothing can be."""
    if model.opset_imports.get("", 1) < 10:
        return None
    nodes, values = candidates(model.graph, options.excluded)
    if not nodes:
        return None
    axes = (
        {n.inputs[0].name: channel_axis(n) for n in nodes if channel_axis(n) is not None}
        if options.bias_correction
        else {}
    )
    ranges, means = calibrate(
        model, values, options.calib, options.method, options.percentile, axes
    )

    def quantize(target: ir.Model, keep_float: set[str]) -> bool:
        return apply_qdq(
            target, options, ranges, lambda n: options.excluded(n) or scope(n) in keep_float, means
        )

    scopes = list(dict.fromkeys(scope(n) for n in nodes))
    return quantize, scopes, scopes


def apply_qdq(
    model: ir.Model,
    options,
    ranges: dict[str, tuple[float, float]],
    excluded,
    means: dict | None = None,
) -> bool:
    graph = model.graph
    opset = model.opset_imports.get("", 1)
    nodes, values = candidates(graph, excluded)
    input_names = {node: node.inputs[0].name for node in nodes}  # before the readers read DQs
    params: dict[ir.Value, tuple] = {}
    for v in values:
        params[v] = _inherited(v, params) or activation_params(
            *ranges[v.name], options.activation_type, options.symmetric_activations
        )
    scales = {
        insert_qdq(graph, v, *params[v]): params[v][0] for v in values
    }  # by the DQ readers now read
    for node in nodes:
        if node.op_type in WEIGHTED and node.inputs[0] in scales:
            quantize_weights(
                node,
                scales[node.inputs[0]],
                options.per_channel,
                opset,
                (means or {}).get(input_names[node]),
            )
    return bool(nodes)


def _inherited(value: ir.Value, params: dict) -> tuple | None:
    """The input's quantization, for the output of an op that only moves values."""
    node = value.producer()
    if (
        node is None
        or not is_standard(node, *SAME_SCALE)
        or not node.inputs
        or node.inputs[0] not in params
    ):
        return None
    return params[node.inputs[0]]


def static_matmuls(model: ir.Model, options) -> list[ir.Node]:
    """The main graph's MatMul and Gemm nodes that ``apply_qdq`` puts in int8."""
    return [
        n for n in candidates(model.graph, options.excluded)[0] if n.op_type in ("MatMul", "Gemm")
    ]
