"""4-bit block quantization of a MatMul weight: the shared block form and round-to-nearest.

A weight ``w`` [K, N] (MatMul's B) is cut, per output column n, into blocks of ``block`` rows along K
(K padded with zeros to a multiple of ``block``); each block has a scale and a zero point, and
``w[k, n] ≈ (q - zero) * scale``. This is the layout onnxruntime's MatMulNBits stores ([N, blocks,
block]), so the packers only have to pack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAXQ = 15  # 4-bit unsigned codes 0..15
SYMMETRIC_ZERO = 8  # the zero point of signed int4 values stored unsigned (MatMulNBits' default)


@dataclasses.dataclass
class Blocks:
    q: np.ndarray  # uint8 [N, blocks, block], codes 0..15
    scale: np.ndarray  # float32 [N, blocks]
    zero: np.ndarray  # uint8 [N, blocks], 0..15 (SYMMETRIC_ZERO everywhere when symmetric)
    k: int  # rows of the weight before padding

    def dequantize(self) -> np.ndarray:
        """The weight these blocks stand for, [K, N] float32."""
        w = (self.q.astype(np.float32) - self.zero[..., None]) * self.scale[..., None]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, : self.k].T)


def blocked(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] → [N, blocks, block], K zero-padded to a multiple of ``block``."""
    k, n = w.shape
    padded = -(-k // block) * block
    out = np.zeros((n, padded), np.float32)
    out[:, :k] = w.T
    return out.reshape(n, padded // block, block)


def params(x: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block (last axis) of ``x``: its min/max range, or ±max|x| when symmetric."""
    if symmetric:
        amax = np.abs(x).max(-1)
        scale = amax / (MAXQ - SYMMETRIC_ZERO)
        zero = np.full(scale.shape, SYMMETRIC_ZERO, np.uint8)
    else:
        lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
        scale = (hi - lo) / MAXQ
        zero = np.clip(np.rint(-lo / np.where(scale > 0, scale, 1)), 0, MAXQ).astype(np.uint8)
    return np.where(scale > 0, scale, 1).astype(np.float32), zero


def encode(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Codes of ``x`` [..., block] at the given block scales and zero points."""
    return np.clip(np.rint(x / scale[..., None]) + zero[..., None], 0, MAXQ).astype(np.uint8)


def rtn(w: np.ndarray, block: int, symmetric: bool) -> Blocks:
    """Round to nearest, each block at its own range."""
    x = blocked(w, block)
    scale, zero = params(x, symmetric)
    return Blocks(encode(x, scale, zero), scale, zero, w.shape[0])
