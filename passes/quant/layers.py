"""Per-layer rows of ``quant``'s and ``wquant``'s reports, read back from the node patterns the passes
write (QDQ from ``static``; DynamicQuantizeLinear → MatMulInteger and int8 Gather tables from
``dynamic``): one row per Conv, MatMul, Gemm and Gather that became int8 and per Conv, MatMul and Gemm
left in float. Weight-only layers (``wquant``) are found by the output names the pass recorded, with
their weight error. Why a layer stayed float is the pass's to say: it hands ``layers`` a function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import constant, is_standard, producer
from onnxopt.passes.quant.dynamic import SOURCE_OP
from onnxopt.passes.quant.ort_profile import scope, scope_of

WEIGHTED = ("Conv", "MatMul", "Gemm")
LIST = ";"  # how a list option is written back in a row's reason (as on the command line)


def layers(
    model: ir.Model,
    why_float: Callable[[ir.Node], str | None],
    weight_only: Mapping[str, dict] | None = None,
    profile: Sequence[tuple[str, float, float]] | None = None,
) -> list[dict]:
    """The rows of the quantized ``model``: ``why_float(node)`` says why a Conv, MatMul or Gemm
    stayed float; ``weight_only`` holds, by output name, the layers a weight-only pass wrote;
    ``profile`` is tune=latency's (scope, float µs, int8 µs), when the pass times layers (the rows
    then carry ``float_us`` and ``int8_us``)."""
    rows = []
    weight_only = weight_only or {}
    for graph in list(model.graphs()):
        by_name = {n.name: n for n in graph if n.name}
        for node in graph:
            if node.outputs and node.outputs[0].name in weight_only:
                output = node.outputs[0].name
                rows.append(_weight_only_row(output, weight_only[output]))
            elif is_standard(node, "MatMulInteger") and node.name.endswith(".int8"):
                rows.append(_dynamic_row(node, by_name))
            elif (
                is_standard(node, "Gather")
                and node.name.endswith(".int8")
                and _int8(node.inputs[0])
            ):
                rows.append(_gather_row(node))
            elif is_standard(node, *WEIGHTED) and not _outlier_part(node, by_name):
                rows.append(_static_row(node) or _float_row(node, why_float(node)))
    if profile is not None:
        times = {s: (f, q) for s, f, q in profile}
        for (
            row
        ) in rows:  # what tune=latency's profile measured for the layer's scope, in µs per run
            row["float_us"], row["int8_us"] = times.get(scope_of(row["layer"]), (None, None))
    return rows


def scale_range(row: dict) -> str:
    """The report's cell for a row's weight scales: one value, or the least and the largest."""
    lo, hi = row.get("weight_scale_min"), row.get("weight_scale_max")
    if lo is None:
        return "-"
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}–{hi:.3g}"


@dataclasses.dataclass(frozen=True)
class Int8Reasons:
    """Why a Conv, MatMul or Gemm stayed float in an int8 run: the options that select layers and
    what the run decided (scopes kept float for accuracy or speed; tune=latency's whole-model times,
    float then int8, in ms)."""

    mode: str
    op_types: Sequence[str]
    exclude: Sequence[str]
    excluded: Callable[[ir.Node], bool]
    min_cosine: float
    kept_float: Collection[str] = ()
    slow_float: Collection[str] = ()
    timed: tuple[float, float] | None = None

    def __call__(self, node: ir.Node) -> str | None:
        timed = self.timed
        if timed and timed[1] >= timed[0]:
            return (
                f"tune=latency: int8 was not faster ({timed[1]:.3f} ms vs {timed[0]:.3f} ms float), "
                "so the whole model stayed float"
            )
        if self.excluded(node):
            return f"matches exclude={LIST.join(self.exclude)}"
        if scope(node) in self.kept_float:
            return f"kept float to hold min_cosine={self.min_cosine:g} on the calibration samples"
        if scope(node) in self.slow_float:
            return "kept float: its int8 kernels were slower in onnxruntime's profile"
        if self.mode != "dynamic":
            return None
        if node.op_type == "Conv":
            return "Conv stays float in dynamic mode"
        if node.op_type not in self.op_types:
            return f"not in op_types={LIST.join(self.op_types)}"
        return _unusable(node)


def _unusable(node: ir.Node) -> str | None:
    """Why a node of a quantized op type could not be: its weight or its input."""
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return "its weight is not a constant"
    if node.inputs[0].dtype != ir.DataType.FLOAT:
        return "its input is not known to be float32"
    return None


def _row(
    layer: str, op: str, output: str | None, weight: str, activation: str | None, **stats
) -> dict:
    return {
        "layer": layer,
        "op": op,
        "output": output,
        "weight": weight,
        "activation": activation,
        "weight_scale_min": None,
        "weight_scale_max": None,
        "weight_scale_count": None,
        "weight_zero_point_is_zero": None,
        "activation_scale": None,
        "activation_zero_point": None,
        "why_float": None,
        **stats,
    }


def _weight_only_row(output: str, layer: dict) -> dict:
    """A weight-only layer: bits, block and the weight's mean squared error from quantization time."""
    stats = {k: v for k, v in layer.items() if k not in ("layer", "op", "weight")}
    return _row(layer["layer"], layer["op"], output, layer["weight"], "float32", **stats)


def _weight_stats(scale: np.ndarray | None, zero_point: np.ndarray | None) -> dict:
    if scale is None:
        return {}
    return {
        "weight_scale_min": float(scale.min()),
        "weight_scale_max": float(scale.max()),
        "weight_scale_count": int(scale.size),
        "weight_zero_point_is_zero": None if zero_point is None else not np.any(zero_point),
    }


def _dynamic_row(node: ir.Node, by_name: dict[str, ir.Node]) -> dict:
    base = node.name.removesuffix(".int8")
    scales = by_name.get(f"{base}.scale")
    bias = by_name.get(f"{base}.bias")
    bias = bias if bias is not None and is_standard(bias, "Add") else None
    last = next(
        n
        for n in (
            bias,
            by_name.get(f"{base}.with_outliers"),
            by_name.get(f"{base}.dequantize"),
            node,
        )
        if n is not None
    )
    op = node.meta.get(SOURCE_OP) or ("Gemm" if bias is not None else "MatMul")
    scale = constant(scales.inputs[1]) if scales is not None else None
    return _row(
        base,
        op,
        last.outputs[0].name,
        "int8",
        "dynamic uint8",
        **_weight_stats(scale, constant(node.inputs[3]) if len(node.inputs) > 3 else None),
    )


def _gather_row(node: ir.Node) -> dict:
    """An int8 embedding table looked up, then dequantized (a DequantizeLinear, or Cast then Mul by
    one scale per dim): the indices are not quantized."""
    base = node.name.removesuffix(".int8")
    reader = next(iter(node.outputs[0].uses()), None)
    reader = reader.node if reader else None
    if reader is not None and is_standard(reader, "DequantizeLinear"):
        return _row(
            base,
            "Gather",
            reader.outputs[0].name,
            "int8",
            None,
            **_weight_stats(*_dq_params(reader)[1:]),
        )
    if reader is not None and is_standard(reader, "Cast"):
        scaled = next(iter(reader.outputs[0].uses()), None)
        if scaled is not None and is_standard(scaled.node, "Mul"):
            mul = scaled.node
            stats = _weight_stats(constant(mul.inputs[1]), np.zeros(1, np.int8))
            return _row(base, "Gather", mul.outputs[0].name, "int8", None, **stats)
    return _row(base, "Gather", node.outputs[0].name, "int8", None)


def _static_row(node: ir.Node) -> dict | None:
    """A QDQ node unit: data input (and weight) from DequantizeLinear; None when the node reads float."""
    x = producer(node.inputs[0], "DequantizeLinear")
    w = producer(node.inputs[1], "DequantizeLinear") if len(node.inputs) > 1 else None
    if x is None or w is None:
        return None
    x_type, x_scale, x_zero = _dq_params(x)
    w_type, w_scale, w_zero = _dq_params(w)
    output = _carried_name(node.outputs[0])
    layer = node.name or output or node.op_type
    activation = (
        {}
        if x_scale is None or x_scale.size != 1
        else {
            "activation_scale": float(x_scale.reshape(())),
            "activation_zero_point": None if x_zero is None else int(x_zero.reshape(-1)[0]),
        }
    )
    return _row(
        layer, node.op_type, output, w_type, x_type, **_weight_stats(w_scale, w_zero), **activation
    )


def _float_row(node: ir.Node, why_float: str | None) -> dict:
    output = node.outputs[0].name
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return _row(
        node.name or output or node.op_type,
        node.op_type,
        output,
        _dtype(weight),
        _dtype(node.inputs[0]),
        why_float=why_float,
    )


def _outlier_part(node: ir.Node, by_name: dict[str, ir.Node]) -> bool:
    """The float MatMul of a dynamic layer's outlier channels belongs to that layer's row."""
    return (
        node.name.endswith(".outliers") and f"{node.name.removesuffix('.outliers')}.int8" in by_name
    )


def _dq_params(dq: ir.Node) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(integer type, scale, zero point) of a DequantizeLinear, from its constants."""
    scale = constant(dq.inputs[1])
    zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    typed = zero if zero is not None else constant(dq.inputs[0])
    return (typed.dtype.name if typed is not None else _dtype(dq.inputs[0])), scale, zero


def _int8(value: ir.Value | None) -> bool:
    array = constant(value)
    return array is not None and array.dtype == np.int8


def _carried_name(value: ir.Value) -> str | None:
    """The name the float model knows the value by: a graph output that got Q→DQ gave its name to the DQ."""
    uses = value.uses()
    if len(uses) == 1 and is_standard(uses[0].node, "QuantizeLinear"):
        for use in uses[0].node.outputs[0].uses():
            dq = use.node
            if is_standard(dq, "DequantizeLinear") and dq.outputs[0].is_graph_output():
                return dq.outputs[0].name
    return value.name


def _dtype(value: ir.Value | None) -> str:
    if value is None or value.dtype is None:
        return "float32"
    try:
        return np.dtype(value.dtype.numpy()).name
    except TypeError:
        return str(value.dtype)
