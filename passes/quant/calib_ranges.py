"""Streaming activation-range calibration for static int8 quantization: min/max, percentile and
entropy (KL) ranges from a fixed-size histogram that widens as batches arrive."""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "entropy")
SMOOTH = 1e-4  # probability given to candidate bins that are empty where the reference is not, so KL stays finite


class RangeCollector:
    """Streams batches of one tensor; memory stays constant whatever the number of batches."""

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins % 2:
            raise ValueError(f"RangeCollector: bins must be an even number >= 2, got {bins}")
        self._bins = bins
        self._width: float | None = None  # set by the first non-zero value
        self._neg = np.zeros(bins, np.int64)  # counts of |x| for x < 0, bin k covers [k w, (k+1) w)
        self._pos = np.zeros(bins, np.int64)  # the same for x > 0
        self._zeros = 0
        self._count = 0
        self._min = np.inf
        self._max = -np.inf

    def update(self, x: np.ndarray) -> None:
        """Add one batch (any shape); NaN and inf are ignored."""
        a = np.asarray(x, np.float64).ravel()
        a = a[np.isfinite(a)]
        if not a.size:
            return
        self._count += a.size
        self._min = min(self._min, float(a.min()))
        self._max = max(self._max, float(a.max()))
        self._zeros += int(np.count_nonzero(a == 0))
        amax = float(np.abs(a).max())
        if amax == 0:
            return
        if self._width is None:
            self._width = amax / self._bins
        while amax > self._width * self._bins:
            self._double()
        self._neg += self._bin_counts(-a[a < 0])
        self._pos += self._bin_counts(a[a > 0])

    def range(
        self, method: str = "percentile", percentile: float = 99.99, symmetric: bool = False
    ) -> tuple[float, float]:
        """(lo, hi) with lo <= 0 <= hi; (-t, t) when ``symmetric``."""
        if method not in METHODS:
            raise ValueError(
                f"RangeCollector.range: unknown method {method!r}, expected one of {', '.join(METHODS)}"
            )
        if not 0 < percentile <= 100:
            raise ValueError(
                f"RangeCollector.range: percentile must be in (0, 100], got {percentile}"
            )
        if not self._count:
            raise ValueError("RangeCollector.range: no finite values seen yet, call update() first")
        if self._width is None:
            return 0.0, 0.0
        if method == "minmax":
            lo, hi = self._min, self._max
        elif method == "percentile":
            lo, hi = self._percentile_range(percentile, symmetric)
        else:
            lo, hi = self._entropy_range(symmetric)
        if symmetric:
            t = max(-lo, hi)
            return -float(t), float(t)
        return float(min(lo, 0.0)), float(max(hi, 0.0))

    def _double(self) -> None:
        """Double the histogram's range, merging pairs of bins (bin edges nest, so this is exact)."""
        half = self._bins // 2
        for h in (self._neg, self._pos):
            h[:half] = h.reshape(half, 2).sum(1)
            h[half:] = 0
        self._width *= 2

    def _bin_counts(self, mags: np.ndarray) -> np.ndarray:
        """Counts per bin of non-negative magnitudes already inside the range."""
        idx = np.minimum((mags / self._width).astype(np.int64), self._bins - 1)
        return np.bincount(idx, minlength=self._bins)

    def _edges(self) -> np.ndarray:
        return np.arange(self._bins + 1) * self._width

    def _percentile_range(self, p: float, symmetric: bool) -> tuple[float, float]:
        """Percentile of |x| (symmetric) or of each tail; exact zeros are a point mass at 0."""
        e = self._edges()
        if symmetric:
            edges = np.concatenate([[0.0], e])
            counts = np.concatenate([[self._zeros], self._neg + self._pos])
            t = min(_quantile(edges, counts, p / 100), max(-self._min, self._max))
            return -t, t
        edges = np.concatenate([-e[::-1], e])  # 0 appears twice: the zero-width bin of exact zeros
        counts = np.concatenate([self._neg[::-1], [self._zeros], self._pos])
        lo = max(_quantile(edges, counts, 1 - p / 100), self._min)
        hi = min(_quantile(edges, counts, p / 100), self._max)
        return lo, hi

    # Our reading of TensorRT's entropy calibration (Migacz, "8-bit inference with TensorRT", 2017):
    # for every candidate threshold of i bins (i >= the number of levels), the reference P is the
    # first i bins with all clipped counts added to the edge bin; the candidate Q merges those same
    # i bins (without the clipped counts) into `levels` groups of consecutive bins and spreads each
    # group's total evenly back over its non-empty bins. Both are normalized and the threshold with
    # the least KL(P || Q) wins. Symmetric: the histogram of |x| with 128 levels. Asymmetric: the
    # signed histogram with 256 levels; the window grows one bin a side from zero and stops on a side
    # once it covers that side's data, so a one-signed tensor is searched over its own side only.
    # Our addition: a threshold must keep at least half of the values. Without it, data far from zero
    # (say all in [2, 5]) gets a window ending where the data begins: everything folds into one bin,
    # P and Q agree and the KL is near zero.
    def _entropy_range(self, symmetric: bool) -> tuple[float, float]:
        """Clipping range minimizing the KL divergence to the 8-bit quantized histogram."""
        neg, pos = self._neg.copy(), self._pos.copy()
        pos[0] += (
            self._zeros
        )  # within one bin of 0, and it keeps bin 0 non-empty where zeros are common
        if symmetric:
            t = self._entropy_symmetric(neg + pos)
            return -t, t
        return self._entropy_asymmetric(neg, pos)

    def _entropy_symmetric(self, h: np.ndarray) -> float:
        """Threshold on |x| over 128 levels."""
        amax = max(-self._min, self._max)
        n = _extent(h)
        if n <= 128:
            return amax
        clipped = h.sum() - np.cumsum(h)  # clipped[i - 1]: the count beyond i bins
        kl = [
            _kl_divergence(h[:i], 0, int(clipped[i - 1]), 128)
            if 2 * clipped[i - 1] <= h.sum()
            else np.inf
            for i in range(128, n + 1)
        ]
        return min((128 + int(np.argmin(kl))) * self._width, amax)

    def _entropy_asymmetric(self, neg: np.ndarray, pos: np.ndarray) -> tuple[float, float]:
        """(lo, hi) over 256 levels on the signed histogram."""
        nneg, npos = _extent(neg), _extent(pos)
        if nneg + npos <= 256:
            return self._min, self._max
        signed, c = np.concatenate([neg[::-1], pos]), self._bins
        total = int(signed.sum())
        best, best_ab = np.inf, (nneg, npos)
        for i in range(1, max(nneg, npos) + 1):
            a, b = min(i, nneg), min(i, npos)
            left, right = int(signed[: c - a].sum()), int(signed[c + b :].sum())
            if a + b < 256 or 2 * (left + right) > total:
                continue
            kl = _kl_divergence(signed[c - a : c + b], left, right, 256)
            if kl < best:
                best, best_ab = kl, (a, b)
        a, b = best_ab
        return max(-a * self._width, self._min), min(b * self._width, self._max)


def _extent(h: np.ndarray) -> int:
    """Number of bins up to and including the last non-empty one."""
    nz = np.flatnonzero(h)
    return int(nz[-1]) + 1 if nz.size else 0


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) of a histogram, interpolating linearly inside the bin it falls in."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[k] - counts[k]
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return float(edges[k] + frac * (edges[k + 1] - edges[k]))


def _kl_divergence(window: np.ndarray, left_out: int, right_out: int, levels: int) -> float:
    """KL(P || Q) of a window of bins (clipped counts folded into its end bins) and its ``levels``-level version."""
    h = window.astype(np.float64)
    p = h.copy()
    p[0] += left_out
    p[-1] += right_out
    group = np.minimum(np.arange(h.size) // (h.size // levels), levels - 1)
    filled = h > 0
    totals = np.bincount(group, weights=h, minlength=levels)
    nonempty = np.bincount(group, weights=filled, minlength=levels)
    q = np.where(filled, totals[group] / np.maximum(nonempty[group], 1), 0.0)
    if q.sum() == 0:
        return np.inf
    p /= p.sum()
    q /= q.sum()
    m = p > 0
    q = np.where(m & (q == 0), SMOOTH, q)
    q /= q.sum()
    return float(np.sum(p[m] * np.log(p[m] / q[m])))
