"""Quantization: ``quant(mode=dynamic)`` stores weights as int8 and quantizes activations at run time.

MatMul and Gemm with a constant 2-D weight become DynamicQuantizeLinear → MatMulInteger → Cast →
Mul(activation scale × weight scales), the form onnxruntime fuses into DynamicQuantizeMatMul and
MatMulIntegerToFloat (int8 weights, symmetric, per output channel by default; uint8 activations,
one scale per tensor, which is all those fused kernels take). Gather on an embedding table keeps an
int8 table and a DequantizeLinear per embedding dim after the lookup. Conv stays float (ConvInteger is
slow on CPU). Weights held in Constant nodes are lifted first; already-quantized models are refused.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Option, OptPass

from ._calibrate import channel_max, outlier_channels
from ._common import add_initializer, constant, fresh_name, graphs_of, infer_shapes, is_standard, lift_constants, rank, replace_value
from ._quant_math import quantize_symmetric
from ._quant_static import quantize_static

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                 "GatherBlockQuantized", "QGemm", "QAttention"}
MODES = ("dynamic", "static")
METHODS = ("minmax", "percentile", "entropy")
OP_TYPES = ("MatMul", "Gemm", "Gather")


class Quantize(OptPass):
    name = "quant"
    summary = "int8 quantization: dynamic (int8 weights per output channel, activations at run time) or static QDQ with calibrated ranges."
    exact = False
    options = (
        Option("mode", str, "dynamic", "dynamic (int8 weights, activations quantized at run time) or static (QDQ, ranges from calib)"),
        Option("per_channel", bool, True, "one weight scale per output channel (else one per tensor)"),
        Option("op_types", str, "MatMul|Gemm|Gather", "op types to quantize, separated by |"),
        Option("exclude", str, "", "node names or regexes to keep in float, separated by |"),
        Option("reduce_range", bool, False, "7-bit weights, for CPUs without VNNI whose int8 kernels saturate"),
        Option("calib", str, "", "calibration data (.npz or folder, as validate's --inputs): finds outlier channels"),
        Option("outliers", float, 4.0, "with calib: channels whose range exceeds this many times the median channel's stay float (0: off)"),
        Option("max_outliers", int, 8, "at most this many float channels per quantized input"),
        Option("method", str, "percentile", "static: how calibration sets ranges: minmax, percentile or entropy"),
        Option("percentile", float, 99.99, "static, method=percentile: the percentile of each tail kept"),
        Option("activation_type", str, "uint8", "static: uint8 or int8 activations"),
        Option("min_cosine", float, 0.99, "fidelity budget: the least output cosine the check accepts"),
    )

    def __init__(self, **values):
        super().__init__(**values)
        if self.mode not in MODES:
            raise UsageError(f"pass quant: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        unknown = set(_split(self.op_types)) - set(OP_TYPES)
        if unknown:
            raise UsageError(f"pass quant: op_types names {', '.join(sorted(unknown))}; it takes {', '.join(OP_TYPES)}")
        try:
            self._exclude = [re.compile(p) for p in _split(self.exclude)]
        except re.error as e:
            raise UsageError(f"pass quant: exclude has a bad regex: {e}") from None
        if self.method not in METHODS:
            raise UsageError(f"pass quant: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise UsageError(f"pass quant: activation_type must be uint8 or int8, got {self.activation_type!r}")
        if not 50 < self.percentile <= 100:
            raise UsageError(f"pass quant: percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "static" and not self.calib:
            raise UsageError("pass quant: mode=static needs calibration data: calib=PATH (.npz or folder), or calib=random")
        if not 0 < self.min_cosine <= 1:
            raise UsageError(f"pass quant: min_cosine must be in (0, 1], got {self.min_cosine}")

    def fidelity(self) -> float:
        return self.min_cosine

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _refuse_quantized(model)
        lift_constants(model)
        if self.mode == "static":
            infer_shapes(model)
            return ir.passes.PassResult(model, quantize_static(model, self))
        wanted = set(_split(self.op_types))
        self._outliers = self._find_outliers(model, wanted) if self.calib else {}
        modified = False
        for graph in graphs_of(model):
            shared: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
            for node in list(graph):
                if node.graph is not graph or not is_standard(node, *wanted) or self.excluded(node):
                    continue
                if node.op_type == "Gather":
                    modified |= self._gather(node)
                else:
                    modified |= self._matmul(node, shared)
        return ir.passes.PassResult(model, modified)

    def _find_outliers(self, model: ir.Model, wanted: set[str]) -> dict[ir.Value, np.ndarray]:
        """Per quantized input, the channels whose range dwarfs the rest (per-tensor int8 would lose the rest)."""
        xs = {node.inputs[0] for node in model.graph
              if is_standard(node, *wanted) and node.op_type != "Gather" and not self.excluded(node) and _weight(node)}
        ranges = channel_max(model, list(xs), self.calib)
        found = {x: outlier_channels(ranges[x.name], self.outliers, self.max_outliers) for x in xs if x.name in ranges}
        return {x: cols for x, cols in found.items() if cols.size}

    def excluded(self, node: ir.Node) -> bool:
        return any(p.fullmatch(node.name or "") for p in self._exclude)

    def _matmul(self, node: ir.Node, shared: dict) -> bool:
        weight = _weight(node)
        if weight is None:
            return False
        x, w, bias = weight
        graph = node.graph
        base = node.name or node.outputs[0].name or "quant"
        cols = self._outliers.get(x)
        if cols is not None:
            w, kept = w.copy(), w[cols]
            w[cols] = 0
        axis = 1 if self.per_channel else None
        q, scale = quantize_symmetric(w, axis, reduce_range=self.reduce_range)
        wq = add_initializer(graph, q, fresh_name(graph, base, "weight_int8"))
        wzp = add_initializer(graph, np.zeros(scale.shape, np.int8), fresh_name(graph, base, "weight_zero_point"))
        wscale = add_initializer(graph, scale, fresh_name(graph, base, "weight_scale"))
        new = []
        if x not in shared:
            new += self._quantize_input(x, cols, w.shape[0], base, shared)
        xq, xscale, xzp, outlying = shared[x]
        acc = ir.node("MatMulInteger", [xq, wq, xzp, wzp], name=f"{base}.int8")
        as_float = ir.node("Cast", [acc.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}.cast")
        scales = ir.node("Mul", [xscale, wscale], name=f"{base}.scale")
        out = ir.node("Mul", [as_float.outputs[0], scales.outputs[0]], name=f"{base}.dequantize")
        new += [acc, as_float, scales, out]
        if cols is not None:  # the outlier channels, in float
            wf = add_initializer(graph, np.ascontiguousarray(kept), fresh_name(graph, base, "outlier_weight"))
            rest = ir.node("MatMul", [outlying, wf], name=f"{base}.outliers")
            out = ir.node("Add", [new[-1].outputs[0], rest.outputs[0]], name=f"{base}.with_outliers")
            new += [rest, out]
        if bias is not None:
            b = add_initializer(graph, bias, fresh_name(graph, base, "bias"))
            new.append(ir.node("Add", [out.outputs[0], b], name=f"{base}.bias"))
        _replace(node, new)
        return True

    def _quantize_input(self, x: ir.Value, cols: np.ndarray | None, k: int, base: str, shared: dict) -> list[ir.Node]:
        """DynamicQuantizeLinear of ``x``; with outlier channels, of ``x`` without them, and those apart."""
        if cols is None:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}.quantize_input")
            shared[x] = (*dql.outputs, None)
            return [dql]
        graph = next(iter(x.uses())).node.graph
        mask = np.ones(k, np.float32)
        mask[cols] = 0
        keep = ir.node("Mul", [x, add_initializer(graph, mask, fresh_name(graph, base, "inlier_mask"))], name=f"{base}.inliers")
        pick = ir.node("Gather", [x, add_initializer(graph, cols, fresh_name(graph, base, "outlier_channels"))],
                       {"axis": -1}, name=f"{base}.outliers_of_input")
        dql = ir.node("DynamicQuantizeLinear", [keep.outputs[0]], num_outputs=3, name=f"{base}.quantize_input")
        shared[x] = (*dql.outputs, pick.outputs[0])
        return [keep, pick, dql]

    def _gather(self, node: ir.Node) -> bool:
        table = constant(node.inputs[0])
        indices = node.inputs[1]
        if table is None or table.dtype != np.float32 or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
            return False
        if indices is None or rank(indices) is None:
            return False
        q, scale = quantize_symmetric(table, 1 if self.per_channel else None, reduce_range=False)
        graph = node.graph
        base = node.name or node.outputs[0].name or "gather"
        tq = add_initializer(graph, q, fresh_name(graph, base, "table_int8"))
        ts = add_initializer(graph, scale, fresh_name(graph, base, "table_scale"))
        tzp = add_initializer(graph, np.zeros(scale.shape, np.int8), fresh_name(graph, base, "table_zero_point"))
        lookup = ir.node("Gather", [tq, indices], {"axis": 0}, name=f"{base}.int8")
        attributes = {"axis": -1} if self.per_channel else {}
        dq = ir.node("DequantizeLinear", [lookup.outputs[0], ts, tzp], attributes, name=f"{base}.dequantize")
        _replace(node, [lookup, dq])
        return True


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split("|") if s.strip()]


def _refuse_quantized(model: ir.Model) -> None:
    found = sorted({n.op_type for g in graphs_of(model) for n in g if n.op_type in QUANTIZED_OPS})
    if found:
        raise UsageError(f"pass quant: the model is already quantized ({', '.join(found)}); quantize the float model instead")


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
        bias = np.broadcast_to(bias.astype(np.float32) * np.float32(a.get_float("beta", 1.0)), (w.shape[1],)).copy()
    return x, np.ascontiguousarray(w), bias


def _replace(node: ir.Node, new: list[ir.Node]) -> None:
    """``new`` (in order) computes what ``node`` did; its last node takes over ``node``'s output."""
    node.graph.insert_before(node, new)
    old, out = node.outputs[0], new[-1].outputs[0]
    out.shape, out.type = old.shape, old.type
    replace_value(old, out)
    graph = node.graph
    weights = [v for v in node.inputs if v is not None and v.const_value is not None]
    graph.remove(node, safe=True)
    for v in weights:  # the float weights this node alone read
        if not v.uses() and not v.is_graph_input() and not v.is_graph_output() and v.name in graph.initializers:
            graph.initializers.pop(v.name)
