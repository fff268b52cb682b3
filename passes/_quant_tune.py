"""Speed-aware quantization: candidate models timed side by side in onnxruntime (alternating rounds,
as ``onnxopt bench`` does)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import bench, compare, inputs, io
from onnxopt.errors import UsageError, one_line

from ._calibrate import first_batch

ITERS = 60
ROWS = 1  # calibration samples per timed run: latency at batch 1
SEQUENCE = 128  # a symbolic dim other than the first, when inputs are generated


def tuning_feeds(model: ir.Model, calib: str, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Calibration samples when there are any, else generated inputs of the user's ``shapes`` or, for
    dims nobody gave, batch 1 and ``SEQUENCE`` (a token or pixel count int8 can pay off at; 1 would
    time only the overhead). Fails with a UsageError when the model does not run on them."""
    if calib and calib != "random":
        return first_batch(model, calib, ROWS)
    guessed = {}
    for value in model.graph.inputs:
        dims = list(value.shape or [])
        guessed[value.name] = [d if isinstance(d, int) else (1 if i == 0 else SEQUENCE) for i, d in enumerate(dims)]
    feeds = inputs.generate(model, {**guessed, **shapes})[0]
    try:
        compare.run_ir(model, feeds)
    except Exception as e:  # onnxruntime's own errors: the guessed shapes do not fit this model
        shown = ", ".join(f"{k}={','.join(map(str, v.shape))}" for k, v in feeds.items())
        raise UsageError(f"pass quant: tune=latency could not run the model on generated inputs ({shown}): {one_line(e)}; "
                         "pass calib=PATH with real samples, --shape NAME=DIMS, or tune=off") from None
    return feeds


def latencies(models: list[ir.Model], feeds: dict[str, np.ndarray]) -> list[float]:
    """p50 milliseconds of each model on onnxruntime's CPU provider."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-tune-") as folder:
        paths = [io.save(m, Path(folder, f"model{i}.onnx")) for i, m in enumerate(models)]
        rows = bench.bench(paths, feeds, settings=bench.Settings(iters=ITERS, warmup=3))
    return [row.stat("p50") for row in rows]
