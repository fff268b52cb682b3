"""Calibration: run the float model on the user's data and gather statistics of intermediate values,
one batch at a time (memory does not grow with the number of samples)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import compare, inputs
from onnxopt.errors import UsageError

BATCH = 16  # rows of the calibration data per run
RANDOM_SAMPLES = 8


def run_values(
    model: ir.Model, values: list[ir.Value], calib: str, who: str = "quant"
) -> Iterator[dict[str, np.ndarray]]:
    """For each batch of the calibration data, the float ``values`` (and the inputs) by name
    (``who``: the pass that asks, for its messages)."""
    spec = _spec(calib, warn=True, who=who)
    sess = compare.model_session(
        model, [v.name for v in values if v.name and v.dtype == ir.DataType.FLOAT]
    )
    runs = 0
    for feeds in spec.batches(model, []):
        results = compare.run_session(sess, feeds)
        results.update(feeds)
        runs += 1
        yield results
    if not runs:
        raise UsageError(f"pass {who}: calib {calib} holds no samples for this model's inputs")


def _spec(
    calib: str, warn: bool = False, batch: int = BATCH, who: str = "quant"
) -> inputs.InputSpec:
    if calib == "random":
        if warn:
            warnings.warn(
                f"pass {who}: calibrating on random inputs (calib=random): the ranges will not match real data; "
                "pass calib=PATH with real samples for a model you will ship",
                stacklevel=3,
            )
        return inputs.InputSpec(samples=RANDOM_SAMPLES)
    path = Path(calib)
    if not path.exists():
        raise UsageError(f"pass {who}: calib {calib} does not exist")
    return inputs.InputSpec(data=path, batch=batch, label=f"pass {who}: calib={{path}}")


def calibration_batches(
    model: ir.Model, calib: str, who: str = "quant"
) -> Iterator[dict[str, np.ndarray]]:
    """The calibration data as feeds for ``model``, one batch at a time."""
    return iter(_spec(calib, who=who).batches(model, []))


def first_batch(
    model: ir.Model, calib: str, rows: int, who: str = "quant"
) -> dict[str, np.ndarray]:
    """The first ``rows`` samples of the calibration data (to check a quantized model against,
    to size a model's activations)."""
    return next(iter(_spec(calib, batch=rows, who=who).batches(model, [])))


def channel_max(model: ir.Model, values: list[ir.Value], calib: str) -> dict[str, np.ndarray]:
    """max |x| of every channel (last axis) of each float value, over the calibration data."""
    found: dict[str, np.ndarray] = {}
    names = {v.name for v in values}
    for results in run_values(model, values, calib):
        for name, x in results.items():
            if name not in names or x.ndim == 0:
                continue
            m = np.abs(x.reshape(-1, x.shape[-1])).max(0)
            found[name] = np.maximum(found[name], m) if name in found else m
    return found


def outlier_channels(amax: np.ndarray, ratio: float, most: int) -> np.ndarray:
    """The (at most ``most``) channels whose range exceeds ``ratio`` times the median channel's."""
    if ratio <= 0 or most <= 0 or amax.size < 2:
        return np.zeros(0, np.int64)
    median = float(np.median(amax))
    order = np.argsort(-amax, kind="stable")[:most]
    return np.sort(order[amax[order] > ratio * median]).astype(np.int64)


def token_mask(results: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    """A [batch, seq] attention mask among the feeds that matches activations of ``shape`` (padding
    tokens are False), or None."""
    if len(shape) != 3:
        return None
    for name, array in results.items():
        if (
            "mask" in name.lower()
            and array.ndim == 2
            and array.shape == shape[:2]
            and array.dtype.kind in "biuf"
        ):
            return array != 0
    return None


def tokens(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The rows of ``array`` (one per token or position; the last axis kept), padding left out."""
    return array[mask] if mask is not None else array.reshape(-1, array.shape[-1])
