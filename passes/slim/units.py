"""Finding the structural units slim removes, on the ONNX graph.

An FFN here is: one or more up-projections (a MatMul with a constant float32 weight W1 [K, H],
optionally followed by an Add of a constant bias [H]), an elementwise region over their outputs
(Gelu, Relu, the Erf or Tanh decompositions of GELU, Sigmoid-Mul SiLU, a gate multiplying two
up-projections, ... : ops that act on each element alone, whose other inputs are scalar constants),
then a down-projection: a MatMul with a constant float32 weight W2 [H, N] (optionally + a constant
bias [N]). Neuron j is column j of every W1 (and bias element j) and row j of W2: with the
elementwise region in between, it depends on nothing else, so it can go alone. An empty region (two
MatMuls in a row) is a linear chain and slims the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import constant, is_standard, producer, scalar

# Ops that compute each output element from the same element of their inputs alone.
UNARY = frozenset(
    {
        "Abs",
        "Celu",
        "Cos",
        "Elu",
        "Erf",
        "Exp",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LeakyRelu",
        "Log",
        "Mish",
        "Neg",
        "Reciprocal",
        "Relu",
        "Selu",
        "Sigmoid",
        "Sin",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Tanh",
        "ThresholdedRelu",
    }
)
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
CLIP = "Clip"  # data, then optional scalar min and max


@dataclasses.dataclass
class Up:
    """An up-projection: ``matmul`` (x @ W1), then ``bias`` (an Add of a constant [H]) when present."""

    matmul: ir.Node
    bias: ir.Node | None

    @property
    def output(self) -> ir.Value:
        return (self.bias or self.matmul).outputs[0]

    @property
    def weight(self) -> ir.Value:
        return self.matmul.inputs[1]

    @property
    def bias_value(self) -> ir.Value | None:
        return None if self.bias is None else _constant_input(self.bias)


class Projected:
    """A unit kind whose removed units are rows of a projection ``down`` (a MatMul, then an optional
    bias Add ``down_bias``) that the refit rebuilds: an FFN's down-projection, attention's output one."""

    down: ir.Node
    down_bias: ir.Node | None

    @property
    def hidden(self) -> ir.Value:
        """The projection's input: the units' activations."""
        return self.down.inputs[0]

    @property
    def output(self) -> ir.Value:
        """What the unit kind computes: the projection's output, after its bias when present."""
        return (self.down_bias or self.down).outputs[0]

    @property
    def down_bias_value(self) -> ir.Value | None:
        return None if self.down_bias is None else _constant_input(self.down_bias)


@dataclasses.dataclass
class Ffn(Projected):
    """One FFN: its up-projections, the elementwise nodes between, the down-projection."""

    ups: list[Up]
    region: list[ir.Node]
    down: ir.Node
    down_bias: ir.Node | None
    width: int  # H, the number of neurons

    @property
    def name(self) -> str:
        return self.ups[0].matmul.name or self.ups[0].matmul.outputs[0].name

    @property
    def kind(self) -> str:
        if len(self.ups) > 1:
            return "gated ffn"
        return "ffn" if self.region else "linear"

    def nodes(self) -> list[ir.Node]:
        found = [n for up in self.ups for n in (up.matmul, up.bias) if n is not None]
        return [*found, *self.region, self.down, *([self.down_bias] if self.down_bias else [])]

    def inner_values(self) -> list[ir.Value]:
        """The values whose last axis is the H neurons: up outputs and the region's outputs."""
        values = [n.outputs[0] for up in self.ups for n in (up.matmul, up.bias) if n is not None]
        return values + [n.outputs[0] for n in self.region]


def _weight(value: ir.Value | None) -> np.ndarray | None:
    w = constant(value)
    return w if w is not None and w.dtype == np.float32 and w.ndim == 2 else None


def _constant_input(node: ir.Node) -> ir.Value | None:
    """The one input of a binary ``node`` that is a constant (None when not exactly one is)."""
    found = [v for v in node.inputs if constant(v) is not None]
    return found[0] if len(found) == 1 and len(node.inputs) == 2 else None


def _vector(value: ir.Value | None, size: int) -> bool:
    """Whether ``value`` is a constant float32 of ``size`` elements along its last axis alone."""
    c = constant(value)
    return (
        c is not None
        and c.dtype == np.float32
        and c.ndim >= 1
        and c.shape[-1] == size
        and c.size == size
    )


def _up(value: ir.Value) -> Up | None:
    """``value`` as the output of an up-projection, if it is one."""
    node = producer(value, "MatMul", "Add")
    if node is None:
        return None
    if node.op_type == "MatMul":
        return Up(node, None) if _weight(node.inputs[1]) is not None else None
    bias = _constant_input(node)
    if bias is None:
        return None
    data = node.inputs[1] if node.inputs[0] is bias else node.inputs[0]
    matmul = producer(data, "MatMul")
    w = None if matmul is None else _weight(matmul.inputs[1])
    if w is None or not _vector(bias, w.shape[1]):
        return None
    return Up(matmul, node)


def _data_inputs(node: ir.Node) -> list[ir.Value] | None:
    """The inputs of an elementwise ``node`` that carry neurons (its others are scalar constants),
    or None when ``node`` is not elementwise in that sense."""
    if not is_standard(node) or len(node.outputs) != 1:
        return None
    like = node.outputs[0]
    if node.op_type in UNARY and len(node.inputs) == 1:
        return [node.inputs[0]]
    if node.op_type == CLIP:
        if any(v is not None and scalar(v, like) is None for v in node.inputs[1:]):
            return None
        return [node.inputs[0]]
    if node.op_type in BINARY and len(node.inputs) == 2:
        data = [v for v in node.inputs if v is not None and scalar(v, like) is None]
        if not data or any(constant(v) is not None for v in data):
            return None
        return data
    return None


def match(down: ir.Node) -> Ffn | str | None:
    """The FFN that ``down`` (a MatMul) ends, a reason why the one it ends cannot be slimmed, or
    None when it ends none (its input is not an elementwise function of up-projections)."""
    if not is_standard(down, "MatMul"):
        return None
    w2 = _weight(down.inputs[1])
    if w2 is None:
        return None
    ups: list[Up] = []
    region: list[ir.Node] = []
    seen: set[ir.Value] = set()
    stack = [down.inputs[0]]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        up = _up(value)
        if up is not None:
            ups.append(up)
            continue
        node = producer(value)
        data = None if node is None else _data_inputs(node)
        if data is None:
            return None
        region.append(node)
        stack.extend(data)
    if not ups:
        return None
    where = f"{ups[0].matmul.name or ups[0].output.name}"
    widths = {_weight(up.weight).shape[1] for up in ups}
    if widths != {w2.shape[0]}:
        return f"{where}: widths differ ({sorted(widths)} up, {w2.shape[0]} down)"
    nodes = {*region, *(n for up in ups for n in (up.matmul, up.bias) if n is not None)}
    inner = [n.outputs[0] for n in nodes]
    for value in inner:
        if value.is_graph_output():
            return f"{where}: {value.name} inside the chain is a graph output"
        readers = {use.node for use in value.uses()}
        outside = readers - nodes - ({down} if value is down.inputs[0] else set())
        if outside:
            reader = next(iter(outside))
            return f"{where}: {value.name} inside the chain is also read by {reader.name or reader.op_type}"
    weights = (
        [up.weight for up in ups] + [up.bias_value for up in ups if up.bias] + [down.inputs[1]]
    )
    down_bias = _down_bias(down, w2.shape[1])
    if down_bias is not None:
        weights.append(_constant_input(down_bias))
    for value in weights:
        if len(value.uses()) != 1:
            return f"{where}: weight {value.name} is shared with other nodes"
    # topological order of the region: the graph's order
    order = {node: i for i, node in enumerate(down.graph)}
    region.sort(key=lambda n: order.get(n, 0))
    return Ffn(ups, region, down, down_bias, w2.shape[0])


def _down_bias(down: ir.Node, n: int) -> ir.Node | None:
    out = down.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    node = out.uses()[0].node
    if not is_standard(node, "Add") or len(node.inputs) != 2:
        return None
    bias = _constant_input(node)
    return node if bias is not None and bias is not out and _vector(bias, n) else None


def find(graph: ir.Graph) -> tuple[list[Ffn], list[str]]:
    """The FFNs of ``graph`` in its order, and the reasons for those left alone. A node in two
    candidates (a MatMul that is one's down- and another's up-projection) goes to the first only."""
    found, refused, taken = [], [], set()
    for node in graph:
        result = match(node)
        if result is None:
            continue
        if isinstance(result, str):
            refused.append(result)
            continue
        if taken & set(result.nodes()):
            refused.append(f"{result.name}: overlaps an FFN found before it")
            continue
        taken.update(result.nodes())
        found.append(result)
    return found, refused
