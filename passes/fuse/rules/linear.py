"""Fusions into linear layers (Conv, ConvTranspose, Gemm, MatMul): BatchNormalization and per-channel
Mul/Add/Sub/Div by constants become new weights and biases, refolded in float64; MatMul + Add → Gemm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import add_initializer, constant, fresh_name, producer, rank, replace_value, single_use
from onnxopt.passes.fuse.rule import Context, rule

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
    new_inputs = [linear.inputs[0], add_initializer(graph, w.astype(weight.dtype), fresh_name(graph, linear.inputs[1].name))]
    if linear.op_type == "Gemm":
        beta = linear.attributes.get_float("beta", 1.0)
        c = np.zeros(1) if bias is None else beta * bias.astype(np.float64)
        new_bias = c * scale + shift if bias is not None or np.any(shift) else None
        if new_bias is not None:
            new_inputs.append(add_initializer(graph, new_bias.astype(weight.dtype), fresh_name(graph, f"{linear.name}.bias")))
            linear.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    elif linear.op_type != "MatMul" and (bias is not None or np.any(shift)):
        b = np.zeros(len(scale)) if bias is None else bias.astype(np.float64)
        new_inputs.append(add_initializer(graph, (b * scale + shift).astype(weight.dtype), fresh_name(graph, f"{linear.name}.bias")))
    linear.resize_inputs(len(new_inputs))
    for i, value in enumerate(new_inputs):
        linear.replace_input_with(i, value)
    return True


def _absorb(node: ir.Node, linear: ir.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Fold ``scale``/``shift`` into ``linear`` and let ``node``'s readers read ``linear``'s output."""
    if not fold_affine(linear, scale, shift):
        return False
    out = linear.outputs[0]
    out.shape, out.type = node.outputs[0].shape or out.shape, node.outputs[0].type or out.type
    replace_value(node.outputs[0], out)
    node.graph.remove(node, safe=True)
    return True


def _linear_input(value: ir.Value) -> ir.Node | None:
    linear = producer(value, *LINEAR)
    if linear is None or not single_use(value) or len(linear.inputs) < 2 or value.dtype not in FLOATS:
        return None
    return linear if out_channels(linear) is not None else None


@rule("conv_bn", ("BatchNormalization",), "BatchNormalization after Conv, ConvTranspose, Gemm or a 2-D MatMul folded into its weights")
def conv_bn(node: ir.Node, ctx: Context) -> bool:
    if node.attributes.get_int("training_mode", 0) or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    linear = _linear_input(node.inputs[0])
    params = [constant(v) for v in node.inputs[1:5]]
    if linear is None or any(p is None for p in params):
        return False
    if linear.op_type in ("Gemm", "MatMul") and rank(node.inputs[0]) != 2:
        return False  # BatchNormalization's channels are axis 1; a Gemm's are its last
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    channels = out_channels(linear)
    if len(gamma) != channels:
        return False
    scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    shift = beta - mean * scale
    if linear.op_type == "MatMul" and np.any(shift):
        return _matmul_to_gemm(linear) and _absorb(node, linear, scale, shift)
    return _absorb(node, linear, scale, shift)


@rule("conv_affine", ("Mul", "Add", "Sub", "Div"),
      "per-channel Mul/Add/Sub/Div by a constant after Conv, ConvTranspose or Gemm (Mul/Div after MatMul) folded into its weights and bias")
def conv_affine(node: ir.Node, ctx: Context) -> bool:
    sides = ((0, 1), (1, 0)) if node.op_type in ("Mul", "Add") else ((0, 1),)
    for x, c in sides:
        linear = _linear_input(node.inputs[x])
        value = constant(node.inputs[c])
        if linear is None or value is None or node.inputs[c].dtype != node.inputs[x].dtype:
            continue
        vector = per_channel(value, rank(node.inputs[x]), channel_axis(linear), out_channels(linear))
        if vector is None or (node.op_type == "Div" and not np.all(vector)):
            continue
        if linear.op_type == "MatMul" and node.op_type in ("Add", "Sub"):
            continue  # a bias needs a Gemm: matmul_add
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        scale, shift = {
            "Mul": (vector, zeros), "Div": (1 / vector, zeros), "Add": (ones, vector), "Sub": (ones, -vector),
        }[node.op_type]
        return _absorb(node, linear, scale, shift)
    return False


def _matmul_to_gemm(matmul: ir.Node) -> bool:
    """A MatMul of a 2-D input by a 2-D weight becomes a Gemm (which can hold a bias)."""
    if rank(matmul.inputs[0]) != 2 or rank(matmul.inputs[1]) != 2:
        return False
    matmul.op_type = "Gemm"
    return True


@rule("matmul_add", ("Add",), "MatMul of 2-D inputs + Add of a constant bias → Gemm")
def matmul_add(node: ir.Node, ctx: Context) -> bool:
    for x, c in ((0, 1), (1, 0)):
        matmul = producer(node.inputs[x], "MatMul")
        bias = constant(node.inputs[c])
        if matmul is None or bias is None or not single_use(node.inputs[x]) or node.inputs[x].dtype not in FLOATS:
            continue
        if rank(matmul.inputs[0]) != 2 or rank(matmul.inputs[1]) != 2 or bias.ndim > 2:
            continue
        out = node.inputs[x].shape
        if out is None or not all(d == 1 or d == out[i - bias.ndim + 2] for i, d in enumerate(bias.shape)):
            continue  # Gemm's C broadcasts one way only, to [M, N]
        gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], node.inputs[c]], name=matmul.name)
        node.graph.insert_after(node, gemm)
        gemm.outputs[0].shape, gemm.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        replace_value(node.outputs[0], gemm.outputs[0])
        node.graph.remove([node, matmul], safe=True)
        return True
    return False


RULES = (conv_bn, conv_affine, matmul_add)
