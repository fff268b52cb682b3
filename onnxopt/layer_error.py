"""How far each intermediate value of a transformed model is from the original's: the SQNR of every
float value that both models name alike, on one batch of inputs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt import compare, io
from onnxopt.errors import CheckFailed, OnnxoptError, one_line


def sqnr_db(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    feeds: dict[str, np.ndarray],
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """``{name: 10·log10(Σref² / Σ(ref − got)²)}`` (inf when equal) for the float values of both models'
    main graphs that share a name and a shape, limited to ``names`` when given."""
    ref_model, cand_model = io.load(reference), io.load(candidate)
    shared = _value_names(ref_model) & _value_names(cand_model)
    wanted = sorted(shared if names is None else shared & set(names))
    if not wanted:
        return {}
    ref = _run_exposing(ref_model, wanted, feeds, "the reference model")
    got = _run_exposing(cand_model, wanted, feeds, "the candidate model")
    return {
        n: sqnr(ref[n], got[n])
        for n in wanted
        if n in ref
        and n in got
        and ref[n].shape == got[n].shape
        and ref[n].dtype.kind == got[n].dtype.kind == "f"
    }


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.astype(np.float64), got.astype(np.float64)
    if np.array_equal(a, b, equal_nan=True):
        return math.inf
    with np.errstate(all="ignore"):
        signal, noise = float(np.sum(a * a)), float(np.sum((a - b) ** 2))
    if not math.isfinite(noise) or not signal:  # NaNs that differ, or no signal: nothing survives
        return -math.inf
    return 10 * math.log10(signal / noise)


def _value_names(model: ir.Model) -> set[str]:
    """Node outputs of the main graph that are (or may be: type unknown) floating point."""
    return {
        v.name
        for node in model.graph
        for v in node.outputs
        if v.name and (v.dtype is None or v.dtype.is_floating_point())
    }


def _run_exposing(
    model: ir.Model, names: list[str], feeds: dict[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """Run ``model`` with ``names`` added to its outputs; returns only those values."""
    try:
        results = compare.run_session(compare.model_session(model, names), feeds)
    except OnnxoptError:
        raise
    except Exception as e:
        raise CheckFailed(
            f"{what} does not run with its intermediate values exposed ({one_line(e)})"
        ) from None
    return {n: results[n] for n in names if n in results}


def attach_sqnr(
    rows: list[dict],
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    feeds: dict[str, np.ndarray],
) -> None:
    """Give each layer row the ``sqnr_db`` of its ``output`` (None where the reference has no such value)."""
    names = {r["output"] for r in rows if r.get("output")}
    found = sqnr_db(reference, candidate, feeds, names) if names else {}
    for r in rows:
        r["sqnr_db"] = found.get(r.get("output"))
