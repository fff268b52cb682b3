"""Conv output channels and what couples them, found on the ONNX graph (dependency groups, as
DepGraph finds them on PyTorch modules).

Every output channel of a Conv with a constant weight and ``group`` 1 (a *producer*) gets a slot.
Slots flow with the channel axis (axis 1) through the ops that keep channels apart: elementwise
activations, Sigmoid-Mul SiLU, inference BatchNormalization, pooling, nearest Resize, depthwise
Convs (channel c in, channel c out), Concat and Split along the channels. A binary elementwise op
ties channel c of one input to channel c of the other (a residual Add): their slots join one
*class*, removed together or not at all. A class is *pinned* (never removed) when it reaches
anything else: a graph output, a Reshape, a Transpose, a Shape, a constant that is not a scalar, a
Conv with groups. Where a class ends in a plain Conv (a *consumer*), its input channel goes, and
the consumer's weight is refit.

Classes that occupy the same tensors form a *block* (a Conv's output channels; the two halves of a
Split; a residual chain); blocks are cut each to a share of its width, rounded to a multiple.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import add_initializer, constant, fresh_name, rank
from onnxopt.passes.slim.units import BINARY, CLIP, UNARY

CHANNEL_AXIS = 1
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
KEEP_CHANNELS = UNARY | POOLS | {"Dropout"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def conv_kind(node: ir.Node) -> str | None:
    """``plain`` (group 1, constant weight), ``depthwise`` (one filter per channel, constant
    weight) or None for a Conv this module leaves alone (and anything that is not a Conv)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = constant(node.inputs[1])
    if w is None or w.ndim < 3 or w.dtype != np.float32:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
        return None
    group = node.attributes.get_int("group", 1)
    if group == 1:
        return "plain"
    if w.shape[1] == 1 and w.shape[0] == group:
        return "depthwise"
    return None


@dataclasses.dataclass
class Block:
    """Channels removed as one: ``classes`` (roots) that occupy the same tensors."""

    name: str
    classes: list[int]
    signature: tuple[str, ...]  # the values its channels occupy

    @property
    def width(self) -> int:
        return len(self.classes)


@dataclasses.dataclass
class Channels:
    """The slots of every value along the channel axis, and the readers that carry them."""

    slots: dict[ir.Value, list[int]]
    classes: _UnionFind
    producers: list[ir.Node]
    depthwise: list[ir.Node]
    consumers: list[ir.Node]
    splits: list[ir.Node]
    norms: list[ir.Node]  # BatchNormalizations their channels pass through
    pinned: set[int]
    source: dict[int, tuple[ir.Node, int]]  # fresh slot -> (producer, output channel)
    known: dict[ir.Value, list[int]] = dataclasses.field(default_factory=dict)  # roots, cached

    def roots(self, value: ir.Value) -> list[int]:
        """The class of each channel of ``value`` (the classes are final once analysed)."""
        if value not in self.known:
            self.known[value] = [self.classes.find(s) for s in self.slots[value]]
        return self.known[value]

    def blocks(self) -> list[Block]:
        """Unpinned classes grouped by the values they occupy, in graph order."""
        pinned = {self.classes.find(s) for s in self.pinned}
        where: dict[int, set[str]] = {}
        for value in self.slots:
            for r in self.roots(value):
                if r not in pinned:
                    where.setdefault(r, set()).add(value.name)
        grouped: dict[tuple[str, ...], list[int]] = {}
        for root in sorted(where):
            grouped.setdefault(tuple(sorted(where[root])), []).append(root)
        made: dict[int, list[tuple[ir.Node, int]]] = {}
        for slot, made_by in self.source.items():
            made.setdefault(self.classes.find(slot), []).append(made_by)
        return [
            Block(_name([m for r in roots for m in made.get(r, [])]), roots, signature)
            for signature, roots in grouped.items()
        ]


def _name(made: list[tuple[ir.Node, int]]) -> str:
    """A block's name: its first producer, with the channel range when it holds only some."""
    node = made[0][0]
    channels = [c for n, c in made if n is node]
    if len(channels) == constant(node.inputs[1]).shape[0]:
        return node.name
    return f"{node.name}[{min(channels)}:{max(channels) + 1}]"


def analyse(graph: ir.Graph) -> Channels:
    """Slots, classes and pins of ``graph`` (its own nodes; subgraph readers pin what they read)."""
    uf = _UnionFind()
    slots: dict[ir.Value, list[int]] = {}
    accepted: set[tuple[int, int]] = set()  # (id(node), input index) that carry slots
    found = Channels(slots, uf, [], [], [], [], [], set(), {})

    def take(node: ir.Node, *indices: int) -> None:
        accepted.update((id(node), i) for i in indices)

    for node in graph:
        inputs = [v if v in slots else None for v in node.inputs]
        kind = conv_kind(node)
        if kind == "plain":
            if inputs and inputs[0] is not None:
                take(node, 0)
                found.consumers.append(node)
            out = node.outputs[0]
            if rank(out) is not None and rank(out) >= 3:
                width = constant(node.inputs[1]).shape[0]
                slots[out] = uf.new(width)
                found.producers.append(node)
                for c, s in enumerate(slots[out]):
                    found.source[s] = (node, c)
        elif kind == "depthwise" and inputs and inputs[0] is not None:
            take(node, 0)
            found.depthwise.append(node)
            slots[node.outputs[0]] = list(slots[inputs[0]])
        elif not any(v is not None for v in inputs):
            continue
        elif node.domain not in ("", "ai.onnx"):
            continue
        elif (node.op_type in KEEP_CHANNELS or node.op_type == CLIP) and inputs[0] is not None:
            if _pass_through(node):
                take(node, 0)
                slots[node.outputs[0]] = list(slots[inputs[0]])
        elif node.op_type == "BatchNormalization" and _frozen_norm(node):
            take(node, 0)
            found.norms.append(node)
            slots[node.outputs[0]] = list(slots[inputs[0]])
        elif node.op_type == "Resize" and _resize_keeps_channels(node):
            take(node, 0)
            slots[node.outputs[0]] = list(slots[inputs[0]])
        elif node.op_type in BINARY:
            _binary(node, inputs, slots, uf, take)
        elif node.op_type == "Concat" and _on_channels(node) and all(v is not None for v in inputs):
            take(node, *range(len(inputs)))
            slots[node.outputs[0]] = [s for v in inputs for s in slots[v]]
        elif node.op_type == "Split" and _on_channels(node) and inputs[0] is not None:
            sizes = split_sizes(node, len(slots[inputs[0]]))
            if sizes is not None:
                take(node, 0)
                found.splits.append(node)
                at = 0
                for out, size in zip(node.outputs, sizes):
                    slots[out] = slots[inputs[0]][at : at + size]
                    at += size
    for value, value_slots in slots.items():
        uses = [u for u in value.uses() if (id(u.node), u.idx) not in accepted]
        if uses or value.is_graph_output():
            found.pinned.update(value_slots)
    found.pinned = {uf.find(s) for s in found.pinned}
    return found


def _pass_through(node: ir.Node) -> bool:
    """One output that keeps channels apart; extra inputs (Clip's bounds) scalar constants."""
    if node.op_type in POOLS and (len(node.outputs) > 1 and node.outputs[1].uses()):
        return False
    extra = [v for v in node.inputs[1:] if v is not None]
    return all(constant(v) is not None and constant(v).size == 1 for v in extra)


def _frozen_norm(node: ir.Node) -> bool:
    """An inference BatchNormalization (constant scale, bias, mean and variance; one output):
    channel c out depends on channel c in alone."""
    params = node.inputs[1:5]
    return (
        len(params) == 4
        and all(constant(v) is not None and constant(v).ndim == 1 for v in params)
        and not any(out.uses() for out in node.outputs[1:])
        and node.attributes.get_int("training_mode", 0) == 0
    )


def _resize_keeps_channels(node: ir.Node) -> bool:
    scales = constant(node.inputs[2]) if len(node.inputs) > 2 else None
    sizes = node.inputs[3] if len(node.inputs) > 3 else None
    return (
        sizes is None
        and scales is not None
        and scales.ndim == 1
        and len(scales) > CHANNEL_AXIS
        and float(scales[CHANNEL_AXIS]) == 1.0
        and node.attributes.get_string("mode", "nearest") == "nearest"
    )


def _on_channels(node: ir.Node) -> bool:
    r = rank(node.outputs[0])
    axis = node.attributes.get_int("axis", 0)
    return r is not None and (axis == CHANNEL_AXIS or axis == CHANNEL_AXIS - r)


def split_sizes(node: ir.Node, width: int) -> list[int] | None:
    """The channel count of each output of a Split, if known."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = constant(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    if "split" in node.attributes:
        return list(node.attributes.get_ints("split"))
    n = len(node.outputs)
    return [width // n] * n if width % n == 0 else None


def _binary(node, inputs, slots, uf, take) -> None:
    """An elementwise op of slotted inputs (tied channel by channel) and constants that do not vary
    along the channels; anything else leaves its slotted inputs unaccepted (pinned)."""
    carried = [v for v in inputs if v is not None]
    r = rank(carried[0])
    if r is None or any(rank(v) != r for v in carried):
        return
    for v, given in zip(node.inputs, inputs):
        if given is None and not _channel_free(v, r):
            return
    first = slots[carried[0]]
    for v in carried[1:]:
        if len(slots[v]) != len(first):
            return
        for a, b in zip(first, slots[v]):
            uf.union(a, b)
    take(node, *[i for i, v in enumerate(inputs) if v is not None])
    slots[node.outputs[0]] = list(first)


def _channel_free(value: ir.Value | None, r: int) -> bool:
    """A constant that broadcasts against rank ``r`` without varying along the channel axis."""
    c = constant(value)
    if c is None:
        return False
    if c.size == 1:
        return True
    offset = r - c.ndim
    return offset >= 0 and (CHANNEL_AXIS < offset or c.shape[CHANNEL_AXIS - offset] == 1)


def kept_positions(found: Channels, value: ir.Value, drop: set[int]) -> np.ndarray:
    return np.array([i for i, r in enumerate(found.roots(value)) if r not in drop], dtype=np.int64)


def replace_input(node: ir.Node, index: int, array: np.ndarray, suffix: str = "slim") -> None:
    graph = node.graph
    old = node.inputs[index]
    new = add_initializer(graph, np.ascontiguousarray(array), fresh_name(graph, old.name, suffix))
    node.replace_input_with(index, new)


def cut(found: Channels, drop: set[int], refits: dict[ir.Node, tuple[np.ndarray, np.ndarray]]):
    """Remove the channels of classes ``drop``: consumer input channels (``refits`` gives a
    consumer's new weight and bias for its kept inputs, else its columns are dropped), producer
    output rows (weight and bias), depthwise filters, Split sizes and the channel dim of every
    value that carries them."""
    for node in dict.fromkeys(found.consumers + found.producers + found.depthwise):
        w = constant(node.inputs[1])
        b = (
            constant(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        if node in refits:
            w, b = refits[node]
        elif node in found.consumers:
            w = w[:, kept_positions(found, node.inputs[0], drop)]
        if node.outputs[0] in found.slots:
            rows = kept_positions(found, node.outputs[0], drop)
            w = w[rows]
            b = None if b is None else b[rows]
            if node in found.depthwise:
                node.attributes["group"] = ir.AttrInt64("group", len(rows))
        if w.shape != constant(node.inputs[1]).shape or node in refits:
            replace_input(node, 1, w.astype(np.float32))
            if b is not None:
                _set_bias(node, b.astype(np.float32))
    for node in found.norms:
        keep = kept_positions(found, node.outputs[0], drop)
        if len(keep) < len(found.slots[node.outputs[0]]):
            for i in range(1, 5):
                replace_input(node, i, constant(node.inputs[i])[keep])
    for node in found.splits:
        roots = found.roots(node.inputs[0])
        sizes, at = [], 0
        for out in node.outputs:
            n = len(found.slots[out])
            sizes.append(sum(1 for r in roots[at : at + n] if r not in drop))
            at += n
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            replace_input(node, 1, np.array(sizes, dtype=np.int64))
        else:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
    for value in found.slots:
        if value.shape is not None and len(value.shape) > CHANNEL_AXIS:
            dims = list(value.shape)
            dims[CHANNEL_AXIS] = int(len(kept_positions(found, value, drop)))
            value.shape = ir.Shape(dims)


def _set_bias(node: ir.Node, bias: np.ndarray) -> None:
    """Give a consumer Conv the bias ``bias`` [Cout] (as its third input, added if absent)."""
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        replace_input(node, 2, bias)
        return
    graph = node.graph
    value = add_initializer(graph, bias, fresh_name(graph, node.inputs[1].name, "slim_bias"))
    if len(node.inputs) == 2:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
