"""onnxruntime contrib-op fusions, only with ``fuse(target=ort)``: the output then runs on onnxruntime
alone. GELU becomes com.microsoft Gelu/FastGelu on opsets before the standard Gelu, a bias Add in
front of it folds in (BiasGelu, FastGelu with bias), and a residual Add in front of a
LayerNormalization becomes SkipLayerNormalization. onnxruntime's CPU kernels take float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import add_initializer, constant, fresh_name, is_standard, producer, rank, replace_nodes, single_use
from onnxopt.passes.fuse.rules.norm import match_gelu
from onnxopt.passes.fuse.rule import Context, rule

ORT = "com.microsoft"


def _contrib_gelu(x: ir.Value, approximate: str, name: str) -> ir.Node | None:
    if x.dtype != ir.DataType.FLOAT:
        return None
    return ir.node("FastGelu" if approximate == "tanh" else "Gelu", [x], domain=ORT, name=name)


@rule("ort_gelu", ("Erf", "Tanh"), "GELU written with Erf or Tanh → com.microsoft Gelu / FastGelu (before opset 20)",
      target="ort")
def ort_gelu(node: ir.Node, ctx: Context) -> bool:
    return ctx.opset < 20 and match_gelu(node, _contrib_gelu)


def _bias_of(add: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x, bias) when ``add`` adds a 1-D float32 constant along the last axis of x."""
    for x, b in (add.inputs, add.inputs[::-1]):
        c = constant(b)
        last = x.shape[-1] if x.shape is not None and len(x.shape) else None
        if c is not None and c.ndim == 1 and c.dtype == np.float32 and x.dtype == ir.DataType.FLOAT and c.shape[0] == last:
            return x, b
    return None


def _gelu_reader(value: ir.Value) -> ir.Node | None:
    """The one reader of ``value`` if it is an exact (erf) or tanh GELU of any domain."""
    if not single_use(value):
        return None
    node = value.uses()[0].node
    if node.domain == ORT and node.op_type in ("Gelu", "FastGelu") and len(node.inputs) == 1:
        return node
    return node if is_standard(node, "Gelu") else None


@rule("bias_gelu", ("Add",), "Add of a bias vector then GELU → com.microsoft BiasGelu (FastGelu with bias for tanh GELU)",
      target="ort")
def bias_gelu(node: ir.Node, ctx: Context) -> bool:
    found = _bias_of(node)
    gelu = _gelu_reader(node.outputs[0])
    if found is None or gelu is None:
        return False
    tanh = gelu.op_type == "FastGelu" or gelu.attributes.get_string("approximate", "none") == "tanh"
    fused = ir.node("FastGelu" if tanh else "BiasGelu", list(found), domain=ORT, name=gelu.name)
    return replace_nodes([node, gelu], gelu, fused)


@rule("skip_layernorm", ("LayerNormalization",),
      "residual Add then LayerNormalization over the last axis of 3-D tensors → com.microsoft SkipLayerNormalization",
      min_opset=17, target="ort")
def skip_layernorm(node: ir.Node, ctx: Context) -> bool:
    add = producer(node.inputs[0], "Add")
    if add is None or not single_use(node.inputs[0]) or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    a, b = add.inputs
    if rank(a) != 3 or a.shape is None or b.shape is None or tuple(a.shape) != tuple(b.shape):
        return False
    if a.dtype != ir.DataType.FLOAT or node.attributes.get_int("axis", -1) not in (-1, 2):
        return False
    params = [v for v in node.inputs[1:] if v is not None]
    if any(constant(v) is None or constant(v).ndim != 1 for v in params):
        return False
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    fused = ir.node("SkipLayerNormalization", [a, b, *params], {"epsilon": epsilon}, domain=ORT, name=node.name)
    return replace_nodes([add, node], node, fused)


@rule("gemm_bias_gelu", ("Gemm",), "Gemm with a bias vector read only by a GELU → MatMul then com.microsoft BiasGelu "
      "(the reverse of matmul_add, where the Gemm hides the bias from the GELU)", target="ort")
def gemm_bias_gelu(node: ir.Node, ctx: Context) -> bool:
    gelu = _gelu_reader(node.outputs[0])
    if gelu is None or len(node.inputs) < 3 or node.attributes.get_int("transA", 0):
        return False
    if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        return False
    a, b, c = node.inputs
    weight, bias = constant(b), constant(c)
    if weight is None or bias is None or weight.ndim != 2 or bias.dtype != np.float32 or a.dtype != ir.DataType.FLOAT:
        return False
    transposed = node.attributes.get_int("transB", 0)
    if bias.shape != (weight.shape[0 if transposed else 1],):
        return False
    if transposed:
        b = add_initializer(node.graph, np.ascontiguousarray(weight.T), fresh_name(node.graph, b.name))
    matmul = ir.node("MatMul", [a, b], name=node.name)
    node.graph.insert_before(node, matmul)
    matmul.outputs[0].shape, matmul.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    tanh = gelu.op_type == "FastGelu" or gelu.attributes.get_string("approximate", "none") == "tanh"
    fused = ir.node("FastGelu" if tanh else "BiasGelu", [matmul.outputs[0], c], domain=ORT, name=gelu.name)
    return replace_nodes([node, gelu], gelu, fused)


RULES = (ort_gelu, bias_gelu, skip_layernorm, gemm_bias_gelu)
