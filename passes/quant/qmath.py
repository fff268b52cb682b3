"""Quantization arithmetic in numpy: the reference the graph rewrites and the tests are held to."""

from __future__ import annotations

import numpy as np


def symmetric_scale(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """max |w| / qmax over everything (axis None) or per slice along ``axis``; 1 where a slice is all zero."""
    if axis is None:
        amax = np.abs(w).max(initial=0.0)
    else:
        amax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1, initial=0.0)
    scale = np.asarray(amax / qmax, np.float64)
    return np.where(scale > 0, scale, 1.0)


def quantize_symmetric(
    w: np.ndarray, axis: int | None = None, *, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales with w ≈ q * scale (zero point 0); 7 bits with ``reduce_range``."""
    qmax = 63 if reduce_range else 127
    scale = symmetric_scale(w.astype(np.float64), axis, qmax)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0, axis: int | None = None
) -> np.ndarray:
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    zp = np.asarray(zero_point, np.float64).reshape(shape if np.ndim(zero_point) else ())
    return (
        (q.astype(np.float64) - zp)
        * np.asarray(scale, np.float64).reshape(shape if np.ndim(scale) else ())
    ).astype(np.float32)


def dynamic_uint8(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """What ONNX DynamicQuantizeLinear computes: the range includes 0, zero point rounded and saturated."""
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zero_point = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zero_point, 0, 255).astype(np.uint8)
    return q, scale, zero_point
