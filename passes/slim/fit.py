"""The numbers of slim: calibration statistics of one FFN, neuron scores, the width each layer keeps
(allocation, apart from scoring so that later budgets can replace it) and the least-squares refit of
the down-projection. Pure numpy, float64 throughout."""

from __future__ import annotations

import heapq
import math

import numpy as np


class Stats:
    """What calibration tokens say about one FFN, accumulated batch by batch (memory holds two
    matrices, never the activations): with ``ha`` the activations [T, H] and a ones column, the Gram
    matrix ``ha.T @ ha`` [H+1, H+1], the cross product ``ha.T @ y`` [H+1, N] with the whole
    FFN's output ``y`` (bias included), and the sum of |h| per neuron."""

    def __init__(self, width: int, outputs: int):
        self.gram = np.zeros((width + 1, width + 1))
        self.cross = np.zeros((width + 1, outputs))
        self.abs_sum = np.zeros(width)
        self.y_square = np.zeros(outputs)
        self.stream = 0.0  # sum over tokens of ||z - mean z||², z the residual sum after the layer
        self.count = 0

    def add(self, h: np.ndarray, y: np.ndarray) -> None:
        """``h`` [T, H], ``y`` [T, N]: the same T tokens."""
        ha = np.concatenate([h.astype(np.float64), np.ones((len(h), 1))], axis=1)
        self.gram += ha.T @ ha
        self.cross += ha.T @ y.astype(np.float64)
        self.abs_sum += np.abs(h).sum(0, dtype=np.float64)
        self.y_square += np.square(y.astype(np.float64)).sum(0)
        self.count += len(h)

    def merge(self, other: Stats) -> None:
        self.gram += other.gram
        self.cross += other.cross
        self.abs_sum += other.abs_sum
        self.y_square += other.y_square
        self.stream += other.stream
        self.count += other.count

    @property
    def mean(self) -> np.ndarray:
        return self.gram[:-1, -1] / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        n = max(self.count, 1)
        return np.maximum(np.diag(self.gram)[:-1] / n - self.mean**2, 0.0)


def scores(
    method: str, w1s: list[np.ndarray], w2: np.ndarray, stats: Stats | None = None
) -> np.ndarray:
    """How much each neuron matters, higher is more: ``flap`` (FLAP's fluctuation: the variance of
    its activation over calibration tokens times ||W2[j, :]||²), ``wanda`` (mean |h_j| times
    ||W2[j, :]||) or ``magnitude`` (data-free: the product of ||W1[:, j]|| over the up-projections
    and ||W2[j, :]||)."""
    out_norm2 = np.sum(np.square(w2.astype(np.float64)), axis=1)
    if method == "flap":
        return stats.variance * out_norm2
    if method == "wanda":
        return stats.abs_sum / max(stats.count, 1) * np.sqrt(out_norm2)
    if method == "magnitude":
        score = np.sqrt(out_norm2)
        for w1 in w1s:
            score = score * np.linalg.norm(w1.astype(np.float64), axis=0)
        return score
    raise ValueError(f"unknown score {method!r}")


def kept_width(width: int, ratio: float, multiple: int) -> int:
    """The neurons a layer of ``width`` keeps when ``ratio`` of them go, rounded to the nearest
    multiple of ``multiple`` (at least one multiple, at most ``width``)."""
    if ratio <= 0 or width <= multiple:
        return width
    target = width * (1.0 - ratio)
    kept = int(math.floor(target / multiple + 0.5)) * multiple
    return min(width, max(multiple, kept))


def allocate(widths: list[int], ratio: float, multiple: int) -> list[int]:
    """The width each layer keeps: the same ``ratio`` for every layer (``allocate_by_cost`` shares
    the cut by measured sensitivity instead)."""
    return [kept_width(w, ratio, multiple) for w in widths]


def _error(stats: Stats, idx: np.ndarray, theta: np.ndarray) -> float:
    """||H_S theta - Y||² on the tokens of ``stats`` (``idx`` the kept columns and the ones)."""
    fitted = float(np.sum(theta * (stats.gram[np.ix_(idx, idx)] @ theta)))
    return float(stats.y_square.sum()) - 2.0 * float(np.sum(theta * stats.cross[idx])) + fitted


def _energy(stats: Stats) -> float:
    """What the error is measured against: the residual stream the layer's output joins (centred
    per token, as a LayerNorm sees it) when known, else the output's own variance."""
    if stats.stream > 0:
        return stats.stream
    n = max(stats.count, 1)
    return float(stats.y_square.sum() - np.sum(np.square(stats.cross[-1])) / n)


def residual(folds: list[Stats], keep: np.ndarray, ridge: float) -> float:
    """The share of the layer's output the refit on ``keep`` leaves unexplained, cross-validated:
    the refit on each fold of calibration tokens evaluated on the others, ||H_S W2' + b2' - Y||²
    over ||Y - mean Y||², from the Gram matrices alone (no run). In-sample residuals flatter wide
    layers: with ~3k tokens for ~1.5k coefficients the refit overfits."""
    idx = np.concatenate([keep, [folds[0].gram.shape[0] - 1]])
    left = 0.0
    for i, fold in enumerate(folds):
        w, b = refit(fold, keep, ridge)
        theta = np.concatenate([w, b[None]], axis=0)
        others = [f for j, f in enumerate(folds) if j != i] or [fold]
        left += sum(max(_error(o, idx, theta), 0.0) for o in others)
    energy = sum(_energy(f) for f in folds) * max(len(folds) - 1, 1)
    return left / max(energy, 1e-30)


def levels(width: int, multiple: int) -> list[int]:
    """The widths a layer may keep, widest first: its own, then the multiples of ``multiple`` below
    it down to one multiple."""
    if width <= multiple:
        return [width]
    below = list(range((width - 1) // multiple * multiple, 0, -multiple))
    return [width, *below]


def sensitivity(
    folds: list[Stats], score: np.ndarray, ridge: float, multiple: int, steps: int = 8
) -> dict[int, float]:
    """The refit residual (see ``residual``) at every width of ``levels``, above the full width's:
    measured at ``steps`` evenly spaced widths (the kept neurons the best by ``score``),
    interpolated linearly in between and made non-increasing in the width."""
    width = len(score)
    options = levels(width, multiple)
    if len(options) == 1:
        return {width: 0.0}
    probes = sorted(
        {width, multiple} | {kept_width(width, i / steps, multiple) for i in range(1, steps)}
    )
    measured = np.array([residual(folds, choose(score, k), ridge) for k in probes])
    measured = np.maximum(measured - measured[-1], 0.0)
    curve = np.interp(options, probes, measured)
    return {k: float(c) for k, c in zip(options, np.maximum.accumulate(curve))}


def allocate_by_cost(
    costs: list[dict[int, float]], unit_macs: list[int], ratio: float
) -> list[int]:
    """The width each layer keeps so that about ``ratio`` of all the layers' MACs go, removing one
    step of ``levels`` at a time from the layer whose next step adds the least cost per MAC (a
    global priority queue over the curves of ``sensitivity``). Equal curves give equal cuts."""
    widths = [max(c) for c in costs]
    total = sum(w * m for w, m in zip(widths, unit_macs))
    target = ratio * total
    steps = [sorted(c, reverse=True) for c in costs]
    at = [0] * len(costs)
    queue = []

    def push(i: int) -> None:
        if at[i] + 1 < len(steps[i]):
            now, nxt = steps[i][at[i]], steps[i][at[i] + 1]
            macs = (now - nxt) * unit_macs[i]
            rise = (costs[i][nxt] - costs[i][now]) / macs
            heapq.heappush(queue, (rise, 1 - now / widths[i], i, macs))

    for i in range(len(costs)):
        push(i)
    removed = 0.0
    while queue:
        *_, i, macs = heapq.heappop(queue)
        if removed + macs / 2 > target:
            break
        removed += macs
        at[i] += 1
        push(i)
    return [s[a] for s, a in zip(steps, at)]


def choose(score: np.ndarray, kept: int) -> np.ndarray:
    """The ``kept`` best-scored neurons, in their original order."""
    order = np.argsort(-score, kind="stable")[:kept]
    return np.sort(order)


def refit(
    stats: Stats, keep: np.ndarray, ridge: float, prior: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The projection (W' [|S|, N], b' [N]) that best maps the kept activations to the target
    output: argmin ||H_S W' + b' - Y||² + λ||W' - prior||², λ = ``ridge`` times the mean diagonal
    of H_S^T H_S (the bias is not damped), solved from the Gram matrices in float64. ``prior``
    (the kept rows as they were) damps towards the original weights rather than towards zero:
    with about as many calibration rows as unknowns (an FFN's 2770 tokens for 1537; the deepest
    YOLOv8n Convs see 100 positions per image for 2304 inputs) the fit stays near them instead of
    shrinking them."""
    idx = np.concatenate([keep, [stats.gram.shape[0] - 1]])
    a = stats.gram[np.ix_(idx, idx)].copy()
    n = len(keep)
    damp = ridge * float(np.trace(a[:n, :n])) / max(n, 1)
    damp = max(damp, 1e-12 * max(float(np.abs(a).max()), 1e-30))
    a[np.arange(n), np.arange(n)] += damp
    b = stats.cross[idx].copy()
    if prior is not None:
        b[:n] += damp * prior
    try:
        solution = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(a, b, rcond=None)[0]
    return solution[:n], solution[n]


def drop(
    w2: np.ndarray, b2: np.ndarray, keep: np.ndarray, stats: Stats | None, compensate: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The down-projection with the dropped neurons' rows removed; with ``compensate`` (FLAP's bias
    compensation) their mean contribution over calibration tokens moves into the bias."""
    w2 = w2.astype(np.float64)
    b2 = b2.astype(np.float64)
    if compensate:
        gone = np.setdiff1d(np.arange(len(w2)), keep)
        b2 = b2 + stats.mean[gone] @ w2[gone]
    return w2[keep], b2


def patches(
    x: np.ndarray,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> np.ndarray:
    """The im2col rows of a 2-D Conv's input ``x`` [B, C, H, W]: one row per output position,
    columns ordered as the weight's [C, kh, kw] (so ``rows @ W.reshape(Cout, -1).T`` is the Conv)."""
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1]]
    b, c, h, w, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(b * h * w, c * kh * kw)


def eliminate(stats: Stats, kept: int, ridge: float, size: int = 1) -> np.ndarray:
    """The ``kept`` groups of ``size`` consecutive neurons (a neuron; an attention head's context
    channels) left after removing, one group at a time, the one whose removal (the rest refit by
    least squares) adds the least output error, tr(θ_Sᵀ [G⁻¹]_SS⁻¹ θ_S); the refit θ and G⁻¹
    are updated in closed form after each removal (Optimal Brain Surgeon on whole rows, as
    ZipLM). The bias column always stays. Returns the kept groups' indices."""
    n = stats.gram.shape[0] - 1
    groups = n // size
    g = stats.gram.copy()
    damp = ridge * float(np.trace(g[:n, :n])) / max(n, 1)
    g[np.arange(n), np.arange(n)] += max(damp, 1e-12 * max(float(np.abs(g).max()), 1e-30))
    inverse = np.linalg.inv(g)
    theta = inverse @ stats.cross
    alive = np.ones(groups, bool)
    rows = np.arange(n).reshape(groups, size)
    for _ in range(groups - kept):
        blocks = inverse[rows[:, :, None], rows[:, None, :]]  # [groups, size, size]
        blocks[~alive] = np.eye(size)
        t = theta[rows]  # [groups, size, N]
        cost = np.sum(t * np.linalg.solve(blocks, t), axis=(1, 2))
        cost[~alive] = np.inf
        j = rows[int(np.argmin(cost))]
        pivot = inverse[np.ix_(j, j)]
        columns = inverse[:, j].copy()
        theta -= columns @ np.linalg.solve(pivot, theta[j])
        inverse -= columns @ np.linalg.solve(pivot, columns.T)
        alive[j[0] // size] = False
        inverse[j, :] = 0.0
        inverse[:, j] = 0.0
        theta[j] = 0.0
    return np.flatnonzero(alive)
