"""Bias correction for int8 weights (Nagel et al., "Data-free quantization", 2019, empirical form).

Rounding the weight to int8 adds dW = dequant(q(W)) - W, which shifts each output by dW applied to the
input; over the data that shift averages to dW applied to the mean input. Subtracting it from the bias
removes the systematic part of the error. The mean input is measured per channel in calibration.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class ChannelMean:
    """Running mean of each channel (along ``axis``) over batches; memory does not grow with them."""

    def __init__(self, axis: int):
        self.axis = axis
        self._sum: np.ndarray | None = None
        self._count = 0

    def update(self, x: np.ndarray) -> None:
        a = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        a = a.reshape(-1, a.shape[-1])
        total = a.sum(0)
        self._sum = total if self._sum is None else self._sum + total
        self._count += a.shape[0]

    def mean(self) -> np.ndarray | None:
        return None if self._sum is None or not self._count else self._sum / self._count


def channel_axis(node: ir.Node) -> int | None:
    """The axis of the input channels of a Conv's or Gemm's data input; None for other nodes."""
    return {"Conv": 1, "Gemm": 1}.get(node.op_type)


def output_shift(node: ir.Node, dw: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """The mean change of each output channel that the weight error ``dw`` causes for the mean input."""
    dw = np.asarray(dw, np.float64)
    if node.op_type == "Conv":
        return _conv_shift(dw, mean, node.attributes.get_int("group", 1))
    if node.op_type == "Gemm":
        dw = dw.T if node.attributes.get_int("transB", 0) else dw
        return mean @ dw if mean.shape == (dw.shape[0],) else None
    return None


def _conv_shift(dw: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray | None:
    """delta_o = sum over i, kernel positions of dw[o, i, ...] * mean[input channel i of o's group]."""
    out_channels, per_group = dw.shape[:2]
    if mean.shape != (group * per_group,) or out_channels % group:
        return None
    summed = dw.reshape(out_channels, per_group, -1).sum(-1)  # [O, I/g]
    group_of = np.arange(out_channels) // (out_channels // group)
    return (summed * mean.reshape(group, per_group)[group_of]).sum(1)


def corrected_bias(
    node: ir.Node,
    w: np.ndarray,
    w_dequantized: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
) -> np.ndarray | None:
    """The bias (float32 [O]; zeros when there was none) minus the shift the int8 weight adds; None when
    the node or the bias's shape does not allow it."""
    shift = output_shift(
        node, w_dequantized.astype(np.float64) - w.astype(np.float64), np.asarray(mean, np.float64)
    )
    if shift is None or (bias is not None and bias.size not in (1, shift.size)):
        return None
    b = (
        np.zeros(shift.size)
        if bias is None
        else np.broadcast_to(bias.astype(np.float64).reshape(-1), shift.shape)
    )
    return (b - shift).astype(np.float32)
