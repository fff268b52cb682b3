"""4-bit ``Blocks`` laid out the way each target stores them.

- onnxruntime's MatMulNBits: B uint8 [N, k_blocks, block/2], two codes per byte along K (the lower k
  in the low nibble), scales float32 [N * k_blocks], zero points (asymmetric only) uint8 [N *
  ceil(k_blocks/2)], two per byte, each row of N packed apart. Without zero points it takes 8.
  8-bit Blocks (keep_8bit's layers) are stored one code per byte, taking 128 without zero points.
- onnxruntime's GatherBlockQuantized on uint8 data: the table [V, D] blocked along D, data uint8
  [V, D/2] packed like B, scales [V, k_blocks], zero points uint8 [V, ceil(k_blocks/2)] packed per row;
  without zero points it takes 8 too (int4/uint4 data would take 0).
- DequantizeLinear (opset 21) with ``block_size``: int4 values (codes - 8, zero point 0, left out) or
  uint4 codes with uint4 zero points, scales [k_blocks, N] blocked along K (axis 0); 8-bit Blocks
  as int8 values (codes - 128). Standard Gather
  takes no int4 data, so a table keeps GatherBlockQuantized's packed rows and its codes are unpacked
  after the lookup (see ``_int4_gather``).

A table [V, D] is quantized as the weight ``table.T`` [D, V], so its Blocks are [V, k_blocks, block].
"""

from __future__ import annotations

import numpy as np

from onnxopt.passes.wquant.algos import Blocks


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [..., n] → bytes [..., ceil(n/2)], the even element in the low nibble."""
    codes = codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of ``pack_nibbles``: the first ``n`` codes of each row."""
    codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
    return codes[..., :n]


def nbits_layout(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points or None when every zero point is MatMulNBits' default, 8 or 128).
    8-bit Blocks keep one code (and zero point) per byte."""
    pack = pack_nibbles if blocks.bits == 4 else np.asarray
    zero = None if blocks.symmetric else pack(blocks.zero).reshape(-1)
    return pack(blocks.q), blocks.scale.reshape(-1), zero


def gbq_layout(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(data, scales, zero_points or None) of a table whose Blocks came from ``table.T``."""
    codes = blocks.q.reshape(blocks.q.shape[0], -1)[:, : blocks.k]
    zero = None if blocks.symmetric else pack_nibbles(blocks.zero)
    return pack_nibbles(codes), blocks.scale, zero


def qdq_layout(blocks: Blocks) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray | None]:
    """(values [K, N], signed, scale [k_blocks, N], zero point [k_blocks, N] or None) for a blocked
    DequantizeLinear on axis 0: signed values (codes less the midpoint, an int8 array) when symmetric,
    else the unsigned codes (uint8 array) with their zero points."""
    codes = blocks.q.reshape(blocks.q.shape[0], -1)[:, : blocks.k].T
    scale = np.ascontiguousarray(blocks.scale.T)
    if blocks.symmetric:
        return (
            np.ascontiguousarray(
                (codes.astype(np.int16) - (1 << (blocks.bits - 1))).astype(np.int8)
            ),
            True,
            scale,
            None,
        )
    return np.ascontiguousarray(codes), False, scale, np.ascontiguousarray(blocks.zero.T)
