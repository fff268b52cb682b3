"""Speed-aware quantization: the int8 model is timed against the float one in onnxruntime (alternating
rounds, as ``onnxopt bench`` does) and kept only if it is faster."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import bench, inputs, io

from ._calibrate import first_batch

ITERS = 60
ROWS = 8  # calibration samples per timed run


def tuning_feeds(model: ir.Model, calib: str) -> dict[str, np.ndarray]:
    """Calibration samples when there are any, else generated inputs (symbolic dims set to 1)."""
    if calib:
        return first_batch(model, calib, ROWS)
    return inputs.generate(model)[0]


def latencies(original: ir.Model, quantized: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """p50 milliseconds of the float and the int8 model on onnxruntime's CPU provider."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-tune-") as folder:
        paths = [Path(folder, "float.onnx"), Path(folder, "int8.onnx")]
        io.save(original, paths[0])
        io.save(quantized, paths[1])
        rows = bench.bench(paths, feeds, settings=bench.Settings(iters=ITERS, warmup=3))
    return rows[0].stat("p50"), rows[1].stat("p50")
