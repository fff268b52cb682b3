"""Run two models on the same inputs and compare their outputs, output by output."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from onnxopt import runtime
from onnxopt.errors import CheckFailed, OnnxoptError, UsageError


@dataclasses.dataclass
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    passed: bool
    detail: str = ""


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> OutputComparison:
    """Polygraphy-style closeness: |got - ref| <= atol + rtol * |ref| element-wise (NaNs must match)."""
    if ref.shape != got.shape:
        return OutputComparison(name, np.inf, np.inf, 0.0, False, f"shape {got.shape} != {ref.shape}")
    if ref.dtype.kind in "OSUb" or got.dtype.kind in "OSUb":
        equal = bool(np.array_equal(ref, got))
        return OutputComparison(name, 0.0 if equal else np.inf, 0.0 if equal else np.inf, float(equal), equal)
    a, b = ref.astype(np.float64), got.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return OutputComparison(name, np.inf, np.inf, 0.0, False, "NaNs differ")
    a, b = np.where(nan_a, 0.0, a), np.where(nan_b, 0.0, b)
    with np.errstate(invalid="ignore", over="ignore"):
        same_inf = (a == b)  # equal infinities have an undefined difference but are equal
        diff = np.where(same_inf, 0.0, np.abs(a - b))
        rel = diff / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
        passed = bool(np.all(diff <= atol + rtol * np.abs(a)))
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(np.sum(a * b) / norm) if norm > 0 else float(np.array_equal(a, b))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    return OutputComparison(name, max_abs, max_rel, cosine, passed)


def run_model(model: str | os.PathLike | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = runtime.session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def compare_models(reference, candidate, feeds, *, atol: float = 1e-4, rtol: float = 1e-3) -> list[OutputComparison]:
    try:
        ref = run_model(reference, feeds)
    except OnnxoptError:
        raise
    except Exception as e:
        raise UsageError(f"the reference model does not run in onnxruntime, so it cannot be checked ({_line(e)}); use --no-check") from None
    try:
        got = run_model(candidate, feeds)
    except Exception as e:
        raise CheckFailed(f"the optimized model does not run in onnxruntime ({_line(e)})") from None
    results = []
    for name, value in ref.items():
        if name not in got:
            results.append(OutputComparison(name, np.inf, np.inf, 0.0, False, "missing from the candidate"))
        else:
            results.append(compare_arrays(name, value, got[name], atol, rtol))
    return results


def _line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def require_equivalent(results: list[OutputComparison], what: str) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        worst = ", ".join(
            f"{r.name}: {r.detail or f'max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, cosine {r.cosine:.6f}'}"
            for r in failed
        )
        raise CheckFailed(f"{what}: outputs differ from the input model ({worst})")
