"""Activation fusions: Min/Max → Clip, Relu/Clip chains merged, hard swish → HardSwish, x * Sigmoid(x) → Swish."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes._common import (
    RTOL,
    add_initializer,
    fresh_name,
    is_scalar,
    is_standard,
    only_reader,
    other_input,
    producer,
    scalar,
    single_use,
)
from onnxopt.passes.fuse.rule import (
    Context,
    Match,
    dtype,
    not_made_by,
    not_read_by,
    replace_with,
    rule,
    shared,
)

# onnxruntime has no double Clip before opset 12, and no double HardSigmoid, which its HardSwish expands to.
CLIP_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
HARD_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
SWISH_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def _since(op_type: str) -> int | None:
    """The opset that introduced the standard ``op_type``, or None where the installed onnx lacks it."""
    return onnx.defs.get_schema(op_type).since_version if onnx.defs.has(op_type) else None


SWISH_SINCE = _since("Swish")
SWISH_LAST = (
    24  # onnxruntime (1.32) has a Swish kernel for opset 24 only: later models fail to load
)


# Clip bounds are floats here, -inf and inf standing for a missing one.


def _clip_types(opset: int) -> tuple[ir.DataType, ...]:
    return CLIP_TYPES + ((ir.DataType.DOUBLE,) if opset >= 12 else ())


def _bound_input(graph: ir.Graph, bound: float, x: ir.Value, base: str) -> ir.Value | None:
    """A 0-d initializer holding ``bound`` in ``x``'s dtype, or None for a missing (infinite) one."""
    if math.isinf(bound):
        return None
    return add_initializer(graph, np.array(bound, dtype=x.dtype.numpy()), fresh_name(graph, base))


def _clip_match(nodes: list[ir.Node], x: ir.Value, lo: float, hi: float, ctx: Context) -> Match:
    """``nodes`` (the last one the end) become clip(x, lo, hi), where that runs."""
    if x.dtype not in _clip_types(ctx.opset):
        return Match.fail(f"x is {dtype(x)}: no onnxruntime Clip for it at opset {ctx.opset}")
    if not lo <= hi:
        return Match.fail(f"the bounds are not ordered ({lo:g} > {hi:g})")
    return Match.ok(nodes=nodes, x=x, lo=lo, hi=hi, opset=ctx.opset)


def _to_clip(nodes: list[ir.Node], x: ir.Value, lo: float, hi: float, opset: int) -> bool:
    """Replace ``nodes`` by one node computing clip(x, lo, hi): Relu for [0, inf), else Clip."""
    end = nodes[-1]
    if lo == 0 and hi == math.inf:
        return replace_with(nodes, end, "Relu", [x])
    if opset < 11:  # Clip-6 takes its bounds as attributes
        attributes = {k: v for k, v in (("min", lo), ("max", hi)) if not math.isinf(v)}
        return replace_with(nodes, end, "Clip", [x], attributes)
    base = end.name or "clip"
    inputs = [
        x,
        _bound_input(end.graph, lo, x, f"{base}.min"),
        _bound_input(end.graph, hi, x, f"{base}.max"),
    ]
    while inputs[-1] is None:
        inputs.pop()
    return replace_with(nodes, end, "Clip", inputs)


@rule(
    "min_max_clip",
    ("Min", "Max"),
    "Min(Max(x, lo), hi) and Max(Min(x, hi), lo) with scalar lo <= hi → Clip",
    rewrite=_to_clip,
    min_opset=6,
)
def min_max_clip(node: ir.Node, ctx: Context) -> Match:
    inner_op = "Max" if node.op_type == "Min" else "Min"
    if len(node.inputs) != 2:
        return Match.fail(f"{node.op_type} has {len(node.inputs)} inputs, not 2")
    for value, outer_bound in (node.inputs, node.inputs[::-1]):
        inner = producer(value, inner_op)
        if inner is None or len(inner.inputs) != 2 or not single_use(value):
            continue
        for x, inner_bound in (inner.inputs, inner.inputs[::-1]):
            a, b = scalar(inner_bound, x), scalar(outer_bound, x)
            if a is None or b is None:
                continue
            return _clip_match([inner, node], x, *((a, b) if inner_op == "Max" else (b, a)), ctx)
    return Match.fail(
        f"no input is a {inner_op} of two inputs, read only here, with scalar bounds on both"
    )


def _range(node: ir.Node) -> tuple[float, float] | None:
    """The constant [lo, hi] a Relu or an input-form Clip keeps its input within."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    x, bounds = node.inputs[0], []
    for i, missing in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[i] if len(node.inputs) > i else None
        bounds.append(missing if value is None else scalar(value, x))
    lo, hi = bounds
    return None if lo is None or hi is None or not lo <= hi else (lo, hi)


@rule(
    "clip_chain",
    ("Relu", "Clip"),
    "Relu and Clip of a Relu or Clip with constant bounds → one Clip (or Relu)",
    rewrite=_to_clip,
    min_opset=11,
)
def clip_chain(node: ir.Node, ctx: Context) -> Match:
    inner = producer(node.inputs[0], "Relu", "Clip")
    if inner is None:
        return Match.fail(not_made_by(node.inputs[0], "Relu", "Clip"))
    if not single_use(node.inputs[0]):
        return Match.fail(shared(node.inputs[0]))
    outer_range, inner_range = _range(node), _range(inner)
    if outer_range is None or inner_range is None:
        return Match.fail("a Clip's bounds are not ordered scalar constants")
    # Disjoint ranges would make a constant; a Clip with lo > hi is not that.
    lo, hi = max(outer_range[0], inner_range[0]), min(outer_range[1], inner_range[1])
    return _clip_match([inner, node], inner.inputs[0], lo, hi, ctx)


# Hard swish: x * HardSigmoid(x), and x * Clip(x + 3, 0, 6) / 6 as exporters write it, in any order.


def _close(value: float, target: float) -> bool:
    return abs(value - target) <= RTOL * abs(target)


def _fuse(nodes: list[ir.Node], op_type: str, x: ir.Value, attributes: dict | None = None) -> bool:
    """Replace ``nodes`` (the last one the end) by one ``op_type`` node of ``x``."""
    return replace_with(nodes, nodes[-1], op_type, [x], attributes)


@rule(
    "hardswish",
    ("HardSigmoid", "Clip"),
    "x * HardSigmoid(x) and x * Clip(x + 3, 0, 6) / 6 → HardSwish; Clip(x + 3, 0, 6) / 6 alone → HardSigmoid",
    rewrite=_fuse,
    min_opset=14,
)
def hardswish(node: ir.Node, ctx: Context) -> Match:
    if node.inputs[0].dtype not in HARD_TYPES:
        return Match.fail(
            f"x is {dtype(node.inputs[0])}: onnxruntime's HardSwish takes float/float16"
        )
    return (_hardsigmoid_times_x if node.op_type == "HardSigmoid" else _relu6_form)(node)


def _hardsigmoid_times_x(node: ir.Node) -> Match:
    x = node.inputs[0]
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    if not _close(alpha, 1 / 6) or not _close(beta, 0.5):
        return Match.fail(f"HardSigmoid alpha={alpha:g}, beta={beta:g}, not 1/6 and 0.5")
    mul = only_reader(node.outputs[0], "Mul")
    if mul is None:
        return Match.fail(not_read_by(node.outputs[0], "Mul"))
    if other_input(mul, node.outputs[0]) is not x:
        return Match.fail("the Mul does not multiply by the HardSigmoid's input")
    return Match.ok(nodes=[node, mul], op_type="HardSwish", x=x)


def _over_six(value: ir.Value, x: ir.Value) -> ir.Node | None:
    """The one reader of ``value``, if it is ``value / 6`` or ``value * (1/6)``."""
    node = only_reader(value, "Div", "Mul")
    if node is None:
        return None
    if node.op_type == "Div":
        return node if node.inputs[0] is value and is_scalar(node.inputs[1], x, 6.0) else None
    return node if is_scalar(other_input(node, value), x, 1 / 6) else None


def _relu6_of_x_plus_3(clip: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """``x`` and the Add, if ``clip`` is Clip(x + 3, 0, 6)."""
    shifted = clip.inputs[0]
    add = producer(shifted, "Add")
    if add is None or not single_use(shifted) or len(clip.inputs) != 3:
        return None
    x = next((v for v, c in (add.inputs, add.inputs[::-1]) if is_scalar(c, v, 3.0)), None)
    if x is None or scalar(clip.inputs[1], x) != 0.0 or not is_scalar(clip.inputs[2], x, 6.0):
        return None
    return x, add


def _relu6_form(clip: ir.Node) -> Match:
    found = _relu6_of_x_plus_3(clip)
    if found is None:
        return Match.fail("the Clip is not Clip(x + 3, 0, 6) of an Add read only here")
    x, add = found
    relu6 = clip.outputs[0]
    scale = _over_six(relu6, x)
    if scale is not None:  # (Clip / 6) * x, or HardSigmoid alone
        mul = only_reader(scale.outputs[0], "Mul")
        if mul is not None and other_input(mul, scale.outputs[0]) is x:
            return Match.ok(nodes=[add, clip, scale, mul], op_type="HardSwish", x=x)
        hard_sigmoid = {"alpha": 1 / 6, "beta": 0.5}
        return Match.ok(
            nodes=[add, clip, scale], op_type="HardSigmoid", x=x, attributes=hard_sigmoid
        )
    mul = only_reader(relu6, "Mul")  # (x * Clip) / 6
    if mul is None or other_input(mul, relu6) is not x:
        return Match.fail("Clip(x + 3, 0, 6) is neither divided by 6 nor multiplied by x alone")
    scale = _over_six(mul.outputs[0], x)
    if scale is None:
        return Match.fail("x * Clip(x + 3, 0, 6) is not divided by 6 alone")
    return Match.ok(nodes=[add, clip, mul, scale], op_type="HardSwish", x=x)


# Swish: x * Sigmoid(x)


def _swish_input(mul: ir.Node) -> ir.Value | None:
    """``x``, if ``mul`` computes x * Sigmoid(x) in either order."""
    if len(mul.inputs) != 2:
        return None
    for s, x in (mul.inputs, mul.inputs[::-1]):
        sigmoid = producer(s, "Sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is x:
            return x
    return None


def count_swish(model: ir.Model) -> int:
    """How many x * Sigmoid(x) products the model computes, in every graph."""
    return sum(
        1
        for graph in model.graphs()
        for node in graph
        if is_standard(node, "Mul") and _swish_input(node) is not None
    )


SWISH_SUMMARY = (
    f"x * Sigmoid(x) → Swish, not past opset {SWISH_LAST} (no later onnxruntime kernel)"
    if SWISH_SINCE
    else "x * Sigmoid(x): recognised only (this onnx has no Swish)"
)


@rule("swish", ("Sigmoid",), SWISH_SUMMARY, rewrite=_fuse, min_opset=SWISH_SINCE or 1)
def swish(node: ir.Node, ctx: Context) -> Match:
    x = node.inputs[0]
    mul = only_reader(node.outputs[0], "Mul")
    if mul is None:
        return Match.fail(not_read_by(node.outputs[0], "Mul"))
    if other_input(mul, node.outputs[0]) is not x:
        return Match.fail("the Mul does not multiply by the Sigmoid's input")
    if x.dtype not in SWISH_TYPES:
        return Match.fail(f"x is {dtype(x)}: Swish takes float, double and float16")
    # Recognised, but there is no op to fuse into that runs.
    if SWISH_SINCE is None:
        return Match.fail("this onnx has no Swish op")
    if ctx.opset > SWISH_LAST:
        return Match.fail(f"onnxruntime has no Swish kernel past opset {SWISH_LAST}")
    return Match.ok(nodes=[node, mul], op_type="Swish", x=x)


RULES = (min_max_clip, clip_chain, hardswish, swish)
