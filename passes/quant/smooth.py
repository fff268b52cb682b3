"""SmoothQuant (Xiao et al., 2023): move activation outliers of MatMul inputs into the weights.

Per input channel j of an activation x read by MatMul/Gemm nodes with constant weights,
s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha) over the group of nodes that read x; then x' = x / s and
W' = diag(s) W, which leaves every product unchanged in exact arithmetic. The division is folded into
x's producer where that is exact (the affine tail of a LayerNorm) and x has no other reader; otherwise
one Mul(x, 1/s) feeds the whole group.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._calibrate import channel_max
from onnxopt.passes._common import (
    add_initializer,
    constant,
    fresh_name,
    is_standard,
    producer,
    single_use,
)

SCALE_RANGE = (1e-5, 1e5)
# meta key of an inserted Mul: static mode leaves it in float, where x's outliers are harmless
SMOOTHING = "quant.smoothing"


def smooth_inputs(model: ir.Model, nodes: list[ir.Node], alpha: float, calib: str) -> int:
    """Smooth the inputs of ``nodes`` (the MatMul/Gemm nodes about to be quantized) in place; returns
    how many inputs were smoothed."""
    groups = _groups(nodes)
    if not groups:
        return 0
    amax = channel_max(model, list(groups), calib)
    smoothed = 0
    for x, readers in groups.items():
        weights = [_rows(n) for n in readers]
        if x.name not in amax or any(w.shape[axis] != amax[x.name].size for w, axis in weights):
            continue
        rows_max = np.max([np.abs(w).max(1 - axis) for w, axis in weights], axis=0)
        s = smoothing_scales(amax[x.name], rows_max, alpha)
        for node, (w, axis) in zip(readers, weights):
            shape = (-1, 1) if axis == 0 else (1, -1)
            scaled = (w.astype(np.float64) * s.reshape(shape)).astype(np.float32)
            node.replace_input_with(
                1,
                add_initializer(
                    node.graph,
                    scaled,
                    fresh_name(node.graph, node.name or x.name, "smoothed_weight"),
                ),
            )
        if not (_fold_into_layernorm(x, readers, s) or _fold_into_affine(x, readers, s)):
            _insert_mul(x, readers, s)
        smoothed += 1
    return smoothed


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = x_max_j^alpha / w_max_j^(1 - alpha), clipped; 1 where either range is zero."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    live = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1 - alpha)
    return np.clip(s, *SCALE_RANGE)


def _groups(nodes: list[ir.Node]) -> dict[ir.Value, list[ir.Node]]:
    """The nodes with a smoothable weight, by the activation they read."""
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in nodes:
        x = node.inputs[0]
        if (
            x is not None
            and x.name
            and x.dtype == ir.DataType.FLOAT
            and constant(x) is None
            and _rows(node) is not None
        ):
            groups.setdefault(x, []).append(node)
    return groups


def _rows(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """A MatMul/Gemm's constant 2-D float weight and the axis of its input channels."""
    if not is_standard(node, "MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = constant(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return w, 0
    if node.attributes.get_int("transA", 0):
        return None
    return w, 1 if node.attributes.get_int("transB", 0) else 0


def _only_read_by(x: ir.Value, readers: list[ir.Node]) -> bool:
    """Whether dividing ``x`` itself changes what no other node sees (Shape only reads its shape)."""
    return not x.is_graph_output() and all(
        u.node in readers or is_standard(u.node, "Shape") for u in x.uses()
    )


def _per_channel(c: np.ndarray | None, k: int) -> bool:
    """Whether dividing ``c`` by s (shape [k]) keeps the shape it broadcasts to."""
    return c is not None and c.dtype == np.float32 and (c.ndim == 0 or c.shape[-1] in (1, k))


def _divide(node: ir.Node, index: int, c: np.ndarray, s: np.ndarray) -> None:
    graph = node.graph
    value = (c.astype(np.float64) / s).astype(np.float32)
    node.replace_input_with(
        index, add_initializer(graph, value, fresh_name(graph, node.inputs[index].name, "smoothed"))
    )


def _fold_into_layernorm(x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> bool:
    """LayerNormalization's scale and bias divided by s."""
    ln = producer(x, "LayerNormalization")
    if ln is None or ln.outputs[0] is not x or not _only_read_by(x, readers):
        return False
    scale = constant(ln.inputs[1])
    bias = constant(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
    if scale is None or scale.ndim == 0 or not _per_channel(scale, s.size):
        return False
    if (
        len(ln.inputs) > 2
        and ln.inputs[2] is not None
        and (bias is None or bias.ndim == 0 or not _per_channel(bias, s.size))
    ):
        return False
    _divide(ln, 1, scale, s)
    if bias is not None:
        _divide(ln, 2, bias, s)
    return True


def _fold_into_affine(x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> bool:
    """x = z * g + c (a decomposed LayerNorm's tail) → g / s and c / s."""
    add = producer(x, "Add")
    if add is None or not _only_read_by(x, readers):
        return False
    for y_index in (0, 1):
        y, c_value = add.inputs[y_index], add.inputs[1 - y_index]
        mul = producer(y, "Mul")
        c = constant(c_value)
        if mul is None or not single_use(y) or not _per_channel(c, s.size):
            continue
        for g_index in (0, 1):
            g = constant(mul.inputs[g_index])
            if _per_channel(g, s.size) and constant(mul.inputs[1 - g_index]) is None:
                _divide(mul, g_index, g, s)
                _divide(add, 1 - y_index, c, s)
                return True
    return False


def _insert_mul(x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> None:
    graph = readers[0].graph
    inverse = add_initializer(
        graph, (1.0 / s).astype(np.float32), fresh_name(graph, x.name, "smooth_scale")
    )
    out = ir.Value(name=fresh_name(graph, x.name, "smoothed"), type=x.type, shape=x.shape)
    mul = ir.node("Mul", [x, inverse], outputs=[out], name=f"{x.name}.smooth")
    mul.meta[SMOOTHING] = True
    if x.producer() is not None and x.producer().graph is graph:
        graph.insert_after(x.producer(), mul)
    else:
        graph.insert_before(graph[0], mul)
    for node in readers:
        node.replace_input_with(0, out)
