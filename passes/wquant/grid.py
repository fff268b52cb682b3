"""Weights already on a 4-bit grid, stored exactly (format=ort).

A model converted from a 4-bit checkpoint (a GGUF Q4_1 file: per block of 32 along K a step d and a
minimum m, w = m + d * q) holds fp32 weights that sit exactly on such a grid. MatMulNBits can hold the
codes and steps but only an integer zero point, so re-quantizing loses each block's fraction of a
step (|offset| <= d/2, the same for all 32 weights of the block): on SmolLM2-135M round to nearest
left perplexity +36 %, and GPTQ on 128 calibration windows +7 %, though the codes were there.

So when ``algos.on_grid`` finds the grid, the layer becomes one MatMulNBits of [x, x @ P], where P
[K, blocks] sums each block of x's channels (made once per input, shared by the layers reading it),
whose weight is the layer's codes, steps and zero points followed by the offsets [blocks, N] as
rows of their own, 4-bit (about a byte per 32 weights: SmolLM2-135M 88.4 -> 92.4 MB; 8-bit offsets
cost 2.5 MB more for the same perplexity). Offsets within half a step of zero (blocks that straddle
zero, as LLM weights' do) come out exact to ~1/30 of a step instead of 1/2. Decode steps run 8 %
slower than without the offsets; as a second MatMulNBits and an Add per layer they ran 18 % slower.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._common import add_initializer, fresh_name
from onnxopt.passes.wquant.algos import Blocks, rtn


def with_offsets(blocks: Blocks, offset: np.ndarray) -> Blocks:
    """The layer's blocks followed by its offsets [N, blocks] as rows of their own: the weight of
    [x, block sums of x], K + blocks rows, the offsets 4-bit (asymmetric) in blocks of the same size."""
    rows = np.ascontiguousarray(offset.T)  # [blocks, N]
    extra = rtn(rows, blocks.q.shape[-1], False)
    return Blocks(
        np.concatenate([blocks.q, extra.q], axis=1),
        np.concatenate([blocks.scale, extra.scale], axis=1),
        np.concatenate([blocks.zero, extra.zero], axis=1),
        blocks.k + rows.shape[0],
    )


def extended_input(
    node: ir.Node, k: int, block: int, cache: dict
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes making [x, x @ P] from ``node``'s input x (P [K, blocks] sums each block of channels),
    once per input (``cache``), and that value."""
    graph, x = node.graph, node.inputs[0]
    key = (graph, x, k, block)
    if key in cache:
        return [], cache[key]
    if (graph, k, block) not in cache:  # one indicator per shape, shared by every input
        indicator = np.zeros((k, k // block), np.float32)
        indicator[np.arange(k), np.arange(k) // block] = 1
        cache[graph, k, block] = add_initializer(
            graph, indicator, fresh_name(graph, f"block_sums_{k}_{block}", "indicator")
        )
    base = node.name or node.outputs[0].name or "matmul"
    sums = ir.node("MatMul", [x, cache[graph, k, block]], name=f"{base}.block_sums")
    joined = ir.node("Concat", [x, sums.outputs[0]], {"axis": -1}, name=f"{base}.with_block_sums")
    lead = list(x.shape)[:-1] if x.shape is not None else None
    for value, suffix, width in (
        (sums.outputs[0], "block_sums", k // block),
        (joined.outputs[0], "with_block_sums", k + k // block),
    ):
        value.name, value.type = f"{base}.{suffix}", ir.TensorType(ir.DataType.FLOAT)
        value.shape = None if lead is None else ir.Shape([*lead, width])
    cache[key] = joined.outputs[0]
    return [sums, joined], joined.outputs[0]
