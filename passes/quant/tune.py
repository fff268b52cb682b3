"""Speed-aware quantization: candidate models timed side by side in onnxruntime (alternating rounds,
as ``onnxopt bench`` does)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import bench, inputs, io, runtime
from onnxopt.passes._calibrate import first_batch
from onnxopt.shapes import resolve

ITERS = 60
# The statistic candidates are compared on: as the yardsticks do, a low percentile, since noise on a
# shared machine only ever adds time. On MiniLM-L6 (int8 vs float, batch 1 x 128) the p50 verdict
# flipped from 1.43x to 0.97x between two runs of the same pass on a busy machine.
STAT = "p20"
ROWS = 1  # calibration samples per timed run: latency at batch 1
SEQUENCE = 128  # a symbolic dim other than the first, when inputs are generated


def tuning_feeds(
    model: ir.Model, calib: str, shapes: dict[str, list[int]]
) -> tuple[dict[str, np.ndarray], str | None]:
    """Calibration samples when there are any, else generated inputs of the user's ``shapes`` or, for
    dims nobody gave, batch 1 and sizes that run the model, ``SEQUENCE`` first (a token or pixel count
    int8 can pay off at; 1 would time only the overhead). Returns the feeds and a note on the shapes chosen."""
    if calib and calib != "random":
        return first_batch(model, calib, ROWS), None
    chosen = resolve(model, shapes, prefer=SEQUENCE)
    return inputs.generate(model, chosen.shapes)[0], chosen.note("tune=latency timed")


def latencies(
    models: list[ir.Model],
    feeds: dict[str, np.ndarray],
    again=lambda times: False,
    iters: int = ITERS,
) -> list[float]:
    """``STAT`` milliseconds of each model on onnxruntime's CPU provider; timed once more when
    ``again(times)`` says so, each model then keeping its faster measurement."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-tune-") as folder:
        paths = [io.save(m, Path(folder, f"model{i}.onnx")) for i, m in enumerate(models)]
        settings = bench.Settings(iters=iters, warmup=3, threads=runtime.every_core())
        times = [row.stat(STAT) for row in bench.bench(paths, feeds, settings=settings)]
        if again(times):
            retimed = [row.stat(STAT) for row in bench.bench(paths, feeds, settings=settings)]
            times = [min(a, b) for a, b in zip(times, retimed)]
    return times
