"""Weights already on a 4-bit grid, stored exactly (format=ort).

A model converted from a 4-bit checkpoint (a GGUF Q4_1 file: per block of 32 along K a step d and a
minimum m, w = m + d * q) holds fp32 weights that sit exactly on such a grid. MatMulNBits can hold the
codes and steps but only an integer zero point, so re-quantizing loses each block's fraction of a
step (|offset| <= d/2, the same for all 32 weights of the block): on SmolLM2-135M round to nearest
left perplexity +32 %, and GPTQ on 128 calibration windows +7 %, though the codes were there.

So when ``algos.on_grid`` finds the grid, the layer becomes

    MatMulNBits(x, codes, steps, zero points) + MatMulNBits(x @ P, offsets)

where P [K, blocks] sums each block of x's channels (the sums are shared by every layer reading x)
and the offsets [blocks, N], within half a step of zero, are 4-bit weights of their own (about a byte
per 32 weights: SmolLM2-135M 89.4 -> 93.5 MB, 8-bit offsets 96.0 MB for the same perplexity), exact
to ~1/30 of a step instead of 1/2. The extra kernels cost 15 % of a decode step.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import MS_DOMAIN, add_initializer, fresh_name
from onnxopt.passes.wquant.algos import rtn
from onnxopt.passes.wquant.pack import nbits_layout

INT8_LEVEL = 4  # the offsets' MatMulNBits: int8 compute, its fast kernel on CPU at one row
OFFSET_BLOCK = (
    32  # rows of offsets per scale: a whole layer's 18 (K 576) or 48 (K 1536) in 1-2 blocks
)


def offset_nodes(
    node: ir.Node, y: ir.Value, offsets: tuple, k: int, block: int, sums: dict
) -> list[ir.Node]:
    """Nodes that add the offsets' product to ``y`` (the 4-bit product of ``node``'s input): the block
    sums of the input (made once per input and cached in ``sums``) times ``offsets`` (the 8-bit
    MatMulNBits initializers and their width). The last node's output is the layer's."""
    graph, x = node.graph, node.inputs[0]
    base = node.name or node.outputs[0].name or "matmul"
    new = []
    key = (graph, x, k, block)
    if key not in sums:
        if (graph, k, block) not in sums:  # one indicator per shape, shared by every input
            indicator = np.zeros((k, k // block), np.float32)
            indicator[np.arange(k), np.arange(k) // block] = 1
            sums[graph, k, block] = add_initializer(
                graph, indicator, fresh_name(graph, f"block_sums_{k}_{block}", "indicator")
            )
        summed = ir.node("MatMul", [x, sums[graph, k, block]], name=f"{base}.block_sums")
        summed.outputs[0].name = f"{base}.block_sums"
        new.append(summed)
        sums[key] = summed.outputs[0]
    packed, scales, zeros, width, n, rows = offsets
    correction = ir.node(
        "MatMulNBits",
        [sums[key], packed, scales, zeros],
        {"K": rows, "N": n, "bits": 4, "block_size": width, "accuracy_level": INT8_LEVEL},
        domain=MS_DOMAIN,
        name=f"{base}.offsets",
    )
    added = ir.node("Add", [y, correction.outputs[0]], name=f"{base}.with_offsets")
    return [*new, correction, added]


def offset_initializers(graph: ir.Graph, offset: np.ndarray, base: str) -> tuple:
    """The offsets [N, blocks] as a 4-bit weight [blocks, N] (asymmetric, one block of OFFSET_BLOCK
    rows): (B, scales, zero points, block, N, rows)."""
    weight = np.ascontiguousarray(offset.T)
    rows, n = weight.shape
    packed, scales, zeros = nbits_layout(rtn(weight, OFFSET_BLOCK, False))
    return (
        add_initializer(graph, packed, fresh_name(graph, base, "offsets_int4")),
        add_initializer(graph, scales, fresh_name(graph, base, "offsets_scale")),
        add_initializer(graph, zeros, fresh_name(graph, base, "offsets_zero_point")),
        OFFSET_BLOCK,
        n,
        rows,
    )
