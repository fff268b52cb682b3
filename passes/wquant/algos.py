"""4-bit block quantization of a MatMul weight: the shared block form and round-to-nearest.

A weight ``w`` [K, N] (MatMul's B) is cut, per output column n, into blocks of ``block`` rows along K
(K padded with zeros to a multiple of ``block``); each block has a scale and a zero point, and
``w[k, n] ≈ (q - zero) * scale``. This is the layout onnxruntime's MatMulNBits stores ([N, blocks,
block]), so the packers only have to pack.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxopt.passes.quant.qmath import quantize_symmetric

MAXQ = 15  # 4-bit unsigned codes 0..15
SYMMETRIC_ZERO = 8  # the zero point of signed int4 values stored unsigned (MatMulNBits' default)


@dataclasses.dataclass
class Blocks:
    q: np.ndarray  # uint8 [N, blocks, block], codes 0..15
    scale: np.ndarray  # float32 [N, blocks]
    zero: np.ndarray  # uint8 [N, blocks], 0..15 (SYMMETRIC_ZERO everywhere when symmetric)
    k: int  # rows of the weight before padding
    bits: int = 4  # 8: codes 0..255 about a zero point of 128 (keep_8bit's weight-only layers)

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is the midpoint, the default of MatMulNBits and GatherBlockQuantized."""
        return bool(np.all(self.zero == 1 << (self.bits - 1)))

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
    """Scale and zero point of each block (last axis) of ``x``: its min/max range; symmetric, the scale
    that puts the weight of largest magnitude on code 0 (value -8), so all 16 codes are used (the scale
    is negative when that weight is positive), as onnxruntime's quantizer does."""
    if symmetric:
        peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        scale = peak / -SYMMETRIC_ZERO
        zero = np.full(scale.shape, SYMMETRIC_ZERO, np.uint8)
        return np.where(scale != 0, scale, 1).astype(np.float32), zero
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


# A block is on a 4-bit grid when every weight is within this fraction of its step of lo + step * q:
# dequantized from a 4-bit format (SmolLM2-135M's layers, from GGUF Q4_1: 0.0 exactly; its Q8_0
# table: 0.5, the most a weight can be off any grid)
GRID_TOLERANCE = 1e-3
GRID_PROBE = 64  # columns checked first, so a weight off any grid costs little


def on_grid(w: np.ndarray, block: int) -> tuple[Blocks, np.ndarray] | None:
    """When every block of ``w`` [K, N] is lo + step * q with q in 0..15 (weights dequantized from an
    asymmetric 4-bit format such as GGUF's Q4_1): Blocks with exactly those codes and steps, the
    zero points nearest -lo / step, and each block's offset [N, blocks], lo + zero * step, that an
    integer zero point leaves out: codes, step, zero point and offset give the weight back exactly.
    None for any other weight, or a K that is not a multiple of ``block``."""
    if w.shape[0] % block or w.size == 0 or _grid_fit(w[:, :GRID_PROBE], block) is None:
        return None
    fit = _grid_fit(w, block)
    if fit is None:
        return None
    lo, step, q = fit
    # the integer zero point nearest -lo / step leaves offsets within half a step, which 4 bits hold
    # finely (with zero point 8 for all, 1.7 MB less on SmolLM2-135M, the offsets spread over several
    # steps and 4-bit offsets cost perplexity: 80.15 against 77.54)
    zero = np.clip(np.rint(-lo / step), 0, MAXQ).astype(np.uint8)
    offset = (lo + zero * step).astype(np.float32)
    return Blocks(q, step, zero, w.shape[0]), offset


def _grid_fit(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(lo, step, codes) of each block of ``w`` when every weight sits on lo + step * code within
    GRID_TOLERANCE of a step, else None."""
    x = blocked(w, block)
    lo = x.min(-1)
    step = (x.max(-1) - lo) / MAXQ
    step = np.where(step > 0, step, 1).astype(np.float32)
    q = np.clip(np.rint((x - lo[..., None]) / step[..., None]), 0, MAXQ)
    if np.any(np.abs(lo[..., None] + step[..., None] * q - x) > GRID_TOLERANCE * step[..., None]):
        return None
    return lo, step, q.astype(np.uint8)


def block_error(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Squared error of each block of ``x`` [..., block] encoded at the given scales and zero points."""
    q = encode(x, scale, zero).astype(np.float64)
    return ((x - (q - zero[..., None]) * scale[..., None]) ** 2).sum(-1)


def keep_better(best, scale, zero, x, s, z):
    """(error, scale, zero) of each block: the candidate ``s, z`` where it encodes ``x`` better than ``best``."""
    err = block_error(x, s, z)
    better = err < best
    return np.where(better, err, best), np.where(better, s, scale), np.where(better, z, zero)


RANGE_FACTORS = tuple(np.linspace(0.7, 0.975, 12))


def search_range(
    x: np.ndarray, symmetric: bool, factors=RANGE_FACTORS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the range ``params`` gives shrunk by the factor (1 = RTN included) that encodes it best:
    clipping a few extreme weights buys a finer step for all the others."""
    scale, zero = params(x, symmetric)
    best = block_error(x, scale, zero)
    for f in factors:
        s, z = params(x * f, symmetric)
        best, scale, zero = keep_better(best, scale, zero, x, s, z)
    return best, scale, zero


BLOCK_8BIT = (
    128  # keep_8bit's MatMul weights: at 8 bits a coarse block costs no accuracy and few bytes
)


def block_8bit(k: int) -> int:
    """The block of an 8-bit weight with ``k`` rows: ``BLOCK_8BIT``, or the least power of two (>= 16,
    MatMulNBits' least) that holds all ``k`` rows when that is smaller, so little is padding."""
    return min(BLOCK_8BIT, max(16, 1 << (k - 1).bit_length()))


def rtn_8bit(w: np.ndarray, block: int) -> Blocks:
    """Symmetric 8-bit blocks: codes 1..255 about 128, ±max|x| of each block at ±127."""
    x = blocked(w, block)
    q, scale = quantize_symmetric(x.reshape(-1, block), axis=0)
    codes = (q.astype(np.int16) + 128).astype(np.uint8).reshape(x.shape)
    scale = scale.reshape(x.shape[:2])
    return Blocks(codes, scale, np.full(scale.shape, 128, np.uint8), w.shape[0], bits=8)


# --- HQQ: data-free, half-quadratic fit of each block's affine map


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft-thresholding: the proximal step of the l_p (p < 1) penalty HQQ puts on the error."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.maximum(a - a ** (p - 1) / beta, 0)


def fit_scale(t: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Least-squares scale of ``t ≈ s * c`` per block (the old ``s`` where that is undefined, zero, or of
    the other sign)."""
    num, den = (t * c).sum(-1), (c * c).sum(-1)
    return np.where((den > 0) & (num * s > 0), num / np.where(den > 0, den, 1), s)


def hqq(
    w: np.ndarray,
    block: int,
    symmetric: bool,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    factors=RANGE_FACTORS,
) -> Blocks:
    """Half-Quadratic Quantization (Badri & Shaji 2023), data-free.

    Starts from the best shrunk range of each block (``search_range``; RTN when ``factors`` is empty).
    Each iteration encodes the blocks, splits the residual into a sparse error ``e`` (the l_p shrink,
    which soaks up the few badly represented weights) and fits the affine map to ``w - e``: HQQ's
    closed-form zero point, then the least-squares scale (HQQ keeps the scale; refitting it is what
    still helps once the zero is rounded). Symmetric blocks keep zero 8 and refit the scale only. The
    residual is shrunk in units of the block's step, so ``beta`` means the same at any weight scale.
    Zero points are rounded to integers (MatMulNBits stores 4-bit ones) and every block keeps the
    candidate with the lowest squared error after that rounding, so none ends worse than RTN.
    """
    x = blocked(w, block).astype(np.float64)
    best, scale, zero = search_range(x, symmetric, factors)
    s, z = scale.astype(np.float64), zero.astype(np.float64)
    for _ in range(iters):
        q = np.clip(np.rint(x / s[..., None] + z[..., None]), 0, MAXQ)
        e = s[..., None] * shrink_lp(x / s[..., None] - (q - z[..., None]), beta, p)
        if not symmetric:
            z = (q - (x - e) / s[..., None]).mean(-1)
        s = fit_scale(x - e, q - z[..., None], s)
        beta *= kappa
        zi = np.clip(np.rint(z), 0, MAXQ).astype(np.uint8)
        best, scale, zero = keep_better(best, scale, zero, x, s.astype(np.float32), zi)
    return Blocks(encode(x, scale, zero), scale, zero, w.shape[0])


# --- GPTQ: calibrated, with the error of each quantized row pushed onto the rows not yet quantized


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U): row i of U, over U[i, i], spreads
    the error of row i onto rows i.. the way that minimises the output error (GPTQ).

    With J the order reversal and J H J = M M^T, H = R R^T for the upper R = J M J, so U = R^-1:
    one Cholesky and one inverse."""
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    m = np.linalg.cholesky(h[::-1, ::-1])
    return np.linalg.inv(m)[::-1, ::-1]


def gptq(
    w: np.ndarray,
    block: int,
    symmetric: bool,
    hessian: np.ndarray,
    damp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    factors=(),
) -> Blocks:
    """GPTQ (Frantar et al. 2022) of ``w`` [K, N] for the Hessian ``hessian`` [K, K] ∝ X^T X of its
    calibration inputs X [rows, K] (any positive multiple works: damping is relative to its diagonal).

    Rows along K are quantized one at a time, each one's error compensated on the rows after it, in lazy
    batches of ``blocksize`` rows (rounded to a multiple of ``block``, so a block never straddles two).
    A block's scale and zero point are fixed when its first row comes up, from its weights as updated so
    far (their ``params``, or the best range over ``factors`` as in ``search_range``), so the result is exact Blocks.
    ``act_order`` quantizes rows by decreasing Hessian diagonal; blocks stay contiguous in K by fixing
    all their scales and zero points up front from the original weights ("static groups").
    """
    k, n = w.shape
    x = w.astype(np.float64)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0  # inputs that were always zero: their weights do not matter, make them 0
    h[dead, dead] = 1
    x[dead] = 0
    nblocks = -(-k // block)
    scale, zero = np.ones((n, nblocks), np.float32), np.full((n, nblocks), SYMMETRIC_ZERO, np.uint8)
    order = np.arange(k)
    if act_order:
        _, scale, zero = search_range(blocked(x, block).astype(np.float64), symmetric, factors)
        order = np.argsort(-np.diag(h), kind="stable")
        x, h = x[order], h[np.ix_(order, order)]
    u = inverse_cholesky(h, damp)
    codes = np.zeros((k, n), np.uint8)
    step = max(block, blocksize // block * block)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        part, errors = x[i1:i2].copy(), np.zeros((i2 - i1, n))
        for i in range(i2 - i1):
            g = order[i1 + i] // block
            if not act_order and (i1 + i) % block == 0:
                _, scale[:, g], zero[:, g] = search_range(part[i : i + block].T, symmetric, factors)
            row = part[i]
            codes[i1 + i] = encode(row[:, None], scale[:, g], zero[:, g])[:, 0]
            dq = (codes[i1 + i] - zero[:, g].astype(np.float64)) * scale[:, g]
            errors[i] = (row - dq) / u[i1 + i, i1 + i]
            part[i:] -= np.outer(u[i1 + i, i1 + i : i2], errors[i])
        x[i2:] -= u[i1:i2, i2:].T @ errors
    q = np.repeat(zero[..., None], block, -1).reshape(n, -1)  # padding rows encode 0
    q[:, order] = codes.T
    return Blocks(q.reshape(n, nblocks, block), scale, zero, k)
