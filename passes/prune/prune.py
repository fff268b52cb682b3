"""Remove what does nothing: dead nodes and tensors, no-op ops, chains that collapse, duplicates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.passbase import OptPass, Outcome
from onnxopt.passes._common import (
    axes_of,
    can_take_name,
    constant,
    infer_shapes,
    is_standard,
    lift_constants,
    producer,
    rank,
    replace_value,
    shape_chain,
    single_use,
)

BIG = 2**31 - 1  # "to the end" in exporters' Slice ends; anything at least this large clamps


class Prune(OptPass):
    name = "prune"
    summary = "Remove dead nodes and tensors, Identity/Dropout, no-op ops, collapsible chains, duplicates."
    fixed_point = True

    def call(self, model: ir.Model) -> Outcome:
        modified = lift_constants(model)
        infer_shapes(model)
        while sweep(model):
            modified = True
        for cleanup in (
            common.RemoveUnusedNodesPass(),
            DeduplicateInitializers(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified |= cleanup(model).modified
        return Outcome(model, modified)


def sweep(model: ir.Model) -> bool:
    changed = False
    for graph in list(model.graphs()):
        for node in list(graph):
            if node.graph is graph:
                changed |= simplify(node)
    return changed


class DeduplicateInitializers(common.DeduplicateHashedInitializersPass):
    """onnx-ir's hashed deduplication, skipped when the model holds the same tensors as when it last ran:
    hashing every weight again in each fixed-point round costs more than the rest of the pass."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tensors = frozenset(
            id(v.const_value) for g in model.graphs() for v in g.initializers.values()
        )
        if model.meta.get("onnxopt.deduplicated") == tensors:
            return ir.passes.PassResult(model, False)
        result = super().call(model)
        model.meta["onnxopt.deduplicated"] = frozenset(
            id(v.const_value) for g in model.graphs() for v in g.initializers.values()
        )
        return result


def simplify(node: ir.Node) -> bool:
    """Apply the first rule that fits the node; rules return the value that replaces its output."""
    if not is_standard(node):
        return False
    for rule in RULES.get(node.op_type, ()):
        replacement = rule(node)
        if replacement is True:
            return True
        if replacement is not None:
            replace_value(node.outputs[0], replacement)
            if not any(v.uses() or v.is_graph_output() for v in node.outputs):
                node.graph.remove(node, safe=True)
            return True
    return False


# -- helpers -----------------------------------------------------------------------------------


def normalize(axes: list[int], r: int | None) -> list[int] | None:
    if any(a < 0 for a in axes):
        if r is None:
            return None
        axes = [a + r if a < 0 else a for a in axes]
    return sorted(axes)


def dims(value: ir.Value) -> list[int | None] | None:
    return None if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]


# -- no-op rules: each returns the input that the node passes through unchanged ----------------


def identity(node: ir.Node):
    # onnx-ir's IdentityEliminationPass renames a value that is already a graph output (an Identity
    # between two outputs of a Scan body), so this rule stands in for it.
    x, y = node.inputs[0], node.outputs[0]
    if y.is_graph_output() and not can_take_name(x, y.graph):
        return None
    return x


def dropout(node: ir.Node):
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and (constant(training) is None or bool(constant(training))):
        return None
    if (
        len(node.outputs) > 1
        and node.outputs[1].uses()
        or len(node.outputs) > 1
        and node.outputs[1].is_graph_output()
    ):
        return None
    return node.inputs[0]


def cast(node: ir.Node):
    x = node.inputs[0]
    target = node.attributes.get_int("to")
    return x if x.dtype is not None and target == x.dtype.value else None


def cast_like(node: ir.Node):
    x, like = node.inputs[0], node.inputs[1]
    return x if x.dtype is not None and x.dtype == like.dtype else None


def reshape(node: ir.Node):
    x, target = node.inputs[0], constant(node.inputs[1])
    if target is None or node.attributes.get_int("allowzero", 0):
        return None
    have = dims(x)
    if have is None or len(have) != target.size:
        return None
    unmatched = 0
    for want, dim in zip(target.tolist(), have):
        if want == 0 or (dim is not None and want == dim):
            continue
        if want == -1:
            unmatched += 1
            continue
        return None
    return x if unmatched <= 1 else None


def expand(node: ir.Node):
    x, target = node.inputs[0], constant(node.inputs[1])
    have = dims(x)
    if target is None or have is None or target.size > len(have):
        return None
    aligned = have[len(have) - target.size :]
    return (
        x
        if all(t == 1 or (d is not None and t == d) for t, d in zip(target.tolist(), aligned))
        else None
    )


def slice_(node: ir.Node):
    x = node.inputs[0]
    args = [constant(v) if v is not None else None for v in node.inputs[1:5]]
    if len(args) < 2 or any(a is None for a, v in zip(args, node.inputs[1:5]) if v is not None):
        return None
    starts, ends = args[0].ravel().tolist(), args[1].ravel().tolist()
    have = dims(x)
    axes = (
        args[2].ravel().tolist()
        if len(args) > 2 and args[2] is not None
        else list(range(len(starts)))
    )
    steps = args[3].ravel().tolist() if len(args) > 3 and args[3] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if start != 0 or step != 1:
            return None
        if end >= BIG:
            continue
        size = None if have is None or not -len(have) <= axis < len(have) else have[axis]
        if size is None or end < size:
            return None
    return x


def pad(node: ir.Node):
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        pads = constant(node.inputs[1])
    else:
        attr = node.attributes.get("pads")
        pads = None if attr is None else np.array(attr.as_ints())
    return node.inputs[0] if pads is not None and not pads.any() else None


def transpose(node: ir.Node):
    perm = node.attributes.get("perm")
    if perm is None:
        return node.inputs[0] if rank(node.inputs[0]) in (0, 1) else None
    perm = list(perm.as_ints())
    return node.inputs[0] if perm == sorted(perm) else None


def single_input(node: ir.Node):
    return node.inputs[0] if len(node.inputs) == 1 else None


def split(node: ir.Node):
    return node.inputs[0] if len(node.outputs) == 1 else None


IDENTITY_ELEMENT = {"Add": (0, True), "Mul": (1, True), "Sub": (0, False), "Div": (1, False)}


def arithmetic(node: ir.Node):
    """x+0, 0+x, x-0, x*1, 1*x, x/1 where broadcasting keeps x's shape and type."""
    element, commutes = IDENTITY_ELEMENT[node.op_type]
    sides = [(node.inputs[0], node.inputs[1])] + (
        [(node.inputs[1], node.inputs[0])] if commutes else []
    )
    for x, c in sides:
        value = constant(c)
        if value is None or value.size == 0 or not np.all(value == element):
            continue
        if x.dtype is None or x.dtype != c.dtype or x.dtype != node.outputs[0].dtype:
            continue
        have = dims(x)
        if value.ndim == 0 or (
            have is not None
            and value.ndim <= len(have)
            and all(c == 1 or c == d for c, d in zip(value.shape, have[len(have) - value.ndim :]))
        ):
            return x
    return None


# -- chains that collapse ----------------------------------------------------------------------


def transpose_pair(node: ir.Node):
    inner = producer(node.inputs[0], "Transpose")
    outer_perm, inner_perm = node.attributes.get("perm"), inner and inner.attributes.get("perm")
    if inner is None or outer_perm is None or inner_perm is None:
        return None
    q = [inner_perm.as_ints()[i] for i in outer_perm.as_ints()]
    if q == sorted(q):
        return inner.inputs[0]
    if not single_use(inner.outputs[0]):
        return None
    node.replace_input_with(0, inner.inputs[0])
    node.attributes["perm"] = ir.AttrInt64s("perm", q)
    return True


def reshape_chain(node: ir.Node):
    """Reshape(shape-only ops(x), s) = Reshape(x, s) when s copies no dims from its input: the
    Reshape reads the start of its ``shape_chain`` (fuse's reshape_chain rule walks the same chain,
    to replace one that ends in any shape op and has a static result)."""
    target = constant(node.inputs[1])
    if target is None or (0 in target.tolist() and not node.attributes.get_int("allowzero", 0)):
        return None
    chain = shape_chain(node)
    if len(chain) < 2:
        return None
    node.replace_input_with(0, chain[0].inputs[0])
    return True


def squeeze_pair(node: ir.Node):
    """Squeeze(Unsqueeze(x, a), a) = x and Unsqueeze(Squeeze(x, a), a) = x."""
    other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    inner = producer(node.inputs[0], other)
    if inner is None:
        return None
    outer_axes, inner_axes = axes_of(node), axes_of(inner)
    if outer_axes is None or inner_axes is None:
        return None
    x = inner.inputs[0]
    middle_rank = (
        None
        if rank(x) is None
        else rank(x) + (len(inner_axes) if other == "Unsqueeze" else -len(inner_axes))
    )
    # Unsqueeze axes count in its output's rank; Squeeze axes in its input's.
    if other == "Unsqueeze":
        a, b = normalize(inner_axes, middle_rank), normalize(outer_axes, middle_rank)
    else:
        a, b = normalize(inner_axes, rank(x)), normalize(outer_axes, rank(x))
    return x if a is not None and a == b else None


# Casting A -> B keeps every value when B holds all of A's values exactly (NaN and infinity too).
_EXACT_WIDENING = {
    ir.DataType.BOOL: "all",
    ir.DataType.UINT8: {
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.FLOAT16,
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
    },
    ir.DataType.INT8: {
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.FLOAT16,
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
    },
    ir.DataType.UINT16: {
        ir.DataType.UINT32,
        ir.DataType.UINT64,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
    },
    ir.DataType.INT16: {
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.FLOAT,
        ir.DataType.DOUBLE,
    },
    ir.DataType.UINT32: {ir.DataType.UINT64, ir.DataType.INT64, ir.DataType.DOUBLE},
    ir.DataType.INT32: {ir.DataType.INT64, ir.DataType.DOUBLE},
    ir.DataType.FLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.BFLOAT16: {ir.DataType.FLOAT, ir.DataType.DOUBLE},
    ir.DataType.FLOAT: {ir.DataType.DOUBLE},
}


def exact_cast(source: ir.DataType, target: ir.DataType) -> bool:
    widening = _EXACT_WIDENING.get(source, set())
    return source == target or widening == "all" or target in widening


def cast_chain(node: ir.Node):
    """Cast(Cast(x, B), C) = Cast(x, C) when x's type fits B exactly; = x when C is x's type."""
    inner = producer(node.inputs[0], "Cast")
    if inner is None:
        return None
    x = inner.inputs[0]
    middle = ir.DataType(inner.attributes.get_int("to"))
    if (
        x.dtype is None
        or not exact_cast(x.dtype, middle)
        or middle in (ir.DataType.BOOL, ir.DataType.STRING)
    ):
        return None
    if node.attributes.get_int("to") == x.dtype.value:
        return x
    if not single_use(inner.outputs[0]):
        return None
    node.replace_input_with(0, x)
    return True


Rule = Callable[[ir.Node], "ir.Value | bool | None"]
RULES: dict[str, tuple[Rule, ...]] = {
    "Identity": (identity,),
    "Dropout": (dropout,),
    "Cast": (cast, cast_chain),
    "CastLike": (cast_like,),
    "Reshape": (reshape, reshape_chain),
    "Expand": (expand,),
    "Slice": (slice_,),
    "Pad": (pad,),
    "Transpose": (transpose, transpose_pair),
    "Concat": (single_input,),
    "Split": (split,),
    "Add": (arithmetic,),
    "Mul": (arithmetic,),
    "Sub": (arithmetic,),
    "Div": (arithmetic,),
    "Squeeze": (squeeze_pair,),
    "Unsqueeze": (squeeze_pair,),
}
