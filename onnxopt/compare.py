"""Run two models on the same inputs and compare their outputs, output by output.

Metrics are accumulated run by run, so memory does not grow with the number of samples. A sample is
a row of an output's first axis (a whole output when it has rank 0 or 1).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import io, runtime
from onnxopt.errors import CheckFailed, OnnxoptError, UsageError, one_line

# Absolute errors are counted in log-spaced bins: 40 a decade from 1e-12 to 1e6 (p99 within 6%).
_EDGES = np.concatenate([[0.0], np.logspace(-12, 6, 18 * 40 + 1), [np.inf]])

# The least (atol, rtol) an exact pass is held to on low-precision outputs: fusing two fp16 ops into
# one skips a rounding in between, so equal math differs by a unit in the last place (fp16: 9.8e-4 at
# 1.0, measured max abs 9.77e-4 / max rel 4.4e-3 on an fp16 Paddle classifier after fuse; bf16: 7.8e-3).
LOW_PRECISION_TOLERANCE = {"tensor(float16)": (2e-3, 1e-2), "tensor(bfloat16)": (1.6e-2, 4e-2)}


@dataclasses.dataclass
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool
    detail: str = ""
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    cosine_min: float = 0.0
    snr_db: float = math.inf
    top1: float | None = None
    topk: float | None = None
    k: int = 0
    samples: int = 0
    histogram: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)


class Accumulator:
    """Everything validate reports about one output, gathered one run at a time."""

    def __init__(self, name: str, atol: float, rtol: float, topk: int | None = None):
        self.name, self.atol, self.rtol, self.k = name, atol, rtol, topk
        self.count = self.samples = 0
        self.sum_abs = self.max_abs = self.max_rel = 0.0
        self.signal = self.noise = 0.0
        self.cosines: list[float] = []
        self.hist = np.zeros(len(_EDGES) - 1, dtype=np.int64)
        self.within = True
        self.detail = ""
        self.top1_hits = self.topk_hits = self.rows = self.k_used = 0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        if self.detail:
            return
        if ref.shape != got.shape:
            self.detail = f"shape {got.shape} != {ref.shape}"
            return
        if ref.dtype.kind in "OSUb" or got.dtype.kind in "OSUb":
            self._update_exact(ref, got)
            return
        a, b = ref.astype(np.float64), got.astype(np.float64)
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        if not np.array_equal(nan_a, nan_b):
            self.detail = "NaNs differ"
            return
        a, b = np.where(nan_a, 0.0, a), np.where(nan_b, 0.0, b)
        with np.errstate(invalid="ignore", over="ignore"):
            same = a == b  # equal infinities have an undefined difference but are equal
            diff = np.where(same, 0.0, np.abs(a - b))
            rel = diff / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
            self.within &= bool(np.all(same | (diff <= self.atol + self.rtol * np.abs(a))))
            self.signal += float(np.sum(np.where(np.isfinite(a), a * a, 0.0)))
            self.noise += float(np.sum(diff * diff))
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            self.hist += np.histogram(diff, _EDGES)[0]
        self.count += diff.size
        rows_a, rows_b = _rows(a), _rows(b)
        self.cosines.extend(_cosines(rows_a, rows_b))
        self.samples += len(rows_a)
        if self.k is not None and a.ndim and a.shape[-1] > 1:
            self._update_topk(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))

    def _update_exact(self, ref: np.ndarray, got: np.ndarray) -> None:
        equal = bool(np.array_equal(ref, got))
        self.within &= equal
        if not equal:
            self.max_abs = self.max_rel = math.inf
        self.cosines.append(float(equal))
        self.samples += 1

    def _update_topk(self, a: np.ndarray, b: np.ndarray) -> None:
        k = self.k_used = min(self.k or 1, a.shape[-1])
        self.top1_hits += int(np.sum(a.argmax(-1) == b.argmax(-1)))
        top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]
        top_b = np.argpartition(-b, k - 1, axis=-1)[:, :k]
        self.topk_hits += sum(len(set(x) & set(y)) for x, y in zip(top_a.tolist(), top_b.tolist()))
        self.rows += len(a)

    def result(self) -> OutputComparison:
        if self.detail:
            return OutputComparison(
                self.name, math.inf, math.inf, 0.0, False, self.detail, math.inf, math.inf
            )
        top1 = self.top1_hits / self.rows if self.rows else None
        topk = self.topk_hits / (self.rows * self.k_used) if self.rows else None
        return OutputComparison(
            name=self.name,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            cosine=float(np.mean(self.cosines)) if self.cosines else 1.0,
            passed=self.within,
            mean_abs=self.sum_abs / self.count if self.count else 0.0,
            p99_abs=min(self.max_abs, _percentile(self.hist, 0.99)),
            cosine_min=float(np.min(self.cosines)) if self.cosines else 1.0,
            snr_db=_snr_db(self.signal, self.noise),
            top1=top1,
            topk=topk,
            k=self.k_used,
            samples=self.samples,
            histogram=_decades(self.hist),
        )


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1) if a.ndim >= 2 else a.reshape(1, -1)


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    same = np.all(a == b, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dots = np.sum(a * b, axis=1)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), same.astype(np.float64))
    return np.where(np.isfinite(cos), cos, same.astype(np.float64)).tolist()


def _snr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _percentile(hist: np.ndarray, q: float) -> float:
    total = hist.sum()
    if not total:
        return 0.0
    index = int(np.searchsorted(np.cumsum(hist), q * total))
    return float(_EDGES[index + 1]) if index else 0.0


def _decades(hist: np.ndarray) -> list[tuple[float, float, int]]:
    """Counts per decade of absolute error: (low, high, count); errors of exactly 0 have low == high == 0."""
    out = [(0.0, 0.0, int(hist[0]))] if hist[0] else []
    fine = hist[1:-1]
    for d in range(18):
        n = int(fine[d * 40 : (d + 1) * 40].sum())
        if n:
            out.append((10.0 ** (d - 12), 10.0 ** (d - 11), n))
    if hist[-1]:
        out.append((1e6, math.inf, int(hist[-1])))
    return out


def compare_arrays(
    name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float
) -> OutputComparison:
    """Polygraphy-style closeness: |got - ref| <= atol + rtol * |ref| element-wise (NaNs must match)."""
    acc = Accumulator(name, atol, rtol)
    acc.update(ref, got)
    return acc.result()


def run_model(
    model: str | os.PathLike | bytes, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    sess = runtime.session(model)
    return run_session(sess, feeds)


def model_session(model: ir.Model, outputs: Iterable[str] = ()):
    """An optimized onnxruntime session of an in-memory ``model`` that also returns the values named
    ``outputs``. The model reaches onnxruntime through a temporary file of a tensor-sharing clone (with
    external data when large), not an in-memory protobuf copy."""
    copy = model.clone()
    values = ir.convenience.create_value_mapping(copy.graph)
    present = {v.name for v in (*copy.graph.inputs, *copy.graph.outputs)}
    copy.graph.outputs.extend(
        values[n] for n in dict.fromkeys(outputs) if n in values and n not in present
    )
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as folder:
        return runtime.session(io.save(copy, Path(folder, "model.onnx")), optimize=True)


def run_ir(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of an in-memory ``model`` on ``feeds``, in an optimized session."""
    return run_session(model_session(model), feeds)


def run_session(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


@dataclasses.dataclass
class Settings:
    """How outputs are compared, per output ('' is every output): tolerances; top-k agreement (k=5 by
    default, automatic on [batch, classes] outputs, forced on others named in ``topk``); ``mean_pool``
    maps an output to the mask input it is averaged with before comparison."""

    atol: dict[str, float] = dataclasses.field(default_factory=lambda: {"": 1e-4})
    rtol: dict[str, float] = dataclasses.field(default_factory=lambda: {"": 1e-3})
    topk: dict[str, int] = dataclasses.field(default_factory=dict)
    mean_pool: dict[str, str] = dataclasses.field(default_factory=dict)
    explicit: frozenset[str] = (
        frozenset()
    )  # outputs whose tolerances the user set ('' for all): no floor

    def tolerances(self, name: str) -> tuple[float, float]:
        return self.atol.get(name, self.atol.get("", 0.0)), self.rtol.get(
            name, self.rtol.get("", 0.0)
        )

    def accumulator(self, name: str, ref: np.ndarray) -> Accumulator:
        k = self.topk.get(name, self.topk.get("", 5))
        if name not in self.topk and (name in self.mean_pool or not _looks_like_scores(ref)):
            k = None
        return Accumulator(name, *self.tolerances(name), k)

    def prepare(self, name: str, value: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        mask_name = self.mean_pool.get(name)
        return value if mask_name is None else masked_mean(value, feeds[mask_name])


def low_precision_floors(settings: Settings, sess) -> Settings:
    """``settings`` with fp16/bf16 outputs of the reference session ``sess`` held to at least
    LOW_PRECISION_TOLERANCE, except where the user set their tolerances."""
    if "" in settings.explicit:
        return settings
    atol, rtol = dict(settings.atol), dict(settings.rtol)
    for output in sess.get_outputs():
        floor = LOW_PRECISION_TOLERANCE.get(output.type)
        if floor and output.name not in settings.explicit:
            a, r = settings.tolerances(output.name)
            atol[output.name], rtol[output.name] = max(a, floor[0]), max(r, floor[1])
    return dataclasses.replace(settings, atol=atol, rtol=rtol)


def _looks_like_scores(ref: np.ndarray) -> bool:
    """Class scores: a float [batch, classes] output."""
    return ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[-1] > 1


def masked_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[batch, tokens, dim] → [batch, dim]: the mean over the tokens the mask keeps (sentence embeddings)."""
    weights = mask.astype(np.float64).reshape(*mask.shape, *([1] * (hidden.ndim - mask.ndim)))
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-12)


def compare_sessions(
    ref_sess,
    cand_sess,
    batches: Iterable[dict[str, np.ndarray]],
    settings: Settings,
    on_batch: Callable[[int], None] | None = None,
) -> list[OutputComparison]:
    """Run both sessions on every batch and compare the reference's outputs with the candidate's."""
    accs: dict[str, Accumulator] = {}
    missing: list[str] = []
    for feeds in batches:
        ref = _run(ref_sess, feeds, UsageError, "the reference model")
        got = _run(cand_sess, feeds, CheckFailed, "the candidate model")
        for name, value in ref.items():
            if name not in got:
                if name not in missing:
                    missing.append(name)
                continue
            a, b = settings.prepare(name, value, feeds), settings.prepare(name, got[name], feeds)
            if name not in accs:
                accs[name] = settings.accumulator(name, a)
            accs[name].update(a, b)
        if on_batch:
            on_batch(len(next(iter(feeds.values()))) if feeds else 1)
    results = [accs[n].result() for n in accs]
    results += [
        OutputComparison(n, math.inf, math.inf, 0.0, False, "missing from the candidate")
        for n in missing
    ]
    return results


def _run(sess, feeds, error: type[OnnxoptError], what: str) -> dict[str, np.ndarray]:
    try:
        return run_session(sess, feeds)
    except Exception as e:
        raise error(f"{what} does not run in onnxruntime on these inputs ({one_line(e)})") from None


def compare_models(
    reference,
    candidate,
    samples: Iterable[dict[str, np.ndarray]],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> list[OutputComparison]:
    """The check of ``onnxopt run``: both models on the CPU, each of ``samples``, Polygraphy tolerances."""
    try:
        ref_sess = runtime.session(reference)
    except OnnxoptError:
        raise
    except Exception as e:
        raise UsageError(
            f"the reference model does not run in onnxruntime, so it cannot be checked ({one_line(e)})"
        ) from None
    try:
        cand_sess = runtime.session(candidate)
    except Exception as e:
        raise CheckFailed(
            f"the optimized model does not run in onnxruntime ({one_line(e)})"
        ) from None
    return compare_sessions(
        ref_sess,
        cand_sess,
        samples,
        low_precision_floors(Settings({"": atol}, {"": rtol}), ref_sess),
    )


def require_equivalent(results: list[OutputComparison], what: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        worst = ", ".join(
            f"{r.name}: {r.detail or f'max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, cosine {r.cosine:.6f}'}"
            for r in failed
        )
        raise CheckFailed(f"{what}: outputs differ from the input model ({worst})")


def require_fidelity(results: list[OutputComparison], budget: float, strictest) -> None:
    low = [r for r in results if not r.cosine >= budget]
    if low:
        worst = ", ".join(f"{r.name}: cosine {r.cosine:.6f}" for r in low)
        raise CheckFailed(
            f"pass {strictest} lost too much accuracy: {worst} < {budget:g} (its fidelity budget)"
        )
