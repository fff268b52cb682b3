"""Graph helpers shared by the passes, on top of onnx-ir."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.passes.common import _c_api_utils

from onnxopt.errors import UsageError

STANDARD_DOMAINS = ("", "ai.onnx")
RTOL = 1e-4  # how close an exporter's constant must be to the exact one (float32 rounding, fewer digits)


def is_standard(node: ir.Node, *op_types: str) -> bool:
    return node.domain in STANDARD_DOMAINS and (not op_types or node.op_type in op_types)


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard-domain node that computes ``value``, if it is one of ``op_types`` (any when none)."""
    node = None if value is None else value.producer()
    return node if node is not None and is_standard(node, *op_types) else None


def single_use(value: ir.Value) -> bool:
    """Read by exactly one node and not a graph output: its producer may be rewritten for that reader."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer that a caller cannot override (it is not a graph input)."""
    if (
        value is None
        or value.producer() is not None
        or value.const_value is None
        or value.is_graph_input()
    ):
        return None
    try:
        return value.const_value.numpy()
    except Exception:  # a dtype numpy cannot hold, or unreadable external data
        return None


def scalar(value: ir.Value | None, like: ir.Value) -> float | None:
    """The value of a one-element constant that broadcasting against ``like`` cannot change the shape of."""
    c = constant(value)
    if c is None or c.size != 1 or (c.ndim and (rank(like) is None or c.ndim > rank(like))):
        return None
    return float(c.reshape(()))


def is_scalar(value: ir.Value | None, like: ir.Value, target: float, rtol: float = RTOL) -> bool:
    """Whether ``value`` is a one-element constant (see ``scalar``) within ``rtol`` of ``target``."""
    c = scalar(value, like)
    return c is not None and abs(c - target) <= rtol * abs(target)


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a commutative binary ``node`` that reads ``value``."""
    if node.inputs[0] is value:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is value else None


def only_reader(value: ir.Value, *op_types: str) -> ir.Node | None:
    """The one node that reads ``value``, if it is one of ``op_types`` and ``value`` is no graph output."""
    if not single_use(value):
        return None
    reader = value.uses()[0].node
    return reader if producer(reader.outputs[0], *op_types) is reader else None


def lift_constants(model: ir.Model) -> bool:
    """Constant nodes become initializers, so that every constant is found the same way."""
    return common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
        model
    ).modified


def remove_unused(model: ir.Model) -> bool:
    return common.RemoveUnusedNodesPass()(model).modified


def unique_names(model: ir.Model) -> None:
    """Names of new values are unique per graph; onnxruntime wants them unique across subgraphs too."""
    common.NameFixPass()(model)


def infer_shapes(model: ir.Model) -> None:
    """Refresh value shapes and types; a model onnx cannot infer keeps the ones it has.

    Runs onnx's inference the way onnx-ir's ShapeInferencePass does, but merges whole types:
    that pass sets only the element type, which turns sequence and optional values into tensors.
    """
    try:
        inferred = _c_api_utils.call_onnx_api(
            lambda proto: onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=False, data_prop=True
            ),
            model,
        )
    except Exception:
        return
    inferred_model = ir.serde.deserialize_model(inferred)
    for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs()):
        known = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            source = known.get(name)
            if source is None or source.type is None:
                continue
            if value.type is None or value.type == source.type:
                value.type = source.type
                if source.shape is not None:
                    value.shape = source.shape


def strictly_valid(model: ir.Model) -> bool:
    """Whether onnx's strict shape inference, which onnxruntime applies on load, accepts the model."""
    try:
        _c_api_utils.call_onnx_api(
            lambda proto: onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=True
            ),
            model,
        )
    except Exception:
        return False
    return True


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str | None = None) -> ir.Value:
    tensor = ir.tensor(array)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def fresh_name(graph: ir.Graph, base: str | None, suffix: str = "fused") -> str:
    """``base.fused``, ``base.fused.1``, ...: a name no initializer of ``graph`` has yet."""
    name = f"{base or 'tensor'}.{suffix}"
    taken = graph.initializers
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}.{i}"
    return candidate


def replace_with_constant(value: ir.Value, array: np.ndarray) -> bool:
    """Make every use of ``value`` (a node output) read an initializer holding ``array``, under the same name."""
    graph = value.graph
    if graph is None or array.dtype.kind in "OSUV":
        return False
    try:
        if value.dtype is not None and ir.DataType.from_numpy(array.dtype) != value.dtype:
            return False
    except TypeError:
        return False
    name = value.name
    value.name = f"{name}__folded"
    constant_value = add_initializer(
        graph, array if array.flags.c_contiguous else array.copy(), name
    )
    value.replace_all_uses_with(constant_value, replace_graph_outputs=True)
    return True


def can_take_name(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether ``value`` may be renamed to become an output of ``graph``."""
    return value.producer() is not None and value.graph is graph and not value.is_graph_output()


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every use of ``old`` read ``new``. A graph output keeps its name: ``new`` takes it over,
    or, where ``new`` cannot be renamed (a graph input, an initializer, a value of an outer graph, or
    another graph output), an Identity node carries it."""
    graph = old.graph
    if not old.is_graph_output():
        old.replace_all_uses_with(new)
        return
    name = old.name
    old.name = f"{name}__replaced"
    if can_take_name(new, graph):
        new.name = name
        # The graph output's declared type and shape are the contract; they hold for ``new`` too.
        new.type = old.type or new.type
        new.shape = old.shape if old.shape is not None else new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        return
    carrier = ir.Value(name=name, type=old.type or new.type, shape=old.shape or new.shape)
    graph.append(ir.node("Identity", [new], outputs=[carrier]))
    for i, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[i] = carrier
    old.replace_all_uses_with(new)


def replace_nodes(nodes: list[ir.Node], end: ir.Node, fused: ir.Node) -> bool:
    """``fused`` takes over ``end``'s output; ``nodes`` (the pattern, ``end`` included) go."""
    graph = end.graph
    graph.insert_after(end, fused)
    out, old = fused.outputs[0], end.outputs[0]
    out.shape, out.type = old.shape, old.type
    replace_value(old, out)
    graph.remove(nodes, safe=True)
    return True


MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops


def axes_of(node: ir.Node) -> list[int] | None:
    """The constant axes of a node: its ``axes`` input (Squeeze/Unsqueeze 13+, Reduce* 18+), else its
    ``axes`` attribute; None where they are not constant or not given."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.ravel()]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.as_ints())


# Ops that move no element: they change only the shape.
SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def shape_chain(node: ir.Node) -> list[ir.Node]:
    """The Reshape/Flatten/Squeeze/Unsqueeze nodes that ``node`` reads the result of through one
    another, first to last and ``node`` itself last, each read only by the next (nodes of an outer
    graph included)."""
    chain = [node]
    while True:
        prev = producer(chain[0].inputs[0], *SHAPE_OPS)
        if prev is None or not single_use(chain[0].inputs[0]):
            return chain
        chain.insert(0, prev)


def regexes(patterns: list[str], option: str, where: str) -> list[re.Pattern]:
    """``patterns`` compiled; a bad one is the user's error, named by ``option`` and ``where``."""
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise UsageError(f"{where}: {option} has a bad regex: {e}") from None
