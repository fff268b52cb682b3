"""What factorize can split: nodes that multiply activations by a constant matrix, each seen as
``x [T, K] · W [K, N]``, and how each is rewritten as two.

- ``matmul``: MatMul(x, W) with W a 2-D initializer -> MatMul(MatMul(x, A), B).
- ``gemm``: Gemm(x, W[ᵀ], c) without transA -> Gemm(MatMul(x, A), B, c) (alpha, beta kept).
- ``conv1x1``: a 1x1 Conv, group 1, no padding (rows: the strided positions) ->
  Conv(Conv(x, A, strides), B, bias).
- ``embedding``: Gather(table [V, D], ids) on axis 0 -> MatMul(Gather(A [V, r], ids), B);
  its "activation" is the one-hot of the ids, so its Gram matrix is diagonal: the token counts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import add_initializer, constant, fresh_name, is_standard, replace_value

KINDS = ("matmul", "gemm", "conv1x1", "embedding")
ROWS_PER_SAMPLE = 1024  # Conv positions sampled per calibration image
SEED = 0


@dataclasses.dataclass
class Layer:
    node: ir.Node
    kind: str
    weight: np.ndarray  # [K, N]

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def source(self) -> ir.Value:
        """The value whose rows are the layer's input activations (ids for an embedding)."""
        return self.node.inputs[1] if self.kind == "embedding" else self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def params(self) -> int:
        return int(self.weight.size)

    def factored_params(self, rank: int) -> int:
        k, n = self.weight.shape
        return rank * (k + n)

    def rows(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The input rows [T, K] of a run value of ``source`` (an embedding's: its ids, flat)."""
        if self.kind == "embedding":
            return x.reshape(-1)
        if self.kind == "conv1x1":
            sh, sw = self.node.attributes.get_ints("strides", [1, 1])
            x = x[:, :, ::sh, ::sw]
            rows = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
            if len(rows) > ROWS_PER_SAMPLE * len(x):
                rows = rows[np.sort(rng.choice(len(rows), ROWS_PER_SAMPLE * len(x), False))]
            return rows
        return x.reshape(-1, x.shape[-1])

    def rows_per_run(self, shape: tuple[int, ...]) -> int:
        """The rows x·W multiplies in one run whose ``source`` has ``shape``."""
        if self.kind == "conv1x1":
            sh, sw = self.node.attributes.get_ints("strides", [1, 1])
            return shape[0] * -(-shape[2] // sh) * -(-shape[3] // sw)
        return int(np.prod(shape[:-1]))

    def rewrite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Replace the layer's W by ``a`` [K, r] · ``b`` [r, N] (float32 of the weight's dtype)."""
        graph = self.node.graph
        base = self.node.inputs[0 if self.kind == "embedding" else 1].name
        dtype = self.weight.dtype

        def initializer(array: np.ndarray, suffix: str) -> ir.Value:
            return add_initializer(
                graph, np.ascontiguousarray(array.astype(dtype)), fresh_name(graph, base, suffix)
            )

        mid = ir.Value(name=fresh_name(graph, self.output.name, "lowrank"))
        rank = a.shape[1]
        if self.kind == "embedding":
            first = ir.node(
                "Gather", [initializer(a, "lowrank_a"), self.node.inputs[1]], outputs=[mid]
            )
            out = ir.Value(name=fresh_name(graph, self.output.name, "lowrank_out"))
            second = ir.node("MatMul", [mid, initializer(b, "lowrank_b")], outputs=[out])
            graph.insert_after(self.node, [first, second])
            replace_value(self.output, out)
            graph.remove(self.node, safe=True)
            return
        if self.kind == "conv1x1":
            strides = self.node.attributes.get_ints("strides", [1, 1])
            wa = initializer(a.T.reshape(rank, -1, 1, 1), "lowrank_a")
            first = ir.node(
                "Conv", [self.node.inputs[0], wa], attributes={"strides": strides}, outputs=[mid]
            )
            self.node.attributes["strides"] = ir.AttrInt64s("strides", [1, 1])
            wb = b.T.reshape(-1, rank, 1, 1)
        else:
            first = ir.node(
                "MatMul", [self.node.inputs[0], initializer(a, "lowrank_a")], outputs=[mid]
            )
            wb = b
            if self.kind == "gemm":
                self.node.attributes["transB"] = ir.AttrInt64("transB", 0)
        graph.insert_before(self.node, first)
        self.node.replace_input_with(0, mid)
        self.node.replace_input_with(1, initializer(wb, "lowrank_b"))


def find(graph: ir.Graph, kinds: tuple[str, ...]) -> list[Layer]:
    """The layers of ``graph`` of ``kinds``, in graph order."""
    found = []
    for node in graph:
        layer = _layer(node)
        if layer is not None and layer.kind in kinds:
            found.append(layer)
    return found


def _layer(node: ir.Node) -> Layer | None:
    if not is_standard(node) or len(node.outputs) != 1:
        return None
    if node.op_type == "MatMul":
        w = constant(node.inputs[1])
        if w is not None and w.ndim == 2 and w.dtype.kind == "f":
            return Layer(node, "matmul", w)
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        w = constant(node.inputs[1])
        if w is not None and w.ndim == 2 and w.dtype.kind == "f":
            return Layer(node, "gemm", w.T if node.attributes.get_int("transB", 0) else w)
    if node.op_type == "Conv":
        w = constant(node.inputs[1])
        attrs = node.attributes
        if (
            w is not None
            and w.ndim == 4
            and w.shape[2:] == (1, 1)
            and w.dtype.kind == "f"
            and attrs.get_int("group", 1) == 1
            and attrs.get_string("auto_pad", "NOTSET") == "NOTSET"
            and not any(attrs.get_ints("pads", [0, 0, 0, 0]))
        ):
            return Layer(node, "conv1x1", w[:, :, 0, 0].T)
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        table = constant(node.inputs[0])
        ids = node.inputs[1]
        if (
            table is not None
            and table.ndim == 2
            and table.dtype.kind == "f"
            and constant(ids) is None
        ):
            return Layer(node, "embedding", table)
    return None
