"""Shape computations that collapse: a Reshape whose target shape is assembled at run time from the
dims of its own input (Shape → Gather/Slice → Cast → Unsqueeze → Concat, as exporters emit for
dynamic batch and sequence dims) gets a constant shape, with 0 where a dim is copied and -1 for the
one dim left to infer. onnxruntime's ReshapeFusion does the same when it loads a model. A chain of
Reshape/Flatten/Squeeze/Unsqueeze whose result has a static shape becomes one Reshape."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import (
    SHAPE_OPS,
    add_initializer,
    axes_of,
    constant,
    fresh_name,
    is_standard,
    producer,
    rank,
    replace_value,
    shape_chain,
    single_use,
)
from onnxopt.passes.fuse.rule import Context, Match, dtype, rule

INTS = (ir.DataType.INT64, ir.DataType.INT32)
# An element of a shape vector: a known integer, or dim ``index`` of ``value``.
Element = "int | tuple[ir.Value, int]"
MAX_DEPTH = 12


def elements(value: ir.Value | None, depth: int = 0) -> list | None:
    """What each element of a 1-D (or scalar) integer tensor is, traced through shape ops."""
    if value is None or depth > MAX_DEPTH:
        return None
    known = constant(value)
    if known is not None:
        return (
            [int(v) for v in known.ravel()]
            if known.dtype.kind in "iu" and known.ndim <= 1
            else None
        )
    node = producer(value)
    if node is None:
        return None
    op, inputs = node.op_type, node.inputs
    if op == "Shape":
        r = rank(inputs[0])
        if r is None:
            return None
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", r)
        return [(inputs[0], i) for i in range(r)[slice(start, end)]]
    if op in ("Cast", "Identity"):
        if op == "Cast" and node.attributes.get_int("to", 0) not in (
            ir.DataType.INT64,
            ir.DataType.INT32,
        ):
            return None
        return elements(inputs[0], depth + 1)
    if op in ("Unsqueeze", "Squeeze", "Reshape"):
        inner = elements(inputs[0], depth + 1)
        return inner if inner is not None and len(inner) == 1 else None
    if op == "Concat":
        parts = [elements(v, depth + 1) for v in inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        source, index = elements(inputs[0], depth + 1), constant(inputs[1])
        if source is None or index is None or index.ndim > 1:
            return None
        try:
            return [source[int(i)] for i in index.ravel()]
        except IndexError:
            return None
    if op == "Slice":
        source = elements(inputs[0], depth + 1)
        args = [constant(v) if v is not None else None for v in inputs[1:5]]
        if source is None or args[0] is None or args[1] is None:
            return None
        axes = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1, np.int64)
        steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(1, np.int64)
        if axes.size != 1 or int(axes.ravel()[0]) not in (0, -1):
            return None
        return source[
            slice(int(args[0].ravel()[0]), int(args[1].ravel()[0]), int(steps.ravel()[0]))
        ]
    return None


def same_dim(source: ir.Value, j: int, target: ir.Value, i: int) -> bool:
    """Whether dim ``j`` of ``source`` is dim ``i`` of ``target`` at run time."""
    if source is target:
        return i == j
    if (
        source.shape is None
        or target.shape is None
        or j >= len(source.shape)
        or i >= len(target.shape)
    ):
        return False
    a, b = source.shape[j], target.shape[i]
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def static_dim(source: ir.Value, j: int) -> int | None:
    if source.shape is None or j >= len(source.shape):
        return None
    d = source.shape[j]
    return d if isinstance(d, int) else None


def _set_shape(node: ir.Node, shape: list[int]) -> bool:
    graph, old = node.graph, node.inputs[1]
    value = add_initializer(graph, np.array(shape, np.int64), fresh_name(graph, old.name))
    node.replace_input_with(1, value)
    return True


@rule(
    "reshape_shape",
    ("Reshape",),
    "a Reshape's run-time shape built from its input's own dims → a constant with 0 and -1",
    rewrite=_set_shape,
)
def reshape_shape(node: ir.Node, ctx: Context) -> Match:
    x, shape = node.inputs[0], node.inputs[1]
    if constant(shape) is not None:
        return Match.fail("the shape is a constant already")
    if shape is None or shape.dtype not in INTS:
        return Match.fail(f"the shape is {dtype(shape)}, not INT64 or INT32")
    parts = elements(shape)
    if parts is None:
        return Match.fail("the shape is not built from constants and dims by shape ops")
    copy_allowed = not node.attributes.get_int("allowzero", 0)
    resolved, unknown = [], 0
    for i, e in enumerate(parts):
        if isinstance(e, tuple):
            if copy_allowed and same_dim(*e, x, i):
                e = 0
            else:
                e = static_dim(*e)
        if e is None or e == -1:
            unknown += 1
            e = -1
        elif e == 0 and not copy_allowed:
            return Match.fail("a 0 in the shape means 0 itself (allowzero=1)")
        resolved.append(e)
    if unknown > 1:
        return Match.fail(f"{unknown} dims are unknown: one -1 can stand for one alone")
    return Match.ok(node=node, shape=resolved)


# Reshape / Flatten / Squeeze / Unsqueeze chains

CHAIN = SHAPE_OPS


def keeps_batch(node: ir.Node) -> bool:
    """Whether dim 0 of ``node``'s output is dim 0 of its input, whatever size that is."""
    r = rank(node.inputs[0])
    if not r:
        return False
    if node.op_type == "Flatten":
        axis = node.attributes.get_int("axis", 1)
        return (axis + r if axis < 0 else axis) == 1
    if node.op_type == "Reshape":
        shape = constant(node.inputs[1])
        return (
            shape is not None
            and shape.size > 0
            and int(shape.ravel()[0]) == 0
            and not node.attributes.get_int("allowzero", 0)
        )
    axes = axes_of(node)
    if not axes:  # Squeeze without axes drops every dim of size 1, perhaps dim 0
        return False
    out_rank = r + len(axes) if node.op_type == "Unsqueeze" else r
    return all(a % out_rank != 0 for a in axes)


def chain_to(node: ir.Node) -> list[ir.Node]:
    """The chain ops of ``node``'s graph that lead to ``node``, first to last, each read only by the
    next (``shape_chain`` without the nodes of an outer graph, which lead into this one)."""
    return [n for n in shape_chain(node) if n.graph is node.graph]


def chain_target(chain: list[ir.Node]) -> list[int] | None:
    """The shape one Reshape of the chain's input takes to give its output: static, or static but for a
    batch dim that every op keeps (0: copied). None for a lone op, or a dynamic or empty result."""
    shape = chain[-1].outputs[0].shape
    if len(chain) < 2 or shape is None:
        return None
    dims = list(shape)
    if all(isinstance(d, int) for d in dims):
        target = dims
    elif dims and all(isinstance(d, int) for d in dims[1:]) and all(keeps_batch(n) for n in chain):
        target = [0, *dims[1:]]
    else:
        return None
    return target if all(d > 0 for d in dims if isinstance(d, int)) else None


def _extended_by(node: ir.Node) -> ir.Node | None:
    """The reader that the chain through ``node`` goes on to, where that reader can end it instead."""
    out = node.outputs[0]
    if not single_use(out):
        return None
    reader = out.uses()[0].node
    extends = (
        is_standard(reader, *CHAIN)
        and reader.inputs[0] is out
        and reader.graph is node.graph
        and chain_target([*chain_to(node), reader]) is not None
    )
    return reader if extends else None


def _to_reshape(node: ir.Node, chain: list[ir.Node], target: list[int]) -> bool:
    graph, out = node.graph, node.outputs[0]
    shape = add_initializer(
        graph, np.array(target, np.int64), fresh_name(graph, f"{out.name}.shape")
    )
    reshape = ir.node("Reshape", [chain[0].inputs[0], shape], name=node.name)
    graph.insert_after(node, reshape)
    reshape.outputs[0].shape, reshape.outputs[0].type = out.shape, out.type
    replace_value(out, reshape.outputs[0])
    graph.remove(chain, safe=True)
    return True


@rule(
    "reshape_chain",
    CHAIN,
    "a chain of Reshape/Flatten/Squeeze/Unsqueeze with a static result shape "
    "(or static but for a kept batch dim) → one Reshape",
    rewrite=_to_reshape,
    min_opset=5,
)
def reshape_chain(node: ir.Node, ctx: Context) -> Match:
    reader = _extended_by(node)
    if reader is not None:  # the longest chain is fused from its end
        return Match.fail(f"the chain goes on to {reader.op_type} {reader.name}, which ends it")
    chain = chain_to(node)
    if len(chain) < 2:
        return Match.fail(f"no {'/'.join(CHAIN)} feeds it, read only there")
    target = chain_target(chain)
    if target is None:
        return Match.fail("the result shape is not static (nor static but for a batch dim kept)")
    return Match.ok(node=node, chain=chain, target=target)


RULES = (reshape_shape, reshape_chain)
