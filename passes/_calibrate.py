"""Calibration: run the float model on the user's data and gather statistics of intermediate values,
one batch at a time (memory does not grow with the number of samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import inputs, runtime
from onnxopt.errors import UsageError

BATCH = 16  # rows of the calibration data per run


def channel_max(model: ir.Model, values: list[ir.Value], calib: str) -> dict[str, np.ndarray]:
    """max |x| of every channel (last axis) of each float value, over the calibration data."""
    path = Path(calib)
    if not path.exists():
        raise UsageError(f"pass quant: calib {calib} does not exist")
    graph = model.graph
    wanted = [v for v in values if v.name and v.dtype == ir.DataType.FLOAT]
    proto = ir.serde.serialize_model(model)
    outputs = {o.name for o in proto.graph.output}
    inputs_by_name = {v.name for v in graph.inputs}
    for v in wanted:
        if v.name not in outputs and v.name not in inputs_by_name:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None))
    sess = runtime.session(proto.SerializeToString(), optimize=True)
    del proto
    names = [o.name for o in sess.get_outputs()]
    found: dict[str, np.ndarray] = {}
    notices: list[str] = []
    spec = inputs.InputSpec(data=path, batch=BATCH)
    runs = 0
    for feeds in spec.batches(model, notices):
        results = dict(zip(names, sess.run(None, feeds)))
        results.update(feeds)
        for v in wanted:
            x = results.get(v.name)
            if x is None or x.ndim == 0:
                continue
            m = np.abs(x.reshape(-1, x.shape[-1])).max(0)
            found[v.name] = np.maximum(found[v.name], m) if v.name in found else m
        runs += 1
    if not runs:
        raise UsageError(f"pass quant: calib {calib} holds no samples for this model's inputs")
    return found


def outlier_channels(amax: np.ndarray, ratio: float, most: int) -> np.ndarray:
    """The (at most ``most``) channels whose range exceeds ``ratio`` times the median channel's."""
    if ratio <= 0 or most <= 0 or amax.size < 2:
        return np.zeros(0, np.int64)
    median = float(np.median(amax))
    order = np.argsort(-amax, kind="stable")[:most]
    return np.sort(order[amax[order] > ratio * median]).astype(np.int64)
