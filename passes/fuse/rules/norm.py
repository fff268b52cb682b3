"""Normalization and GELU fusions: the decomposed LayerNorm that exporters emit becomes
LayerNormalization (opset 17), the Erf and Tanh forms of GELU become Gelu (opset 20)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import constant, is_scalar, only_reader, other_input, producer, rank, replace_nodes, scalar, single_use
from onnxopt.passes.fuse.rule import Context, rule

FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# LayerNorm: ReduceMean → Sub → Pow 2 → ReduceMean → Add eps → Sqrt → Div (→ Mul gamma → Add beta)


def _reduced_axes(node: ir.Node, x: ir.Value, opset: int) -> tuple[int, ...] | None:
    """The axes a keepdims ReduceMean of ``x`` averages over, counted from the front."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if opset >= 18:
        axes = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = None if axes is None else axes.reshape(-1).tolist()
    else:
        axes = node.attributes.get_ints("axes", None)
    r = rank(x)
    if not axes or r is None or any(not -r <= a < r for a in axes):
        return None
    return tuple(sorted({a % r for a in axes}))


def _normalized_shape(x: ir.Value, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The static dims of ``x`` over ``axes``, if they are its last axes."""
    r = rank(x)
    if axes != tuple(range(r - len(axes), r)):
        return None
    dims = tuple(x.shape[a] for a in axes)
    return dims if all(isinstance(d, int) for d in dims) else None


def _per_feature(value: ir.Value, x: ir.Value, normalized: tuple[int, ...]) -> np.ndarray | None:
    """A constant that varies along the normalized axes only, broadcast to their shape."""
    c = constant(value)
    if c is None or c.dtype != x.dtype.numpy() or c.ndim > rank(x):
        return None
    k = len(normalized)
    lead, tail = c.shape[: max(c.ndim - k, 0)], c.shape[max(c.ndim - k, 0):]
    tail = (1,) * (k - len(tail)) + tail
    if any(d != 1 for d in lead) or any(d not in (1, n) for d, n in zip(tail, normalized)):
        return None
    return np.ascontiguousarray(np.broadcast_to(c.reshape(tail), normalized))


@rule("layernorm", ("Div",), "decomposed LayerNorm (mean, variance, eps, Sqrt, Div, optional scale and bias) → LayerNormalization",
      min_opset=17)
def layernorm(node: ir.Node, ctx: Context) -> bool:
    d, std = node.inputs
    sqrt = producer(std, "Sqrt")
    add_eps = producer(sqrt.inputs[0], "Add") if sqrt is not None else None
    sub = producer(d, "Sub")
    if add_eps is None or sub is None or not single_use(std) or not single_use(sqrt.inputs[0]):
        return False
    x, mean = sub.inputs
    mean_node = producer(mean, "ReduceMean")
    if mean_node is None or mean_node.inputs[0] is not x or not single_use(mean) or x.dtype not in FLOATS:
        return False
    for var, eps_value in ((add_eps.inputs[0], add_eps.inputs[1]), (add_eps.inputs[1], add_eps.inputs[0])):
        var_node, eps = producer(var, "ReduceMean"), scalar(eps_value, x)
        if var_node is not None and eps is not None and single_use(var):
            break
    else:
        return False
    square = producer(var_node.inputs[0], "Pow", "Mul")
    if square is None or not single_use(square.outputs[0]) or square.inputs[0] is not d:
        return False
    if square.op_type == "Pow" and not is_scalar(square.inputs[1], d, 2.0) or square.op_type == "Mul" and square.inputs[1] is not d:
        return False
    if d.is_graph_output() or any(u.node not in (square, node) for u in d.uses()):
        return False
    axes = _reduced_axes(mean_node, x, ctx.opset)
    if axes is None or _reduced_axes(var_node, x, ctx.opset) != axes or eps < 0:
        return False
    normalized = _normalized_shape(x, axes)
    if normalized is None:
        return False
    nodes, end = [mean_node, sub, square, var_node, add_eps, sqrt, node], node
    scale = bias = None
    mul = only_reader(end.outputs[0], "Mul")
    if mul is not None and (scale := _per_feature(other_input(mul, end.outputs[0]), x, normalized)) is not None:
        nodes.append(mul)
        end = mul
        add = only_reader(end.outputs[0], "Add")
        if add is not None and (bias := _per_feature(other_input(add, end.outputs[0]), x, normalized)) is not None:
            nodes.append(add)
            end = add
    graph = node.graph
    inputs = [x, _initializer(graph, np.ones(normalized, x.dtype.numpy()) if scale is None else scale, f"{node.name}.scale")]
    if bias is not None:
        inputs.append(_initializer(graph, bias, f"{node.name}.bias"))
    fused = ir.node("LayerNormalization", inputs, {"axis": -len(axes), "epsilon": eps}, name=end.name)
    return replace_nodes(nodes, end, fused)


def _initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    from onnxopt.passes._common import add_initializer, fresh_name

    return add_initializer(graph, array, fresh_name(graph, base))


# GELU: x * 0.5 * (1 + Erf(x / sqrt 2)) and 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))


def _half_x_times(one_plus: ir.Value, x: ir.Value) -> tuple[list[ir.Node], ir.Node] | None:
    """The Mul nodes computing ``x * 0.5 * one_plus`` in any order, and the last of them."""
    first = only_reader(one_plus, "Mul")
    if first is None:
        return None
    partner = other_input(first, one_plus)
    if partner is x or is_scalar(partner, x, 0.5):  # (x * a) * 0.5, (a * 0.5) * x
        second = only_reader(first.outputs[0], "Mul")
        wanted = (lambda v: is_scalar(v, x, 0.5)) if partner is x else (lambda v: v is x)
        if second is None or not wanted(other_input(second, first.outputs[0])):
            return None
        return [first, second], second
    half = producer(partner, "Mul")  # (x * 0.5) * a
    if half is None or not single_use(partner) or not is_scalar(other_input(half, x), x, 0.5):
        return None
    return [half, first], first


# make(x, approximate, name): the node computing GELU of x, or None where it would not run
MakeGelu = Callable[[ir.Value, str, str], "ir.Node | None"]


def _standard_gelu(x: ir.Value, approximate: str, name: str) -> ir.Node:
    attributes = {"approximate": approximate} if approximate != "none" else {}
    return ir.node("Gelu", [x], attributes, name=name)


def _gelu(nodes: list[ir.Node], x: ir.Value, one_plus: ir.Value, approximate: str, make: MakeGelu) -> bool:
    tail = _half_x_times(one_plus, x)
    if tail is None or x.dtype not in FLOATS:
        return False
    nodes, end = nodes + tail[0], tail[1]
    fused = make(x, approximate, end.name)
    return fused is not None and replace_nodes(nodes, end, fused)


def _one_plus(value: ir.Value, x: ir.Value) -> ir.Node | None:
    add = only_reader(value, "Add")
    return add if add is not None and is_scalar(other_input(add, value), x, 1.0) else None


@rule("gelu", ("Erf", "Tanh"), "GELU written with Erf or Tanh → Gelu (approximate=tanh for the Tanh form)", min_opset=20)
def gelu(node: ir.Node, ctx: Context) -> bool:
    return match_gelu(node, _standard_gelu)


def match_gelu(node: ir.Node, make: MakeGelu) -> bool:
    """Replace the GELU around this Erf or Tanh node with ``make``'s node."""
    return (_erf_gelu if node.op_type == "Erf" else _tanh_gelu)(node, make)


def _erf_gelu(erf: ir.Node, make: MakeGelu) -> bool:
    scaled = erf.inputs[0]
    div = producer(scaled, "Div", "Mul")
    if div is None or not single_use(scaled):
        return False
    if div.op_type == "Div":
        x = div.inputs[0]
        if not is_scalar(div.inputs[1], x, np.sqrt(2.0)):
            return False
    else:
        x = next((v for v, c in (div.inputs, div.inputs[::-1]) if is_scalar(c, v, np.sqrt(0.5))), None)
        if x is None:
            return False
    add = _one_plus(erf.outputs[0], x)
    return add is not None and _gelu([div, erf, add], x, add.outputs[0], "none", make)


def _cube_of(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` and the nodes, if ``value`` is Pow(x, 3), x * (x * x) or (x * x) * x."""
    node = producer(value, "Pow", "Mul")
    if node is None or not single_use(value):
        return None
    if node.op_type == "Pow":
        return (node.inputs[0], [node]) if is_scalar(node.inputs[1], node.inputs[0], 3.0) else None
    for x, sq in (node.inputs, node.inputs[::-1]):
        square = producer(sq, "Mul")
        if square is not None and single_use(sq) and square.inputs[0] is x and square.inputs[1] is x:
            return x, [square, node]
    return None


def _tanh_gelu(tanh: ir.Node, make: MakeGelu) -> bool:
    inner = producer(tanh.inputs[0], "Mul")
    if inner is None or not single_use(tanh.inputs[0]):
        return False
    for s, c in (inner.inputs, inner.inputs[::-1]):
        add = producer(s, "Add")
        if add is None or not single_use(s) or not is_scalar(c, s, np.sqrt(2 / np.pi)):
            continue
        for x, q in (add.inputs, add.inputs[::-1]):
            cubic = producer(q, "Mul")
            if cubic is None or not single_use(q):
                continue
            for p, k in (cubic.inputs, cubic.inputs[::-1]):
                cube = _cube_of(p)
                if cube is not None and cube[0] is x and is_scalar(k, x, 0.044715):
                    one_plus = _one_plus(tanh.outputs[0], x)
                    return one_plus is not None and _gelu(
                        [*cube[1], cubic, add, inner, tanh, one_plus], x, one_plus.outputs[0], "tanh", make)
    return False


RULES = (layernorm, gelu)
