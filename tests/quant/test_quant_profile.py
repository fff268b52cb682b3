"""Speed-aware placement: onnxruntime's kernel names traced back to the scopes of the model's nodes."""

import numpy as np
import onnx_ir as ir

from onnxopt.passes.quant.ort_profile import _by_scope, _owner_of
from onnxopt.passes.quant.search import _owners
from onnxopt.passes.quant.static import insert_qdq
from onnxopt.profile import Kernel


def _model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    conv = ir.node("Relu", [x], name="/block/conv/Conv")
    conv.outputs[0].name = "/block/conv/Conv_output_0"
    act = ir.node("Sigmoid", [conv.outputs[0]], name="/block/act/Sigmoid")
    act.outputs[0].name = "y"
    graph = ir.Graph([x], [act.outputs[0]], nodes=[conv, act], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_kernel_names_map_to_scopes():
    float_model = _model()
    owners = _owners(float_model)
    quantized = _model()
    insert_qdq(quantized.graph, quantized.graph.node(0).outputs[0], 0.1, np.array(0, np.uint8))
    fc = ir.node("MatMulInteger", [quantized.graph.inputs[0]], name="/block/conv/Conv.int8")
    quantized.graph.append(fc)
    owners.update(_owners(quantized, owners))
    assert _owner_of("/block/conv/Conv_token_17", owners) == "/block/conv"  # QDQ fusion
    assert _owner_of("/block/conv/Conv_output_0_nchwc", owners) == "/block/conv"  # NCHWc layout
    assert (
        _owner_of("/block/act/Sigmoid/QuickGeluFusion/", owners) == "/block/act"
    )  # a fusion onnxruntime named
    assert (
        _owner_of("/block/conv/Conv_output_0.quantize", owners) == "/block/conv"
    )  # Q of the conv's output
    assert _owner_of("/block/conv/Conv_output_0.dequantize", owners) == "/block/conv"
    assert _owner_of("/block/conv/Conv.int8", owners) == "/block/conv"  # a node a quantizer made
    assert _owner_of("ReorderInput_token_3", owners) == ""
    times = [
        Kernel("/block/conv/Conv_token_17", "QLinearConv", 30.0),
        Kernel("/block/conv/Conv_output_0.dequantize", "DequantizeLinear", 5.0),
        Kernel("/block/act/Sigmoid", "Sigmoid", 7.0),
        Kernel("ReorderOutput", "ReorderOutput", 2.0),
    ]
    assert _by_scope(times, owners) == {"/block/conv": 35.0, "/block/act": 7.0, "": 2.0}
