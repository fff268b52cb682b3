"""Attention heads as units of slim, on the ONNX graph.

The pattern is multi-head attention as torch exports it (BERT, MiniLM): Q, K, V = x @ W + b (W [K,
D]); each is reshaped to [B, S, nh, dh] (a constant target or a Concat of shape-derived dims and
constants; nh may be -1) and transposed to put heads second (K's transposed further to [B, nh, dh,
S]), optionally scaled by a scalar; scores = Q @ K^T, then elementwise steps (scale, mask Add,
Softmax, NaN guards), context = probs @ V [B, nh, S, dh], back to [B, S, nh, dh] and reshaped to
[B, S, D] (no-op 4-D Reshapes allowed on the way), then the out-projection Wo [D, N] (+ bias).

Head h is channels h*dh..(h+1)*dh of the context (the out-projection's input): columns of Wq, Wk, Wv
and their biases, rows of Wo. Removing it changes nothing else but the Reshape constants that hold nh
(to the new count) or D (to the new width); -1 entries need no change. Shape-derived dims are
computed at run time and follow by themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import (
    add_initializer,
    constant,
    fresh_name,
    is_standard,
    producer,
    scalar,
)
from onnxopt.passes.slim.units import Projected, Up, _down_bias, _up

# Between the scores MatMul and Softmax, and between Softmax and the context MatMul.
_PRE_SOFTMAX = frozenset({"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity"})
_POST_SOFTMAX = frozenset({"Where", "IsNaN", "Cast", "Identity", "Dropout"})


@dataclasses.dataclass
class Edit:
    """Entry ``offset`` of the 1-D int64 constant input ``index`` of ``node`` becomes ``kind``'s new
    value ("nh": the head count, "d": the width nh * dh)."""

    node: ir.Node
    index: int
    offset: int
    kind: str


@dataclasses.dataclass
class Attention(Projected):
    """One multi-head attention: the Q, K, V projections, every node up to the out-projection."""

    q: Up
    k: Up
    v: Up
    down: ir.Node  # the out-projection MatMul, Wo [D, N]
    down_bias: ir.Node | None
    heads: int  # nh
    head_dim: int  # dh
    nodes: list[ir.Node]  # every node of the block, the out-projection included
    edits: list[Edit]

    kind = "heads"

    @property
    def name(self) -> str:
        return self.down.name or self.down.outputs[0].name

    @property
    def width(self) -> int:
        """D, the context channels (the out-projection's input)."""
        return self.heads * self.head_dim

    @property
    def ups(self) -> list[Up]:
        return [self.q, self.k, self.v]

    def all_nodes(self) -> list[ir.Node]:
        return self.nodes + ([self.down_bias] if self.down_bias else [])


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    attr = node.attributes.get("perm")
    return None if attr is None else tuple(attr.value)


def _compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(first[i] for i in then)


def _entries(shape: ir.Value) -> list[tuple[int | None, tuple[ir.Node, int, int] | None]] | None:
    """The entries of a Reshape target: (value or None when computed, where a constant entry sits:
    (node, input index, offset) or None for the Reshape's own constant, fixed up by the caller)."""
    c = constant(shape)
    if c is not None:
        return [(int(x), None) for x in c.reshape(-1)] if c.ndim == 1 else None
    concat = producer(shape, "Concat")
    if concat is None or concat.attributes.get("axis") is None:
        return None
    if concat.attributes["axis"].value != 0:
        return None
    found = []
    for i, value in enumerate(concat.inputs):
        c = constant(value)
        if c is not None:
            if c.ndim != 1:
                return None
            found += [(int(x), (concat, i, j)) for j, x in enumerate(c)]
        elif producer(value, "Unsqueeze") is not None or (
            value.shape is not None and list(value.shape) == [1]
        ):
            found.append((None, None))
        else:
            return None
    return found


def _target(reshape: ir.Node) -> list | None:
    entries = _entries(reshape.inputs[1])
    if entries is None:
        return None
    return [(x, where or (reshape, 1, j)) for j, (x, where) in enumerate(entries)]


def _split(value: ir.Value, want: tuple[int, ...], where: str) -> tuple | str:
    """Walk back from a scores/context MatMul input to its projection: (Up, reshape, nodes, edits
    as (entry, kind) pairs, dh) or a reason."""
    nodes, perm = [], (0, 1, 2, 3)
    while True:
        node = producer(value)
        if node is None:
            return f"{where}: {value.name} does not come from a projection"
        if node.op_type == "Transpose" and _perm(node) is not None and len(_perm(node)) == 4:
            perm = _compose(_perm(node), perm)
        elif node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
            if scalar(node.inputs[1], node.outputs[0]) is None:
                return f"{where}: {node.name or node.op_type} is not a scaling by a scalar"
        elif node.op_type == "Reshape":
            break
        else:
            return f"{where}: {node.op_type} {node.name} between a projection and attention"
        nodes.append(node)
        value = node.inputs[0]
    reshape = node
    if perm != want:
        return f"{where}: head transposes {perm}, expected {want}"
    up = _up(reshape.inputs[0])
    if up is None:
        return f"{where}: {reshape.name} does not reshape a constant projection"
    target = _target(reshape)
    if target is None or len(target) != 4:
        return f"{where}: Reshape {reshape.name} target is not a recognisable [B, S, nh, dh]"
    (nh, nh_at), (dh, _) = target[2], target[3]
    d = constant(up.weight).shape[1]
    if dh is None or dh <= 0 or d % dh or nh not in (-1, d // dh):
        return (
            f"{where}: Reshape {reshape.name} target {[x for x, _ in target]} is not [B, S, nh, dh]"
        )
    if any(x == -1 for x, _ in target[:2]) or any(x is not None and x < 0 for x, _ in target[:2]):
        return f"{where}: Reshape {reshape.name} target {[x for x, _ in target]} is ambiguous"
    edits = [Edit(*nh_at, "nh")] if nh != -1 else []
    return up, reshape, [reshape, *nodes], edits, dh


def _scores(value: ir.Value, seen: list[ir.Node]) -> ir.Node | None:
    """The scores MatMul that ``value`` (Softmax's input) comes from through scaling and masking."""
    node = producer(value)
    if node is None:
        return None
    if node.op_type == "MatMul":
        if any(constant(v) is not None for v in node.inputs):
            return None
        seen.append(node)
        return node
    if node.op_type not in _PRE_SOFTMAX:
        return None
    data = [v for v in node.inputs if v is not None and constant(v) is None]
    for v in data:
        found: list[ir.Node] = []
        mm = _scores(v, found)
        if mm is not None:
            seen += [node, *found]
            return mm
    return None


def match(context: ir.Node) -> Attention | str | None:
    """The attention whose context MatMul (probs @ V) is ``context``, a reason why it cannot be
    slimmed, or None when ``context`` is no such MatMul (no Softmax behind its first input)."""
    if not is_standard(context, "MatMul") or any(constant(v) is not None for v in context.inputs):
        return None
    post, stack, softmax = [], [context.inputs[0]], None
    while stack:
        node = producer(stack.pop())
        if node is None:
            return None
        if node.op_type == "Softmax":
            if softmax not in (None, node):
                return None
            softmax = node
            continue
        if node.op_type not in _POST_SOFTMAX:
            return None
        if node not in post:
            post.append(node)
            stack += [v for v in node.inputs if v is not None and constant(v) is None]
    if softmax is None:
        return None
    where = context.name or context.outputs[0].name
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.value not in (-1, 3):
        return f"{where}: Softmax over axis {axis.value}"
    pre: list[ir.Node] = []
    scores = _scores(softmax.inputs[0], pre)
    if scores is None:
        return f"{where}: no Q @ K^T MatMul found before the Softmax"
    parts = []
    for value, want in (
        (scores.inputs[0], (0, 2, 1, 3)),
        (scores.inputs[1], (0, 2, 3, 1)),
        (context.inputs[1], (0, 2, 1, 3)),
    ):
        part = _split(value, want, where)
        if isinstance(part, str):
            return part
        parts.append(part)
    (q, *_), (k, *_), (v, *_) = parts
    dhs = {p[4] for p in parts}
    widths = {constant(u.weight).shape[1] for u in (q, k, v)}
    if len(dhs) != 1 or len(widths) != 1:
        return f"{where}: Q, K, V disagree on head size {sorted(dhs)} or width {sorted(widths)}"
    dh, d = dhs.pop(), widths.pop()
    # merge: context [B, nh, S, dh] -> (no-op 4-D Reshapes) -> Transpose (0,2,1,3) -> Reshape [B,S,D]
    merge, edits, value, perm = [], [], context.outputs[0], (0, 1, 2, 3)
    down = None
    while down is None:
        uses = [u for u in value.uses() if not is_standard(u.node, "Shape")]
        if len(uses) != 1 or value.is_graph_output():
            return f"{where}: {value.name} after the context is read elsewhere"
        node = uses[0].node
        if node.op_type == "Transpose" and _perm(node) is not None and len(_perm(node)) == 4:
            perm = _compose(perm, _perm(node))
        elif node.op_type == "Reshape" and uses[0].idx == 0:
            target = _target(node)
            if target is None:
                return f"{where}: Reshape {node.name} after the context is not recognisable"
            xs = [x for x, _ in target]
            others = [xs[0], xs[2]] if len(xs) == 4 else []
            if (
                len(target) == 4
                and perm == (0, 1, 2, 3)
                and xs[1] in (-1, None, d // dh)
                and xs[3] in (None, dh)
                and all(x is None or x >= 0 for x in others)
            ):
                if xs[1] == d // dh:
                    edits.append(Edit(*target[1][1], "nh"))
            elif len(target) == 3 and perm == (0, 2, 1, 3) and xs[2] in (-1, d):
                if any(x == -1 for x in xs[:2]) or any(x is not None and x < 0 for x in xs[:2]):
                    return f"{where}: Reshape {node.name} target {xs} is ambiguous"
                if xs[2] != -1:
                    edits.append(Edit(*target[2][1], "d"))
                merge.append(node)
                value = node.outputs[0]
                readers = [u.node for u in value.uses()]
                down = only = readers[0] if len(readers) == 1 else None
                if only is None or not is_standard(only, "MatMul") or value.is_graph_output():
                    return f"{where}: the merged context is not read by one MatMul alone"
                continue
            else:
                return f"{where}: Reshape {node.name} target {xs} after the context"
        else:
            return f"{where}: {node.op_type} {node.name} between the context and the out-projection"
        merge.append(node)
        value = node.outputs[0]
    wo = constant(down.inputs[1])
    if down.inputs[0] is not value or wo is None or wo.dtype != np.float32 or wo.shape[0] != d:
        return f"{where}: the out-projection has no constant float32 weight [{d}, N]"
    for part in parts:
        edits += part[3]
    nodes = [n for u in (q, k, v) for n in (u.matmul, u.bias) if n is not None]
    for _, _, chain, _, _ in parts:
        nodes += chain
    nodes += [scores, *pre, softmax, *post, context, *merge, down]
    nodes = list(dict.fromkeys(nodes))
    members = set(nodes)
    for node in nodes[:-1]:
        for out in node.outputs:
            if out.is_graph_output():
                return f"{where}: {out.name} inside the attention is a graph output"
            for use in out.uses():
                if use.node not in members and not is_standard(use.node, "Shape"):
                    reader = use.node.name or use.node.op_type
                    return f"{where}: {out.name} inside the attention is also read by {reader}"
    weights = [u.weight for u in (q, k, v)] + [u.bias_value for u in (q, k, v) if u.bias]
    weights.append(down.inputs[1])
    down_bias = _down_bias(down, wo.shape[1])
    if down_bias is not None:
        weights.append(next(x for x in down_bias.inputs if constant(x) is not None))
    if len(set(weights)) != len(weights) or any(len(w.uses()) != 1 for w in weights):
        return f"{where}: a weight is shared with other nodes"
    reshapes = {p[1] for p in parts} | {n for n in merge if n.op_type == "Reshape"}
    for edit in edits:
        if edit.node.op_type == "Concat":
            readers = {u.node for u in edit.node.outputs[0].uses()}
            if not readers <= reshapes:
                return f"{where}: the shape Concat {edit.node.name} is shared outside the attention"
    order = {node: i for i, node in enumerate(context.graph)}
    nodes.sort(key=lambda n: order.get(n, 0))
    return Attention(q, k, v, down, down_bias, d // dh, dh, nodes, edits)


def find(graph: ir.Graph) -> tuple[list[Attention], list[str]]:
    """The attentions of ``graph`` in its order and the reasons for those left alone."""
    found, refused = [], []
    for node in graph:
        result = match(node)
        if isinstance(result, str):
            refused.append(result)
        elif result is not None:
            found.append(result)
    return found, refused


def channels(heads: np.ndarray, head_dim: int) -> np.ndarray:
    """The context channels of ``heads`` (sorted head indices)."""
    return (heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def head_scores(channel_scores: np.ndarray, head_dim: int) -> np.ndarray:
    return channel_scores.reshape(-1, head_dim).sum(1)


def rewrite(att: Attention, keep_heads: np.ndarray, wo: np.ndarray, bo: np.ndarray) -> None:
    """Keep heads ``keep_heads``: Q, K, V columns and biases, the Reshape constants; the
    out-projection becomes ``wo`` [|keep|*dh, N] and its bias ``bo``."""
    from onnxopt.passes.slim.slim import _insert_bias

    graph = att.down.graph
    keep = channels(keep_heads, att.head_dim)
    new_count = {"nh": len(keep_heads), "d": len(keep)}

    def replace(node: ir.Node, index: int, array: np.ndarray) -> None:
        value = node.inputs[index]
        new = add_initializer(
            graph, np.ascontiguousarray(array), fresh_name(graph, value.name, "slim")
        )
        node.replace_input_with(index, new)

    for up in att.ups:
        replace(up.matmul, 1, constant(up.weight)[:, keep])
        if up.bias is not None:
            bias = up.bias_value
            b = constant(bias)
            index = list(up.bias.inputs).index(bias)
            replace(up.bias, index, b.reshape(-1)[keep].reshape(*b.shape[:-1], len(keep)))
    grouped: dict[tuple[ir.Node, int], list[Edit]] = {}
    for edit in att.edits:
        grouped.setdefault((edit.node, edit.index), []).append(edit)
    for (node, index), edits in grouped.items():
        array = constant(node.inputs[index]).copy()
        for edit in edits:
            array[edit.offset] = new_count[edit.kind]
        replace(node, index, array)
    replace(att.down, 1, wo)
    if att.down_bias is not None:
        bias = att.down_bias_value
        index = list(att.down_bias.inputs).index(bias)
        replace(att.down_bias, index, bo.reshape(constant(bias).shape))
    else:
        _insert_bias(att.down, bo)
    for node in att.nodes[:-1]:
        for out in node.outputs:
            out.shape = None
