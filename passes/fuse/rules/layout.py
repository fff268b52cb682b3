"""Layout fusions: a zero Pad of the spatial axes goes into the pads of the Conv or AveragePool that
reads it (a -inf Pad into MaxPool); a Transpose of a Gemm input becomes transA/transB; a Transpose
of a 2-D MatMul input makes it a Gemm, and a Transpose of a constant MatMul input is folded."""

from __future__ import annotations

import math

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

GEMM_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
POOLS = ("AveragePool", "MaxPool")

# Pad → Conv / AveragePool / MaxPool


def _axes(values: list[int], r: int) -> list[int] | None:
    """Axes counted from the front, if each is in range and none repeats."""
    axes = [a + r if a < 0 else a for a in values]
    return axes if all(0 <= a < r for a in axes) and len(set(axes)) == len(axes) else None


def _input_pads(pad: ir.Node) -> list[int] | None:
    """The pads of an opset 11+ Pad over every axis of its input, with its optional axes (18+) spread out."""
    pads = constant(pad.inputs[1])
    if pads is None or pads.ndim != 1 or pads.dtype.kind not in "iu":
        return None
    pads = [int(p) for p in pads]
    axes_input = pad.inputs[3] if len(pad.inputs) > 3 else None
    if axes_input is None:
        return pads if len(pads) % 2 == 0 else None
    known, r = constant(axes_input), rank(pad.inputs[0])
    axes = (
        None if known is None or r is None or known.ndim != 1 else _axes([int(a) for a in known], r)
    )
    if axes is None or len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a], full[r + a] = pads[i], pads[len(axes) + i]
    return full


def _fill(pad: ir.Node) -> float | None:
    """The value a constant-mode Pad fills with: an attribute before opset 11, an optional input since."""
    if len(pad.inputs) < 2:
        return pad.attributes.get_float("value", 0.0)
    value = pad.inputs[2] if len(pad.inputs) > 2 else None
    if value is None:
        return 0.0
    known = constant(value)
    return None if known is None or known.size != 1 else float(known.reshape(()))


def spatial_pads(pad: ir.Node) -> tuple[list[int], float] | None:
    """The non-negative pads of a constant-mode ``pad`` that touches no axis but the spatial ones
    (axis 2 on), as [x1_begin, ..., x1_end, ...] over those axes, and its fill value."""
    if pad.attributes.get_string("mode", "constant") != "constant":
        return None
    if len(pad.inputs) >= 2:
        pads = _input_pads(pad)
    else:
        pads = pad.attributes.get_ints("pads", None) or pad.attributes.get_ints("paddings", None)
        pads = None if pads is None else list(pads)
    value = _fill(pad)
    if pads is None or value is None or len(pads) < 6 or len(pads) % 2:
        return None
    r = len(pads) // 2
    if any(p < 0 for p in pads) or any(pads[i] for i in (0, 1, r, r + 1)):
        return None
    return pads[2:r] + pads[r + 2 :], value


def _pad_refusal(node: ir.Node, value: float, pads: list[int]) -> str | None:
    """Why ``node`` with ``pads`` as its own pads does not compute what it computes on the padded
    input, or None where it does."""
    attrs = node.attributes
    if attrs.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"the {node.op_type} sets auto_pad"
    if node.op_type == "Conv":
        return None if value == 0.0 else f"the Pad fills with {value:g}, a Conv pads with 0"
    kernel = attrs.get_ints("kernel_shape", None)
    if kernel is None or len(kernel) * 2 != len(pads):
        return f"the {node.op_type}'s kernel_shape does not cover the padded axes"
    if attrs.get_int("ceil_mode", 0):
        return f"the {node.op_type} sets ceil_mode"
    if any(p >= kernel[i % len(kernel)] for i, p in enumerate(pads)):
        return "the pads would reach the kernel size, which onnxruntime refuses for pooling"
    if node.op_type == "AveragePool":
        if value != 0.0:
            return f"the Pad fills with {value:g}, an AveragePool pads with 0"
        if attrs.get_int("count_include_pad", 0) != 1:
            return "the AveragePool does not count pads (count_include_pad=0)"
        return None
    # MaxPool ignores its padding, as a -inf fill would be: every window (pads < kernel, no dilation)
    # still holds one real element. The indices output would count positions in the padded input.
    dilations = attrs.get_ints("dilations", None)
    indices = node.outputs[1] if len(node.outputs) > 1 else None
    if indices is not None and (indices.uses() or indices.is_graph_output()):
        return "the MaxPool's indices output is read"
    if value != -math.inf:
        return f"the Pad fills with {value:g}, not -inf"
    if dilations is not None and any(d != 1 for d in dilations):
        return "the MaxPool is dilated"
    return None


def _merge_pad(node: ir.Node, pad: ir.Node, pads: list[int]) -> bool:
    node.attributes["pads"] = ir.AttrInt64s("pads", pads)
    node.replace_input_with(0, pad.inputs[0])
    pad.graph.remove(pad, safe=True)
    return True


@rule(
    "pad_conv",
    ("Conv", *POOLS),
    "constant Pad of the spatial axes (0 into Conv and AveragePool counting pads, -inf into MaxPool) "
    "→ their pads attribute",
    rewrite=_merge_pad,
)
def pad_conv(node: ir.Node, ctx: Context) -> Match:
    pad = producer(node.inputs[0], "Pad")
    if pad is None:
        return Match.fail(not_made_by(node.inputs[0], "Pad"))
    if not single_use(node.inputs[0]):
        return Match.fail(shared(node.inputs[0]))
    spec = spatial_pads(pad)
    if spec is None:
        return Match.fail(
            "the Pad is not a constant non-negative padding of the spatial axes alone"
        )
    extra, value = spec
    own = node.attributes.get_ints("pads", None)
    own = [0] * len(extra) if own is None else list(own)
    if len(own) != len(extra):
        return Match.fail(f"the {node.op_type} has {len(own)} pads, the Pad {len(extra)}")
    merged = [a + b for a, b in zip(own, extra)]
    refusal = _pad_refusal(node, value, merged)
    if refusal is not None:
        return Match.fail(refusal)
    return Match.ok(node=node, pad=pad, pads=merged)


# Transpose → Gemm / MatMul


def _swapped(value: ir.Value | None) -> ir.Node | None:
    """The Transpose that swaps the two axes of a 2-D ``value``, if ``value`` is read only once."""
    t = producer(value, "Transpose")
    if t is None or not single_use(value) or rank(t.inputs[0]) not in (2, None):
        return None
    perm = t.attributes.get_ints("perm", None)
    if perm is None and rank(t.inputs[0]) == 2 or perm is not None and list(perm) == [1, 0]:
        return t
    return None


def _flip_transposes(node: ir.Node, swaps: list[tuple[int, ir.Node]]) -> bool:
    for i, t in swaps:
        flag = ("transA", "transB")[i]
        node.attributes[flag] = ir.AttrInt64(flag, 1 - node.attributes.get_int(flag, 0))
        node.replace_input_with(i, t.inputs[0])
        t.graph.remove(t, safe=True)
    return True


@rule(
    "transpose_gemm",
    ("Gemm",),
    "Transpose(perm=[1,0]) of a Gemm input A or B → flipped transA/transB",
    rewrite=_flip_transposes,
)
def transpose_gemm(node: ir.Node, ctx: Context) -> Match:
    swaps = [(i, t) for i in (0, 1) if (t := _swapped(node.inputs[i])) is not None]
    if not swaps:
        return Match.fail(
            "neither A nor B is a Transpose(perm=[1,0]) of a 2-D value, read only here"
        )
    return Match.ok(node=node, swaps=swaps)


def _transposed_constant(node: ir.Node, i: int) -> tuple[ir.Node, list[int]] | None:
    """The Transpose and its perm, if input ``i`` of ``node`` transposes a constant and is read only
    here."""
    t = producer(node.inputs[i], "Transpose")
    weight = constant(t.inputs[0]) if t is not None and single_use(node.inputs[i]) else None
    if weight is None:
        return None
    perm = t.attributes.get_ints("perm", None)
    perm = list(reversed(range(weight.ndim))) if perm is None else list(perm)
    return (t, perm) if sorted(perm) == list(range(weight.ndim)) else None


def _fold_transposed_constant(node: ir.Node, i: int, t: ir.Node, perm: list[int]) -> None:
    """Input ``i`` of ``node``, Transpose ``t`` of a constant, becomes a transposed initializer."""
    source, graph = t.inputs[0], node.graph
    folded = np.ascontiguousarray(np.transpose(constant(source), perm))
    node.replace_input_with(i, add_initializer(graph, folded, fresh_name(graph, source.name)))
    t.graph.remove(t, safe=True)
    _drop_if_unread(source)


def _drop_if_unread(value: ir.Value) -> None:
    """Unregister the initializer ``value`` once nothing reads it (another reader keeps it)."""
    graph = value.graph
    if (
        graph is not None
        and not value.uses()
        and not value.is_graph_output()
        and graph.initializers.get(value.name) is value
    ):
        graph.initializers.pop(value.name)


def _gemm_refusal(node: ir.Node, ctx: Context) -> str | None:
    """Why the 2-D MatMul ``node`` cannot become a Gemm that transposes its inputs itself."""
    a, b = node.inputs
    if ctx.opset < 11:  # Gemm's C input is optional from opset 11
        return "before opset 11 a Gemm needs a bias"
    if rank(a) != 2 or rank(b) != 2:
        return "the inputs are not both 2-D"
    if a.dtype not in GEMM_TYPES:
        return f"the inputs are {dtype(a)}: a Gemm takes float, double and float16"
    if _swapped(a) is None and _swapped(b) is None:
        return "neither input is a Transpose(perm=[1,0]) read only here"
    return None


def _transposes_into_gemm(node: ir.Node) -> None:
    """A 2-D MatMul with a swapping Transpose on an input becomes a Gemm that transposes it itself."""
    a, b = node.inputs
    swaps = [_swapped(a), _swapped(b)]
    inputs = [v if t is None else t.inputs[0] for v, t in zip((a, b), swaps)]
    gemm = ir.node(
        "Gemm",
        inputs,
        {"transA": int(swaps[0] is not None), "transB": int(swaps[1] is not None)},
        name=node.name,
    )
    graph = node.graph
    graph.insert_after(node, gemm)
    out = node.outputs[0]
    gemm.outputs[0].shape, gemm.outputs[0].type = out.shape, out.type
    replace_value(out, gemm.outputs[0])
    graph.remove(node, safe=True)
    for t in swaps:
        if t is not None:
            t.graph.remove(t, safe=True)


def _rewrite_matmul(node: ir.Node, folds: list[tuple[int, ir.Node, list[int]]]) -> bool:
    """Fold the transposed constants, or, where there is none, make the MatMul a Gemm."""
    for i, t, perm in folds:
        _fold_transposed_constant(node, i, t, perm)
    if not folds:
        _transposes_into_gemm(node)
    return True


@rule(
    "transpose_matmul",
    ("MatMul",),
    "Transpose of a constant MatMul input → a transposed initializer; "
    "Transpose(perm=[1,0]) of a 2-D MatMul input → Gemm with transA/transB",
    rewrite=_rewrite_matmul,
)
def transpose_matmul(node: ir.Node, ctx: Context) -> Match:
    folds = [(i, *found) for i in (0, 1) if (found := _transposed_constant(node, i)) is not None]
    refusal = None if folds else _gemm_refusal(node, ctx)
    if refusal is not None:
        return Match.fail(f"no input is a Transpose of a constant read only here; {refusal}")
    return Match.ok(node=node, folds=folds)


RULES = (pad_conv, transpose_gemm, transpose_matmul)
