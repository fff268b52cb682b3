"""4-bit embedding tables: Gather on a float table [V, D] becomes a lookup of packed 4-bit rows.

format=ort: onnxruntime's GatherBlockQuantized. format=qdq: standard ops only. ONNX's Gather takes
no int4 data, and a DequantizeLinear of the whole table before the Gather would run on every call
(onnxruntime does not fold it: 28 ms a run on MiniLM's 30522 x 384 table), so the packed uint8 rows
are gathered with their scales (and packed zero points) and only the rows looked up are unpacked
(BitwiseAnd, BitShift) and dequantized by a blocked DequantizeLinear along the last axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import MS_DOMAIN, add_initializer, fresh_name, rank
from onnxopt.passes.quant.dynamic import _replace
from onnxopt.passes.wquant.algos import SYMMETRIC_ZERO, Blocks
from onnxopt.passes.wquant.pack import gbq_layout


def table_initializers(node: ir.Node, blocks: Blocks) -> tuple:
    """(data, scales, zero points or None) of the table ``node`` reads, as initializers of its graph;
    codes and zero points packed two per byte, as GatherBlockQuantized takes them."""
    graph, base = node.graph, _base(node)
    data, scales, zeros = gbq_layout(blocks)
    return (
        add_initializer(graph, data, fresh_name(graph, base, "table_int4")),
        add_initializer(graph, scales, fresh_name(graph, base, "table_scale")),
        None
        if zeros is None
        else add_initializer(graph, zeros, fresh_name(graph, base, "table_zero_point")),
    )


def gather_block_quantized(node: ir.Node, table: tuple, block: int) -> None:
    """Gather → com.microsoft GatherBlockQuantized on the packed table (zero point 8 when none)."""
    data, scales, zeros = table
    inputs = [data, node.inputs[1], scales] + ([zeros] if zeros is not None else [])
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4}
    _replace(
        node,
        [
            ir.node(
                "GatherBlockQuantized",
                inputs,
                attributes,
                domain=MS_DOMAIN,
                name=f"{_base(node)}.int4",
            )
        ],
    )


def shared_block_quantized(
    node: ir.Node, packed: ir.Value, scales: ir.Value, zeros: np.ndarray | None, block: int
) -> None:
    """Gather → GatherBlockQuantized reading a tied head's MatMulNBits weight [V, k_blocks, block/2]
    (the table's rows, blocked alike) along its last axis, one table on disk: the head's scales
    reshaped to [V, k_blocks, 1] (a Reshape onnxruntime folds at load), zero points (one per byte,
    [V, k_blocks, 1], the only copy: MatMulNBits packs two per byte), then the [..., k_blocks, block]
    rows reshaped to [..., D]. SmolLM2-135M: 108.4 -> 89.4 MB."""
    graph, base = node.graph, _base(node)
    rows, k_blocks = packed.shape[0], packed.shape[1]

    def const(array, suffix):
        return add_initializer(graph, np.asarray(array), fresh_name(graph, base, suffix))

    reshaped = ir.node(
        "Reshape",
        [scales, const(np.array([rows, k_blocks, 1], np.int64), "scale_shape")],
        name=f"{base}.table_scale",
    )
    inputs = [packed, node.inputs[1], reshaped.outputs[0]]
    if zeros is not None:
        inputs.append(const(zeros.reshape(rows, k_blocks, 1).astype(np.uint8), "table_zero_point"))
    lookup = ir.node(
        "GatherBlockQuantized",
        inputs,
        {"gather_axis": 0, "quantize_axis": 2, "block_size": block, "bits": 4},
        domain=MS_DOMAIN,
        name=f"{base}.int4",
    )
    indices_rank = rank(node.inputs[1])
    flat = const(np.array([0] * indices_rank + [-1], np.int64), "row_shape")
    rows_out = ir.node("Reshape", [lookup.outputs[0], flat], name=f"{base}.rows")
    _replace(node, [reshaped, lookup, rows_out])


def gather_then_dequantize(
    node: ir.Node, table: tuple, block: int, width: int, indices_rank: int
) -> None:
    """Gather → Gather of packed rows, scales (and zero points), nibbles unpacked, blocked DequantizeLinear."""
    data, scales, zeros = table
    graph, base, indices = node.graph, _base(node), node.inputs[1]

    def const(array, suffix):
        return add_initializer(graph, np.asarray(array), fresh_name(graph, base, suffix))

    low_mask, high_shift = const(np.uint8(0x0F), "low_mask"), const(np.uint8(4), "high_shift")
    last = const(np.array([-1], np.int64), "last_axis")
    row_shape = const(np.array([0] * indices_rank + [-1], np.int64), "row_shape")

    def gathered_nibbles(packed: ir.Value, count: int, what: str) -> list[ir.Node]:
        """The rows of ``packed`` that ``indices`` pick, unpacked to ``count`` codes a row (low nibble first)."""
        rows = ir.node("Gather", [packed, indices], {"axis": 0}, name=f"{base}.{what}_packed")
        low = ir.node("BitwiseAnd", [rows.outputs[0], low_mask], name=f"{base}.{what}_low")
        high = ir.node(
            "BitShift",
            [rows.outputs[0], high_shift],
            {"direction": "RIGHT"},
            name=f"{base}.{what}_high",
        )
        pairs = [
            ir.node("Unsqueeze", [low.outputs[0], last], name=f"{base}.{what}_low_pair"),
            ir.node("Unsqueeze", [high.outputs[0], last], name=f"{base}.{what}_high_pair"),
        ]
        both = ir.node(
            "Concat", [p.outputs[0] for p in pairs], {"axis": -1}, name=f"{base}.{what}_pairs"
        )
        flat = ir.node("Reshape", [both.outputs[0], row_shape], name=f"{base}.{what}_unpacked")
        new = [rows, low, high, *pairs, both, flat]
        if 2 * packed.shape[-1] != count:  # an odd count: the last byte's high nibble is padding
            ends = const(np.array([count], np.int64), f"{what}_count")
            new.append(
                ir.node(
                    "Slice",
                    [flat.outputs[0], const(np.array([0], np.int64), "start"), ends, last],
                    name=f"{base}.{what}",
                )
            )
        return new

    codes = gathered_nibbles(data, width, "codes")
    row_scales = ir.node("Gather", [scales, indices], {"axis": 0}, name=f"{base}.scales")
    new = [*codes, row_scales]
    if zeros is not None:
        new += gathered_nibbles(zeros, scales.shape[-1], "zero_points")
    else:
        shape = ir.node("Shape", [row_scales.outputs[0]], name=f"{base}.scales_shape")
        new += [
            shape,
            ir.node(
                "Expand",
                [const(np.uint8(SYMMETRIC_ZERO), "zero_point"), shape.outputs[0]],
                name=f"{base}.zero_points",
            ),
        ]
    dq = ir.node(
        "DequantizeLinear",
        [codes[-1].outputs[0], row_scales.outputs[0], new[-1].outputs[0]],
        {"axis": -1, "block_size": block},
        name=f"{base}.dequantize",
    )
    _replace(node, [*new, dq])


def _base(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or "gather"
