"""Raising a model's default opset with onnx's version converter, checked in onnxruntime.

The converter runs on a copy of the graph without its large tensors (they travel as graph inputs,
the way onnx-ir calls onnx's C API), so a model with external data is never read whole; the tensors
are put back by name afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnxopt import compare, inputs
from onnxopt.errors import UsageError, one_line
from onnxopt.shapes import resolve

ATOL = RTOL = (
    1e-5  # how far the converted model's outputs may move: rounding, not a change of meaning
)


def raise_opset(model: ir.Model, version: int, shapes: dict[str, list[int]], why: str) -> bool:
    """Convert ``model`` in place to default-domain opset ``version`` (when below it), after checking
    in onnxruntime that the converted model computes what the input one does; ``why`` names the need."""
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    if current >= version:
        return False
    try:
        proto = _c_api_utils.call_onnx_api(
            lambda p: onnx.version_converter.convert_version(p, version), model
        )
    except Exception as e:
        raise UsageError(
            f"pass quant: {why} needs opset {version}; onnx's version converter failed from opset "
            f"{current}: {one_line(e)}"
        ) from None
    converted = _with_tensors(ir.serde.deserialize_model(proto), model)
    converted.ir_version = max(
        model.ir_version, 10
    )  # int4 and uint4 tensors came with IR version 10
    _require_same_outputs(
        model, converted, shapes, f"{why}: the conversion from opset {current} to {version}"
    )
    model.graph = converted.graph
    model.ir_version = converted.ir_version
    return True


def _with_tensors(converted: ir.Model, original: ir.Model) -> ir.Model:
    """Give back the initializers that travelled as graph inputs through the converter (the small
    ones travelled as both)."""
    tensors = {
        name: v.const_value
        for name, v in original.graph.initializers.items()
        if v.const_value is not None
    }
    real_inputs = {v.name for v in original.graph.inputs}
    graph = converted.graph
    for value in list(graph.inputs):
        if value.name not in tensors:
            continue
        if value.name not in graph.initializers:
            value.const_value = tensors[value.name]
            graph.register_initializer(value)
        if value.name not in real_inputs:
            graph.inputs.remove(value)
    return converted


def _require_same_outputs(
    before: ir.Model, after: ir.Model, shapes: dict[str, list[int]], what: str
) -> None:
    feeds = inputs.generate(before, resolve(before, shapes).shapes)[0]
    try:
        expected = compare.run_ir(before, feeds)
        got = compare.run_ir(after, feeds)
    except Exception as e:  # onnxruntime's own errors
        raise UsageError(
            f"pass quant: {what} could not be checked in onnxruntime on generated inputs "
            f"(give their shapes with --shape NAME=DIMS): {one_line(e)}"
        ) from None
    for name, ref in expected.items():
        if (
            name not in got
            or got[name].shape != ref.shape
            or not np.allclose(got[name], ref, atol=ATOL, rtol=RTOL, equal_nan=True)
        ):
            raise UsageError(
                f"pass quant: {what} changed output {name} in onnxruntime; convert the model yourself "
                "or use format=ort"
            )
