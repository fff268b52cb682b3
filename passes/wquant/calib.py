"""Calibration statistics for the 4-bit weight algorithms: the input Hessians GPTQ needs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._calibrate import run_values
from onnxopt.passes._common import infer_shapes

MASK = "attention_mask"  # the transformers exporters' name for the input that marks real tokens (1) and padding (0)


def input_hessians(
    model: ir.Model, nodes: list[ir.Node], calib: str
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """X^T X [K, K] (float64) of each node's first input X (MatMul's A, as [-1, K]) summed over every row
    of the calibration data, and the number of rows, by input name. Streamed one batch at a time, so
    memory does not grow with the samples; nodes sharing an input share its entry. Inputs that are not
    float values have none (values of unknown type get their types from shape inference first).

    Padding is left out, as GPTQ tools for transformers do: when the model has an input named
    ``attention_mask`` [batch, seq], the rows of an X [batch, seq, K] where it is 0 do not count."""
    values = list(
        {
            n.inputs[0].name: n.inputs[0] for n in nodes if n.inputs and n.inputs[0] is not None
        }.values()
    )
    if any(v.dtype is None for v in values):
        infer_shapes(model)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for results in run_values(model, values, calib):
        mask = results.get(MASK)
        for v in values:
            x = results.get(v.name)
            if x is None or x.ndim == 0 or x.dtype != np.float32:
                continue
            if mask is not None and mask.ndim == 2 and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask != 0]
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[v.name] = sums.get(v.name, 0) + x.T @ x
            rows[v.name] = rows.get(v.name, 0) + len(x)
    return sums, rows
