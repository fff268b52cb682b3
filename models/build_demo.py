"""Build demo.onnx: a small CNN classifier with the clutter real exporters leave behind.

    python models/build_demo.py [-o PATH]

x float32 [batch, 3, 32, 32] -> y float32 [batch, 10]. The network is
conv(3->16) relu maxpool, a residual block of two 16->16 convs, conv(16->32, stride 2) relu,
global average pool, flatten, gemm(32->64) relu, gemm(64->10).

Planted for constant folding / pruning to find (none of it changes the output):
  - Constant nodes feeding arithmetic and shape ops
  - conv1 weight = Transpose(HWIO initializer); conv3 weight = Mul(initializer, Constant 0.5)
  - flatten via Shape -> Gather(dim 1, static) -> Unsqueeze -> Concat([-1, .]) -> Reshape
  - Identity, Dropout (inference), a float->float Cast, x*1, x+0
  - two Transposes that cancel (NCHW->NHWC->NCHW)
  - an unused initializer, two initializers with identical contents, an unused Softmax node
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
DEFAULT_PATH = Path(__file__).with_name("demo.onnx")


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(array))


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def he(*shape: int) -> np.ndarray:  # He-normal, fan_in = product of all but the first dim
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (rng.standard_normal(n) * 0.05).astype(np.float32)

    block_w = he(16, 16, 3, 3)
    initializers = [
        _init("conv1.weight_hwio", np.ascontiguousarray(he(16, 3, 3, 3).transpose(2, 3, 1, 0))),
        _init("conv1.bias", bias(16)),
        # The same tensor stored twice under two names, as exporters do for tied weights.
        _init("block.conv_a.weight", block_w),
        _init("block.conv_a.bias", bias(16)),
        _init("block.conv_b.weight", block_w.copy()),
        _init("block.conv_b.bias", bias(16)),
        _init("conv3.weight_raw", he(32, 16, 3, 3) * 2.0),  # scaled by the Constant 0.5 below
        _init("conv3.bias", bias(32)),
        _init("fc1.weight", he(64, 32)),
        _init("fc1.bias", bias(64)),
        _init("fc2.weight", he(10, 64)),
        _init("fc2.bias", bias(10)),
        _init("head.old_fc.weight", he(10, 64)),  # left over from a replaced head, never used
    ]

    f32 = np.float32
    nodes = [
        _const("one", np.array(1.0, f32)),
        _const("zero", np.array(0.0, f32)),
        _const("half", np.array(0.5, f32)),
        _const("dim1", np.array(1, np.int64)),
        _const("axes0", np.array([0], np.int64)),
        _const("minus_one", np.array([-1], np.int64)),
        # input clutter: Identity, no-op Cast, x*1
        helper.make_node("Identity", ["x"], ["x_id"], name="input_identity"),
        helper.make_node("Cast", ["x_id"], ["x_cast"], name="input_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_cast", "one"], ["x_scaled"], name="input_mul_one"),
        # stem
        helper.make_node(
            "Transpose",
            ["conv1.weight_hwio"],
            ["conv1.weight"],
            name="conv1_w_transpose",
            perm=[3, 2, 0, 1],
        ),
        helper.make_node(
            "Conv",
            ["x_scaled", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        # residual block
        helper.make_node(
            "Conv",
            ["p1", "block.conv_a.weight", "block.conv_a.bias"],
            ["ba"],
            name="block_conv_a",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["ba"], ["ba_r"], name="block_relu_a"),
        helper.make_node(
            "Conv",
            ["ba_r", "block.conv_b.weight", "block.conv_b.bias"],
            ["bb"],
            name="block_conv_b",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Add", ["bb", "p1"], ["res"], name="block_add"),
        helper.make_node("Relu", ["res"], ["res_r"], name="block_relu_out"),
        # layout round trip that cancels
        helper.make_node("Transpose", ["res_r"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        # downsample; weight computed at run time from an initializer and a Constant
        helper.make_node(
            "Mul", ["conv3.weight_raw", "half"], ["conv3.weight"], name="conv3_w_scale"
        ),
        helper.make_node(
            "Conv",
            ["nchw", "conv3.weight", "conv3.bias"],
            ["c3"],
            name="conv3",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        # flatten [batch, 32, 1, 1] -> [batch, 32] through a shape chain on the static channel dim
        helper.make_node("Shape", ["gap"], ["gap_shape"], name="flatten_shape"),
        helper.make_node(
            "Gather", ["gap_shape", "dim1"], ["channels"], name="flatten_gather", axis=0
        ),
        helper.make_node(
            "Unsqueeze", ["channels", "axes0"], ["channels_1d"], name="flatten_unsqueeze"
        ),
        helper.make_node(
            "Concat", ["minus_one", "channels_1d"], ["flat_shape"], name="flatten_concat", axis=0
        ),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten_reshape"),
        # head
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Add", ["h1", "zero"], ["h1_plus0"], name="fc1_add_zero"),
        helper.make_node("Relu", ["h1_plus0"], ["h1_r"], name="fc1_relu"),
        helper.make_node("Dropout", ["h1_r"], ["h1_d"], name="dropout"),
        helper.make_node(
            "Gemm", ["h1_d", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
        helper.make_node("Identity", ["logits"], ["y"], name="output_identity"),
        # computed and never used
        helper.make_node("Softmax", ["logits"], ["probs"], name="unused_softmax", axis=-1),
    ]

    graph = helper.make_graph(
        nodes,
        "onnxopt_demo",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxopt.zoo.build_demo",
        doc_string="Small CNN with deliberate clutter for constant folding and pruning tests.",
    )
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the onnxopt demo model.")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)

    model = build()
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    args.output.write_bytes(data)

    import onnxruntime as ort  # only needed for the smoke run

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (2, 10) and np.isfinite(y).all(), y.shape

    counts = Counter(n.op_type for n in model.graph.node)
    print(f"wrote {args.output} ({len(data):,} bytes)")
    print(
        f"{len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers, "
        f"opset {OPSET}, ir_version {IR_VERSION}"
    )
    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {op:<18} {n}")
    print(f"onnxruntime: y {list(y.shape)}, y[0,:3] = {np.round(y[0, :3], 4).tolist()}")


if __name__ == "__main__":
    main()
