"""Small models built with onnx.helper, and a way to run them, for the pass tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import compare

F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: (name, elem_type, dims) triples; initializers: name -> array."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        initializer=[
            numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def run_proto(proto: onnx.ModelProto | ir.Model, feeds: dict) -> dict:
    if isinstance(proto, ir.Model):
        proto = ir.serde.serialize_model(proto)
    return compare.run_model(proto.SerializeToString(), feeds)


def optimize(proto: onnx.ModelProto, passes, feeds: dict, *, atol=1e-6, rtol=1e-6):
    """Run the passes and assert the optimized model gives the original's outputs under the same names."""
    expected = run_proto(proto, feeds)
    model, report = onnxopt.run(ir.serde.deserialize_model(proto), passes)
    got = run_proto(model, feeds)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(got[name], expected[name], atol=atol, rtol=rtol)
    return model, report


def classifier(path, *, noise: float = 0.0, classes: int = 10, seed: int = 0):
    """A saved [batch, 8] → [batch, classes] linear classifier; ``noise`` perturbs its weights."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, classes)).astype(np.float32)
    weight += noise * np.random.default_rng(seed + 1).standard_normal(weight.shape).astype(
        np.float32
    )
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
    model = make_model(
        nodes, [("x", F, ["batch", 8])], [("logits", F, ["batch", classes])], {"w": weight}
    )
    onnx.save(model, str(path))
    return path


def cli(*args) -> int:
    """Run the onnxopt command line in this process; returns its exit code."""
    from onnxopt.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    raise AssertionError("main() returned without exiting")
