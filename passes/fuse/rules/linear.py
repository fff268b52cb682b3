"""Fusions into linear layers (Conv, ConvTranspose, Gemm, MatMul): BatchNormalization and per-channel
Mul/Add/Sub/Div by constants become new weights and biases, refolded in float64; MatMul + Add → Gemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import (
    add_initializer,
    constant,
    fresh_name,
    producer,
    rank,
    replace_value,
    single_use,
)
from onnxopt.passes.fuse.rule import Context, Match, dtype, not_made_by, rule, shared

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def channel_axis(linear: ir.Node) -> int:
    """The axis of the output channels: 1 for convolutions, the last for Gemm and MatMul."""
    return 1 if linear.op_type in ("Conv", "ConvTranspose") else -1


def out_channels(linear: ir.Node) -> int | None:
    weight = constant(linear.inputs[1])
    if weight is None or weight.ndim < 2:
        return None
    if linear.op_type == "Conv":
        return weight.shape[0]
    if linear.op_type == "ConvTranspose":
        return weight.shape[1] * linear.attributes.get_int("group", 1)
    if linear.op_type == "Gemm":
        return weight.shape[0] if linear.attributes.get_int("transB", 0) else weight.shape[1]
    return weight.shape[-1] if weight.ndim == 2 else None


def per_channel(c: np.ndarray, out_rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as a vector over the output channels, if broadcasting it leaves the output's shape alone."""
    if out_rank is None or c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape
    axis = axis % out_rank
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,))


def fold_affine(linear: ir.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Rewrite ``linear`` so that it computes ``linear(x) * scale + shift`` (vectors over its channels)."""
    weight, graph = constant(linear.inputs[1]), linear.graph
    bias_input = linear.inputs[2] if len(linear.inputs) > 2 else None
    bias = constant(bias_input) if bias_input is not None else None
    if bias_input is not None and bias is None:
        return False
    if linear.op_type == "MatMul" and np.any(shift):
        return False
    w = weight.astype(np.float64)
    if linear.op_type == "Conv":
        w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    elif linear.op_type == "ConvTranspose":
        group = linear.attributes.get_int("group", 1)
        grouped = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        w = (grouped * scale.reshape(group, 1, w.shape[1], *[1] * (w.ndim - 2))).reshape(w.shape)
    elif linear.op_type == "Gemm" and linear.attributes.get_int("transB", 0):
        w = w * scale[:, None]
    else:
        w = w * scale
    new_inputs = [
        linear.inputs[0],
        add_initializer(graph, w.astype(weight.dtype), fresh_name(graph, linear.inputs[1].name)),
    ]
    if linear.op_type == "Gemm":
        beta = linear.attributes.get_float("beta", 1.0)
        c = np.zeros(1) if bias is None else beta * bias.astype(np.float64)
        new_bias = c * scale + shift if bias is not None or np.any(shift) else None
        if new_bias is not None:
            new_inputs.append(
                add_initializer(
                    graph, new_bias.astype(weight.dtype), fresh_name(graph, f"{linear.name}.bias")
                )
            )
            linear.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    elif linear.op_type != "MatMul" and (bias is not None or np.any(shift)):
        b = np.zeros(len(scale)) if bias is None else bias.astype(np.float64)
        new_inputs.append(
            add_initializer(
                graph,
                (b * scale + shift).astype(weight.dtype),
                fresh_name(graph, f"{linear.name}.bias"),
            )
        )
    linear.resize_inputs(len(new_inputs))
    for i, value in enumerate(new_inputs):
        linear.replace_input_with(i, value)
    return True


def _fold_refusal(linear: ir.Node, shift: np.ndarray) -> str | None:
    """Why ``fold_affine(linear, scale, shift)`` would refuse, or None where it folds."""
    bias_input = linear.inputs[2] if len(linear.inputs) > 2 else None
    if bias_input is not None and constant(bias_input) is None:
        return f"the {linear.op_type}'s bias is not a constant"
    if linear.op_type == "MatMul" and np.any(shift):
        return "a MatMul has no bias to take the shift"
    return None


def _absorb(
    node: ir.Node, linear: ir.Node, scale: np.ndarray, shift: np.ndarray, to_gemm: bool = False
) -> bool:
    """Fold ``scale``/``shift`` into ``linear`` (made a Gemm first where ``to_gemm``, for a bias)
    and let ``node``'s readers read ``linear``'s output."""
    if to_gemm:
        linear.op_type = "Gemm"
    if not fold_affine(linear, scale, shift):
        return False
    out = linear.outputs[0]
    out.shape, out.type = node.outputs[0].shape or out.shape, node.outputs[0].type or out.type
    replace_value(node.outputs[0], out)
    node.graph.remove(node, safe=True)
    return True


def _linear_input(value: ir.Value) -> tuple[ir.Node | None, str]:
    """The linear layer computing ``value`` with constant weights, read only there; or why not."""
    linear = producer(value, *LINEAR)
    if linear is None:
        return None, not_made_by(value, *LINEAR)
    if not single_use(value):
        return None, shared(value)
    if len(linear.inputs) < 2:
        return None, f"the {linear.op_type} has no weight input"
    if value.dtype not in FLOATS:
        return None, f"{value.name} is {dtype(value)}, not float, double or float16"
    if out_channels(linear) is None:
        return None, f"the {linear.op_type}'s weight is not a constant" + (
            " 2-D matrix" if linear.op_type == "MatMul" else ""
        )
    return linear, ""


@rule(
    "conv_bn",
    ("BatchNormalization",),
    "BatchNormalization after Conv, ConvTranspose, Gemm or a 2-D MatMul folded into its weights",
    rewrite=_absorb,
)
def conv_bn(node: ir.Node, ctx: Context) -> Match:
    if node.attributes.get_int("training_mode", 0):
        return Match.fail("training_mode is set")
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Match.fail("the running mean or variance output is read")
    linear, why = _linear_input(node.inputs[0])
    if linear is None:
        return Match.fail(why)
    params = [constant(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        return Match.fail("scale, bias, mean or variance is not a constant")
    if linear.op_type in ("Gemm", "MatMul") and rank(node.inputs[0]) != 2:
        # BatchNormalization's channels are axis 1; a Gemm's are its last
        return Match.fail(f"the {linear.op_type} output is not 2-D")
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    channels = out_channels(linear)
    if len(gamma) != channels:
        return Match.fail(f"{len(gamma)} normalized channels, {channels} output channels")
    scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    shift = beta - mean * scale
    to_gemm = linear.op_type == "MatMul" and bool(np.any(shift))
    if to_gemm and (rank(linear.inputs[0]) != 2 or rank(linear.inputs[1]) != 2):
        return Match.fail(
            "the MatMul needs a bias, and cannot become a Gemm: its inputs are not 2-D"
        )
    refusal = _fold_refusal(linear, np.zeros(1) if to_gemm else shift)
    if refusal is not None:
        return Match.fail(refusal)
    return Match.ok(node=node, linear=linear, scale=scale, shift=shift, to_gemm=to_gemm)


@rule(
    "conv_affine",
    ("Mul", "Add", "Sub", "Div"),
    "per-channel Mul/Add/Sub/Div by a constant after Conv, ConvTranspose or Gemm (Mul/Div after MatMul) "
    "folded into its weights and bias",
    rewrite=_absorb,
)
def conv_affine(node: ir.Node, ctx: Context) -> Match:
    sides = ((0, 1), (1, 0)) if node.op_type in ("Mul", "Add") else ((0, 1),)
    refusals = []
    for x, c in sides:
        linear, why = _linear_input(node.inputs[x])
        value = constant(node.inputs[c])
        if linear is None or value is None or node.inputs[c].dtype != node.inputs[x].dtype:
            refusals.append(why or f"input {c} is not a constant of the same type")
            continue
        vector = per_channel(
            value, rank(node.inputs[x]), channel_axis(linear), out_channels(linear)
        )
        if vector is None or (node.op_type == "Div" and not np.all(vector)):
            refusals.append(
                f"input {c} is not a per-channel constant"
                + (" without zeros" if node.op_type == "Div" else "")
            )
            continue
        if linear.op_type == "MatMul" and node.op_type in ("Add", "Sub"):
            refusals.append("a MatMul takes no bias here (matmul_add makes it a Gemm)")
            continue
        op = node.op_type  # 1 / vector only for Div: a Mul's vector may hold zeros
        scale = vector if op == "Mul" else 1 / vector if op == "Div" else np.ones_like(vector)
        shift = vector if op == "Add" else -vector if op == "Sub" else np.zeros_like(vector)
        refusal = _fold_refusal(linear, shift)
        if refusal is not None:
            return Match.fail(refusal)
        return Match.ok(node=node, linear=linear, scale=scale, shift=shift)
    return Match.fail("; ".join(refusals))


def _to_gemm(node: ir.Node, matmul: ir.Node, bias: ir.Value) -> bool:
    gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], bias], name=matmul.name)
    node.graph.insert_after(node, gemm)
    gemm.outputs[0].shape, gemm.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    replace_value(node.outputs[0], gemm.outputs[0])
    node.graph.remove([node, matmul], safe=True)
    return True


@rule(
    "matmul_add",
    ("Add",),
    "MatMul of 2-D inputs + Add of a constant bias → Gemm",
    rewrite=_to_gemm,
)
def matmul_add(node: ir.Node, ctx: Context) -> Match:
    refusals = []
    for x, c in ((0, 1), (1, 0)):
        matmul = producer(node.inputs[x], "MatMul")
        bias = constant(node.inputs[c])
        if matmul is None or bias is None:
            refusals.append(
                not_made_by(node.inputs[x], "MatMul")
                if matmul is None
                else f"input {c} is not a constant"
            )
            continue
        if not single_use(node.inputs[x]):
            refusals.append(shared(node.inputs[x]))
            continue
        if node.inputs[x].dtype not in FLOATS:
            refusals.append(f"the MatMul output is {dtype(node.inputs[x])}")
            continue
        if rank(matmul.inputs[0]) != 2 or rank(matmul.inputs[1]) != 2 or bias.ndim > 2:
            refusals.append("the MatMul inputs are not 2-D, or the bias has more than 2 dims")
            continue
        out = node.inputs[x].shape
        if out is None or not all(
            d == 1 or d == out[i - bias.ndim + 2] for i, d in enumerate(bias.shape)
        ):
            # Gemm's C broadcasts one way only, to [M, N]
            refusals.append("the bias does not broadcast to the MatMul output alone")
            continue
        return Match.ok(node=node, matmul=matmul, bias=node.inputs[c])
    return Match.fail("; ".join(refusals))


RULES = (conv_bn, conv_affine, matmul_add)
