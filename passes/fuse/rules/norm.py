"""Normalization and GELU fusions: the decomposed LayerNorm that exporters emit becomes
LayerNormalization (opset 17), the Erf and Tanh forms of GELU become Gelu (opset 20)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import (
    add_initializer,
    axes_of,
    constant,
    fresh_name,
    is_scalar,
    only_reader,
    other_input,
    producer,
    rank,
    scalar,
    single_use,
)
from onnxopt.passes.fuse.rule import (
    Context,
    Match,
    dtype,
    not_made_by,
    replace_with,
    rule,
    shared,
)

FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# LayerNorm: ReduceMean → Sub → Pow 2 → ReduceMean → Add eps → Sqrt → Div (→ Mul gamma → Add beta)


def _reduced_axes(node: ir.Node, x: ir.Value) -> tuple[int, ...] | None:
    """The axes a keepdims ReduceMean of ``x`` averages over, counted from the front."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    axes = axes_of(node)  # an attribute before opset 18, an input since
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
    lead, tail = c.shape[: max(c.ndim - k, 0)], c.shape[max(c.ndim - k, 0) :]
    tail = (1,) * (k - len(tail)) + tail
    if any(d != 1 for d in lead) or any(d not in (1, n) for d, n in zip(tail, normalized)):
        return None
    return np.ascontiguousarray(np.broadcast_to(c.reshape(tail), normalized))


def _to_layernorm(
    nodes: list[ir.Node],
    x: ir.Value,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    normalized: tuple[int, ...],
    epsilon: float,
) -> bool:
    div, end = nodes[6], nodes[-1]
    graph = div.graph
    inputs = [
        x,
        _initializer(
            graph,
            np.ones(normalized, x.dtype.numpy()) if scale is None else scale,
            f"{div.name}.scale",
        ),
    ]
    if bias is not None:
        inputs.append(_initializer(graph, bias, f"{div.name}.bias"))
    attributes = {"axis": -len(normalized), "epsilon": epsilon}
    return replace_with(nodes, end, "LayerNormalization", inputs, attributes)


@rule(
    "layernorm",
    ("Div",),
    "decomposed LayerNorm (mean, variance, eps, Sqrt, Div, optional scale and bias) → LayerNormalization",
    rewrite=_to_layernorm,
    min_opset=17,
)
def layernorm(node: ir.Node, ctx: Context) -> Match:
    d, std = node.inputs
    sqrt = producer(std, "Sqrt")
    if sqrt is None:
        return Match.fail(not_made_by(std, "Sqrt"))
    add_eps = producer(sqrt.inputs[0], "Add")
    if add_eps is None:
        return Match.fail(not_made_by(sqrt.inputs[0], "Add"))
    sub = producer(d, "Sub")
    if sub is None:
        return Match.fail(not_made_by(d, "Sub"))
    for value in (std, sqrt.inputs[0]):
        if not single_use(value):
            return Match.fail(shared(value))
    x, mean = sub.inputs
    mean_node = producer(mean, "ReduceMean")
    if mean_node is None or mean_node.inputs[0] is not x:
        return Match.fail("the Sub does not subtract a ReduceMean of its own input")
    if not single_use(mean):
        return Match.fail(shared(mean))
    if x.dtype not in FLOATS:
        return Match.fail(f"x is {dtype(x)}, not a float type")
    for var, eps_value in (
        (add_eps.inputs[0], add_eps.inputs[1]),
        (add_eps.inputs[1], add_eps.inputs[0]),
    ):
        var_node, eps = producer(var, "ReduceMean"), scalar(eps_value, x)
        if var_node is not None and eps is not None and single_use(var):
            break
    else:
        return Match.fail("the Add is not a ReduceMean, read only here, plus a scalar epsilon")
    square = producer(var_node.inputs[0], "Pow", "Mul")
    if square is None or not single_use(square.outputs[0]) or square.inputs[0] is not d:
        return Match.fail(
            "the variance is not a mean of the centred input squared, read only there"
        )
    if (
        square.op_type == "Pow"
        and not is_scalar(square.inputs[1], d, 2.0)
        or square.op_type == "Mul"
        and square.inputs[1] is not d
    ):
        return Match.fail(f"the {square.op_type} does not square the centred input")
    if d.is_graph_output() or any(u.node not in (square, node) for u in d.uses()):
        return Match.fail("the centred input is read outside the pattern")
    axes = _reduced_axes(mean_node, x)
    if axes is None or _reduced_axes(var_node, x) != axes:
        return Match.fail("the two ReduceMeans do not keep dims over the same constant axes")
    if eps < 0:
        return Match.fail(f"epsilon {eps:g} is negative")
    normalized = _normalized_shape(x, axes)
    if normalized is None:
        return Match.fail("the reduced axes are not the last axes of x, with static dims")
    nodes, end = [mean_node, sub, square, var_node, add_eps, sqrt, node], node
    scale = bias = None
    mul = only_reader(end.outputs[0], "Mul")
    if (
        mul is not None
        and (scale := _per_feature(other_input(mul, end.outputs[0]), x, normalized)) is not None
    ):
        nodes.append(mul)
        end = mul
        add = only_reader(end.outputs[0], "Add")
        if (
            add is not None
            and (bias := _per_feature(other_input(add, end.outputs[0]), x, normalized)) is not None
        ):
            nodes.append(add)
    return Match.ok(nodes=nodes, x=x, scale=scale, bias=bias, normalized=normalized, epsilon=eps)


def _initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
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


def _gelu(nodes: list[ir.Node], x: ir.Value, one_plus: ir.Value, approximate: str) -> Match:
    tail = _half_x_times(one_plus, x)
    if tail is None:
        return Match.fail("1 + Erf/Tanh(...) is not multiplied by x and 0.5 alone")
    if x.dtype not in FLOATS:
        return Match.fail(f"x is {dtype(x)}, not a float type")
    return Match.ok(nodes=nodes + tail[0], x=x, approximate=approximate)


def _one_plus(value: ir.Value, x: ir.Value) -> ir.Node | None:
    add = only_reader(value, "Add")
    return add if add is not None and is_scalar(other_input(add, value), x, 1.0) else None


def _to_gelu(nodes: list[ir.Node], x: ir.Value, approximate: str) -> bool:
    attributes = {"approximate": approximate} if approximate != "none" else {}
    return replace_with(nodes, nodes[-1], "Gelu", [x], attributes)


def match_gelu(node: ir.Node) -> Match:
    """The GELU around this Erf or Tanh node: the nodes, the last one its end, ``x`` and
    ``approximate`` (none or tanh)."""
    return (_erf_gelu if node.op_type == "Erf" else _tanh_gelu)(node)


@rule(
    "gelu",
    ("Erf", "Tanh"),
    "GELU written with Erf or Tanh → Gelu (approximate=tanh for the Tanh form)",
    rewrite=_to_gelu,
    min_opset=20,
)
def gelu(node: ir.Node, ctx: Context) -> Match:
    return match_gelu(node)


def _erf_gelu(erf: ir.Node) -> Match:
    scaled = erf.inputs[0]
    div = producer(scaled, "Div", "Mul")
    if div is None:
        return Match.fail(not_made_by(scaled, "Div", "Mul"))
    if not single_use(scaled):
        return Match.fail(shared(scaled))
    if div.op_type == "Div":
        x = div.inputs[0]
        if not is_scalar(div.inputs[1], x, np.sqrt(2.0)):
            return Match.fail("the Div does not divide by sqrt(2)")
    else:
        x = next(
            (v for v, c in (div.inputs, div.inputs[::-1]) if is_scalar(c, v, np.sqrt(0.5))), None
        )
        if x is None:
            return Match.fail("the Mul does not multiply by sqrt(1/2)")
    add = _one_plus(erf.outputs[0], x)
    if add is None:
        return Match.fail("the Erf is not read by an Add of 1 alone")
    return _gelu([div, erf, add], x, add.outputs[0], "none")


def _cube_of(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` and the nodes, if ``value`` is Pow(x, 3), x * (x * x) or (x * x) * x."""
    node = producer(value, "Pow", "Mul")
    if node is None or not single_use(value):
        return None
    if node.op_type == "Pow":
        return (node.inputs[0], [node]) if is_scalar(node.inputs[1], node.inputs[0], 3.0) else None
    for x, sq in (node.inputs, node.inputs[::-1]):
        square = producer(sq, "Mul")
        if (
            square is not None
            and single_use(sq)
            and square.inputs[0] is x
            and square.inputs[1] is x
        ):
            return x, [square, node]
    return None


def _tanh_gelu(tanh: ir.Node) -> Match:
    inner = producer(tanh.inputs[0], "Mul")
    if inner is None:
        return Match.fail(not_made_by(tanh.inputs[0], "Mul"))
    if not single_use(tanh.inputs[0]):
        return Match.fail(shared(tanh.inputs[0]))
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
                    if one_plus is None:
                        return Match.fail("the Tanh is not read by an Add of 1 alone")
                    return _gelu(
                        [*cube[1], cubic, add, inner, tanh, one_plus],
                        x,
                        one_plus.outputs[0],
                        "tanh",
                    )
    return Match.fail("the Tanh's input is not sqrt(2/pi) * (x + 0.044715 * x^3)")


RULES = (layernorm, gelu)
