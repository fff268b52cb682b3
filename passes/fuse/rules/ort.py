"""onnxruntime contrib-op fusions, only with ``fuse(target=ort)``: the output then runs on onnxruntime
alone. GELU becomes com.microsoft Gelu/FastGelu on opsets before the standard Gelu, a bias Add in
front of it folds in (BiasGelu, FastGelu with bias), and a residual Add in front of a
LayerNormalization becomes SkipLayerNormalization. onnxruntime's CPU kernels take float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import (
    MS_DOMAIN,
    add_initializer,
    constant,
    fresh_name,
    is_standard,
    producer,
    rank,
    replace_nodes,
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
from onnxopt.passes.fuse.rules.norm import match_gelu


def _to_contrib_gelu(nodes: list[ir.Node], x: ir.Value, approximate: str) -> bool:
    op_type = "FastGelu" if approximate == "tanh" else "Gelu"
    return replace_with(nodes, nodes[-1], op_type, [x], domain=MS_DOMAIN)


@rule(
    "ort_gelu",
    ("Erf", "Tanh"),
    "GELU written with Erf or Tanh → com.microsoft Gelu / FastGelu (before opset 20)",
    rewrite=_to_contrib_gelu,
    target="ort",
)
def ort_gelu(node: ir.Node, ctx: Context) -> Match:
    if ctx.opset >= 20:
        return Match.fail("opset 20 has the standard Gelu (rule gelu)")
    found = match_gelu(node)
    if found and found.bindings["x"].dtype != ir.DataType.FLOAT:
        return Match.fail(f"x is {dtype(found.bindings['x'])}: the contrib Gelu takes FLOAT")
    return found


def _bias_of(add: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x, bias) when ``add`` adds a 1-D float32 constant along the last axis of x."""
    for x, b in (add.inputs, add.inputs[::-1]):
        c = constant(b)
        last = x.shape[-1] if x.shape is not None and len(x.shape) else None
        if (
            c is not None
            and c.ndim == 1
            and c.dtype == np.float32
            and x.dtype == ir.DataType.FLOAT
            and c.shape[0] == last
        ):
            return x, b
    return None


def _is_gelu(node: ir.Node) -> bool:
    """Whether ``node`` is an exact (erf) or tanh GELU of any domain, of one input."""
    if node.domain == MS_DOMAIN and node.op_type in ("Gelu", "FastGelu"):
        return len(node.inputs) == 1
    return is_standard(node, "Gelu")


def _gelu_reader(value: ir.Value) -> ir.Node | None:
    """The one reader of ``value`` if it is an exact (erf) or tanh GELU of any domain."""
    if not single_use(value):
        return None
    node = value.uses()[0].node
    return node if _is_gelu(node) else None


def _no_gelu_reader(value: ir.Value) -> str:
    """Why ``_gelu_reader(value)`` is None."""
    return not_read_by(value, "a GELU")


def _bias_gelu_op(gelu: ir.Node) -> str:
    tanh = gelu.op_type == "FastGelu" or gelu.attributes.get_string("approximate", "none") == "tanh"
    return "FastGelu" if tanh else "BiasGelu"


def _to_bias_gelu(node: ir.Node, gelu: ir.Node, inputs: list[ir.Value]) -> bool:
    return replace_with([node, gelu], gelu, _bias_gelu_op(gelu), inputs, domain=MS_DOMAIN)


@rule(
    "bias_gelu",
    ("Add",),
    "Add of a bias vector then GELU → com.microsoft BiasGelu (FastGelu with bias for tanh GELU)",
    rewrite=_to_bias_gelu,
    target="ort",
)
def bias_gelu(node: ir.Node, ctx: Context) -> Match:
    found = _bias_of(node)
    if found is None:
        return Match.fail("no input is a 1-D float32 constant along the last axis of a FLOAT x")
    gelu = _gelu_reader(node.outputs[0])
    if gelu is None:
        return Match.fail(_no_gelu_reader(node.outputs[0]))
    return Match.ok(node=node, gelu=gelu, inputs=list(found))


def _to_skip_layernorm(add: ir.Node, node: ir.Node, inputs: list[ir.Value]) -> bool:
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    attributes = {"epsilon": epsilon}
    return replace_with(
        [add, node], node, "SkipLayerNormalization", inputs, attributes, domain=MS_DOMAIN
    )


@rule(
    "skip_layernorm",
    ("LayerNormalization",),
    "residual Add then LayerNormalization over the last axis of 3-D tensors → com.microsoft "
    "SkipLayerNormalization",
    rewrite=_to_skip_layernorm,
    min_opset=17,
    target="ort",
)
def skip_layernorm(node: ir.Node, ctx: Context) -> Match:
    add = producer(node.inputs[0], "Add")
    if add is None:
        return Match.fail(not_made_by(node.inputs[0], "Add"))
    if not single_use(node.inputs[0]):
        return Match.fail(shared(node.inputs[0]))
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return Match.fail("the mean or inverse std-dev output is read")
    a, b = add.inputs
    if rank(a) != 3 or a.shape is None or b.shape is None or tuple(a.shape) != tuple(b.shape):
        return Match.fail("the Add's inputs are not 3-D of one shape")
    if a.dtype != ir.DataType.FLOAT:
        return Match.fail(f"the Add's inputs are {dtype(a)}: the contrib op takes FLOAT")
    if node.attributes.get_int("axis", -1) not in (-1, 2):
        return Match.fail("the LayerNormalization is not over the last axis")
    params = [v for v in node.inputs[1:] if v is not None]
    if any(constant(v) is None or constant(v).ndim != 1 for v in params):
        return Match.fail("scale or bias is not a 1-D constant")
    return Match.ok(add=add, node=node, inputs=[a, b, *params])


def _unfuse_gemm(node: ir.Node, gelu: ir.Node, transposed: bool) -> bool:
    a, b, c = node.inputs
    if transposed:
        b = add_initializer(
            node.graph, np.ascontiguousarray(constant(b).T), fresh_name(node.graph, b.name)
        )
    matmul = ir.node("MatMul", [a, b], name=node.name)
    node.graph.insert_before(node, matmul)
    matmul.outputs[0].shape, matmul.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
    fused = ir.node(_bias_gelu_op(gelu), [matmul.outputs[0], c], domain=MS_DOMAIN, name=gelu.name)
    return replace_nodes([node, gelu], gelu, fused)


@rule(
    "gemm_bias_gelu",
    ("Gemm",),
    "Gemm with a bias vector read only by a GELU → MatMul then com.microsoft BiasGelu "
    "(the reverse of matmul_add, where the Gemm hides the bias from the GELU)",
    rewrite=_unfuse_gemm,
    target="ort",
)
def gemm_bias_gelu(node: ir.Node, ctx: Context) -> Match:
    gelu = _gelu_reader(node.outputs[0])
    if gelu is None:
        return Match.fail(_no_gelu_reader(node.outputs[0]))
    if len(node.inputs) < 3:
        return Match.fail("the Gemm has no bias")
    if node.attributes.get_int("transA", 0):
        return Match.fail("the Gemm sets transA")
    if (
        node.attributes.get_float("alpha", 1.0) != 1.0
        or node.attributes.get_float("beta", 1.0) != 1.0
    ):
        return Match.fail("the Gemm's alpha or beta is not 1")
    a, b, c = node.inputs
    weight, bias = constant(b), constant(c)
    if weight is None or bias is None or weight.ndim != 2:
        return Match.fail("the weight is not a constant matrix, or the bias not a constant")
    if bias.dtype != np.float32 or a.dtype != ir.DataType.FLOAT:
        return Match.fail("the Gemm is not FLOAT: the contrib ops take FLOAT")
    transposed = node.attributes.get_int("transB", 0)
    if bias.shape != (weight.shape[0 if transposed else 1],):
        return Match.fail("the bias is not a vector over the output columns")
    return Match.ok(node=node, gelu=gelu, transposed=bool(transposed))


RULES = (ort_gelu, bias_gelu, skip_layernorm, gemm_bias_gelu)
