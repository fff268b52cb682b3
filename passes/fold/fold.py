"""Constant folding: evaluate in onnxruntime every node whose inputs are all constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.passbase import Option, OptPass, Outcome
from onnxopt.passes._common import (
    constant,
    infer_shapes,
    is_standard,
    lift_constants,
    remove_unused,
    replace_value,
    replace_with_constant,
    static_shape,
    strictly_valid,
)

# Folding these would change what the model means: fresh random numbers on every run, or
# quantization boundaries that runtimes look for as patterns.
NEVER_FOLD = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "Constant",
    "If",
    "Loop",
    "Scan",
    "SequenceMap",
}


class Fold(OptPass):
    name = "fold"
    summary = (
        "Constant folding: evaluate nodes whose inputs are all constant, static shape computations "
        "and constant If."
    )
    options = (
        Option(
            "size_limit",
            int,
            1 << 20,
            "largest result folded, in elements; bigger ones stay computed",
        ),
    )
    fixed_point = True

    def call(self, model: ir.Model) -> Outcome:
        modified = lift_constants(model)
        infer_shapes(model)
        for graph in list(model.graphs()):
            modified |= fold_static_shapes(graph)
            modified |= fold_graph(graph, model, self.size_limit)
        modified |= inline_constant_ifs(model)
        if modified:
            remove_unused(model)
        return Outcome(model, modified)


def fold_graph(graph: ir.Graph, model: ir.Model, size_limit: int) -> bool:
    nodes = foldable_nodes(graph, size_limit)
    if not nodes:
        return False
    # Results known to be too large are computed inside the session but not fetched.
    wanted = {v for n in nodes for v in n.outputs if v.name and not _too_large(v, size_limit)}
    results = evaluate(nodes, model, wanted)
    members = set(nodes)
    kept: set[ir.Node] = set()
    folded = False
    for node in reversed(nodes):
        for value in node.outputs:
            needed = value.is_graph_output() or any(
                use.node not in members or use.node in kept for use in value.uses()
            )
            if not needed:
                continue
            array = results.get(value)
            if array is None or array.size > size_limit or not replace_with_constant(value, array):
                kept.add(node)
                break
            folded = True
    return folded


def foldable_nodes(graph: ir.Graph, size_limit: int) -> list[ir.Node]:
    """Nodes computable from constants alone, in topological order."""
    nodes: list[ir.Node] = []
    known: set[ir.Value] = set()
    for node in graph:
        if (
            not is_standard(node)
            or node.op_type in NEVER_FOLD
            or any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())
        ):
            continue
        if not all(v is None or v in known or constant(v) is not None for v in node.inputs):
            continue
        nodes.append(node)
        known.update(node.outputs)
    return nodes


def _too_large(value: ir.Value, size_limit: int) -> bool:
    shape = static_shape(value)
    return shape is not None and int(np.prod(shape)) > size_limit


def evaluate(
    nodes: list[ir.Node], model: ir.Model, wanted: set[ir.Value]
) -> dict[ir.Value, np.ndarray]:
    """Evaluate the nodes in one onnxruntime session; node by node when the batch fails."""
    try:
        return _run(nodes, model, wanted)
    except Exception:
        pass
    results: dict[ir.Value, np.ndarray] = {}
    for node in nodes:
        inputs = [v for v in node.inputs if v is not None and v.producer() is not None]
        if not all(v in results for v in inputs):
            continue
        try:
            results.update(_run([node], model, set(node.outputs), {v: results[v] for v in inputs}))
        except Exception:
            continue
    return results


def _run(nodes: list[ir.Node], model: ir.Model, wanted: set[ir.Value], known: dict | None = None):
    known = known or {}
    produced = {v for n in nodes for v in n.outputs}
    initializers, seen = [], set()
    for node in nodes:
        for value in node.inputs:
            if value is None or value in produced or value in seen:
                continue
            seen.add(value)
            array = known[value] if value in known else constant(value)
            initializers.append(onnx.numpy_helper.from_array(array, value.name))
    outputs = [v for n in nodes for v in n.outputs if v in wanted and v.name]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "fold",
        [],
        [onnx.ValueInfoProto(name=v.name) for v in outputs],
        initializer=initializers,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version, 4))
    session = runtime.session(proto.SerializeToString())
    arrays = session.run([v.name for v in outputs], {})
    return {v: a for v, a in zip(outputs, arrays) if isinstance(a, np.ndarray)}


# -- shapes known before running -------------------------------------------------------------


def fold_static_shapes(graph: ir.Graph) -> bool:
    """Shape/Size of statically shaped values, and Gather/Slice of the static part of a Shape."""
    changed = False
    for node in list(graph):
        if not is_standard(node):
            continue
        dims = None
        if node.op_type == "Shape":
            dims = shape_dims(node)
        elif node.op_type == "Size":
            shape = static_shape(node.inputs[0])
            dims = None if shape is None else np.array(int(np.prod(shape)), dtype=np.int64)
        elif node.op_type in ("Gather", "Slice") and node.inputs[0] is not None:
            source = node.inputs[0].producer()
            if source is not None and is_standard(source, "Shape"):
                dims = select_dims(node, shape_dims(source, allow_symbolic=True))
        if dims is not None and replace_with_constant(
            node.outputs[0], np.asarray(dims, dtype=np.int64)
        ):
            changed = True
    return changed


def shape_dims(node: ir.Node, allow_symbolic: bool = False) -> np.ndarray | None:
    """The dims a Shape node returns (object array with None for unknown dims when allowed)."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in shape]
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    dims = dims[slice(*_clamp(start, end, len(dims)))]
    if None in dims and not allow_symbolic:
        return None
    return np.array(dims, dtype=object if allow_symbolic else np.int64)


def _clamp(start: int, end: int, n: int) -> tuple[int, int]:
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    return min(max(start, 0), n), min(max(end, 0), n)


def select_dims(node: ir.Node, dims: np.ndarray | None) -> np.ndarray | None:
    """Apply a Gather or Slice with constant indices to known shape dims."""
    if dims is None:
        return None
    try:
        if node.op_type == "Gather":
            indices = constant(node.inputs[1])
            if indices is None or node.attributes.get_int("axis", 0) != 0:
                return None
            picked = dims[indices]
        else:
            args = [constant(v) if v is not None else None for v in node.inputs[1:]]
            if (
                any(a is None for a, v in zip(args, node.inputs[1:]) if v is not None)
                or len(args) < 2
            ):
                return None
            starts, ends = args[0], args[1]
            axes = args[2] if len(args) > 2 and args[2] is not None else np.array([0])
            steps = args[3] if len(args) > 3 and args[3] is not None else np.ones_like(starts)
            if starts.size != 1 or list(axes.ravel()) not in ([0], [-1]):
                return None
            picked = dims[
                slice(int(starts[0]), int(max(min(ends[0], 2**62), -(2**62))), int(steps[0]))
            ]
    except (IndexError, ValueError, TypeError):
        return None
    if any(d is None for d in np.ravel(picked)):
        return None
    return np.asarray(picked, dtype=np.int64)


# -- If with a constant condition --------------------------------------------------------------


def inline_constant_ifs(model: ir.Model) -> bool:
    """Replace each If whose condition is constant by the branch it takes.

    An If can hide shapes that its consumers' schemas reject (ONNX's own AffineGrid function feeds
    [1]-shaped tensors to Range through one); onnxruntime would then refuse the inlined model. So
    the inlining is tried on a copy first and kept only if strict shape inference still accepts it.
    """
    if not any(_constant_if(n) for g in model.graphs() for n in g):
        return False
    trial = model.clone()
    for graph in list(trial.graphs()):
        _inline_ifs(graph)
    if not strictly_valid(trial) and strictly_valid(model):
        return False
    return any([_inline_ifs(graph) for graph in list(model.graphs())])


def _constant_if(node: ir.Node) -> bool:
    if not is_standard(node, "If"):
        return False
    cond = constant(node.inputs[0])
    return cond is not None and cond.size == 1


def _inline_ifs(graph: ir.Graph) -> bool:
    changed = False
    for node in list(graph):
        if node.graph is graph and _constant_if(node):
            cond = bool(constant(node.inputs[0]).ravel()[0])
            inline_branch(
                graph, node, node.attributes["then_branch" if cond else "else_branch"].as_graph()
            )
            changed = True
    return changed


def inline_branch(graph: ir.Graph, node: ir.Node, branch: ir.Graph) -> None:
    """Move the branch's nodes and initializers before the If node and route its outputs out."""
    results = list(branch.outputs)
    branch.outputs.clear()  # an initializer that is also a branch output cannot leave the branch
    for value in list(branch.initializers.values()):
        branch.initializers.pop(value.name)
        while value.name in graph.initializers:
            value.name = f"{value.name}_inlined"
        graph.register_initializer(value)
    branch_nodes = list(branch)
    branch.remove(branch_nodes)
    graph.insert_before(node, branch_nodes)
    for old, new in zip(node.outputs, results):
        replace_value(old, new)
    graph.remove(node, safe=True)
