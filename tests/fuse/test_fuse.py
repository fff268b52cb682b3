"""The fuse pass: rule selection, and the linear-layer and shape rules (fires where exact, refuses where not)."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, optimize, run_proto
from onnx import TensorProto, helper

from onnxopt.errors import UsageError
from onnxopt.passes import Fuse
from onnxopt.passes.fuse.rule import Context

RNG = np.random.default_rng(0)


def dims(rank):
    """A symbolic output shape of ``rank`` dims (the checker wants every graph output to have one)."""
    return [f"d{i}" for i in range(rank)]


def rand(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def bn(name, x, c, out):
    params = {
        f"{name}_s": rand(c, low=0.5),
        f"{name}_b": rand(c),
        f"{name}_m": rand(c),
        f"{name}_v": rand(c, low=0.1),
    }
    node = helper.make_node("BatchNormalization", [x, *params], [out], epsilon=1e-3)
    return node, params


def test_rules_are_listed_selected_and_checked():
    names = [line.split()[0] for line in Fuse.details()[1:]]
    assert {"conv_bn", "conv_affine", "matmul_add", "reshape_shape"} <= set(names)
    with pytest.raises(UsageError, match="skip names unknown rules nope"):
        Fuse(skip="nope")
    with pytest.raises(UsageError, match="target must be onnx or ort"):
        Fuse(target="tensorrt")
    assert Fuse(only="conv_bn|matmul_add").rules(Context(17, "onnx"))


def conv_bn_model(conv_attrs=None, bias=True, op="Conv", w_shape=(6, 4, 3, 3), group=1):
    init = {"w": rand(*w_shape)}
    inputs = ["x", "w"]
    channels = w_shape[0] if op == "Conv" else w_shape[1] * group
    if bias:
        init["b"] = rand(channels)
        inputs.append("b")
    norm, params = bn("bn", "c", channels, "y")
    conv = helper.make_node(op, inputs, ["c"], group=group, **(conv_attrs or {}))
    return make_model(
        [conv, norm],
        [("x", F, [2, w_shape[1] * group if op == "Conv" else w_shape[0], 8, 8])],
        [("y", F, dims(4))],
        {**init, **params},
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"conv_attrs": {"pads": [1, 1, 1, 1], "strides": [2, 2]}},
        {"op": "ConvTranspose", "w_shape": (4, 3, 2, 2), "group": 2},
        {"op": "ConvTranspose", "w_shape": (4, 6, 3, 3)},
    ],
)
def test_conv_bn_folds_into_the_weights(kwargs):
    proto = conv_bn_model(**kwargs)
    x = proto.graph.input[0].type.tensor_type.shape
    feeds = {"x": rand(*[d.dim_value for d in x.dim])}
    model, _ = optimize(proto, [Fuse(only="conv_bn")], feeds, atol=1e-5, rtol=1e-4)
    assert ops(model) == [kwargs.get("op", "Conv")]
    assert model.graph.outputs[0].name == "y"


def test_conv_bn_into_gemm_and_matmul():
    norm, params = bn("bn", "g", 5, "y")
    gemm = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0), norm],
        [("x", F, [3, 4])],
        [("y", F, [3, 5])],
        {"w": rand(5, 4), "b": rand(5), **params},
    )
    model, _ = optimize(gemm, [Fuse()], {"x": rand(3, 4)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gemm"]
    norm, params = bn("bn", "g", 5, "y")
    matmul = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["g"]), norm],
        [("x", F, [3, 4])],
        [("y", F, [3, 5])],
        {"w": rand(4, 5), **params},
    )
    model, _ = optimize(matmul, [Fuse()], {"x": rand(3, 4)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gemm"]


def test_conv_bn_refused_where_it_would_be_wrong():
    norm, params = bn("bn", "c", 6, "y")
    shared = make_model(  # the Conv output is read by the BN and by a graph output
        [helper.make_node("Conv", ["x", "w"], ["c"]), norm],
        [("x", F, [1, 4, 5, 5])],
        [("y", F, dims(4)), ("c", F, dims(4))],
        {"w": rand(6, 4, 3, 3), **params},
    )
    model, _ = optimize(shared, [Fuse()], {"x": rand(1, 4, 5, 5)})
    assert ops(model) == ["Conv", "BatchNormalization"]
    norm, params = bn("bn", "c", 6, "y")
    weight_input = make_model(  # a weight the caller feeds cannot be refolded
        [helper.make_node("Conv", ["x", "w"], ["c"]), norm],
        [("x", F, [1, 4, 5, 5]), ("w", F, [6, 4, 3, 3])],
        [("y", F, dims(4))],
        params,
    )
    model, _ = optimize(weight_input, [Fuse()], {"x": rand(1, 4, 5, 5), "w": rand(6, 4, 3, 3)})
    assert "BatchNormalization" in ops(model)
    norm, params = bn("bn", "g", 4, "y")
    three_d = (
        make_model(  # BatchNormalization's channels are axis 1; a 3-D MatMul's are its last axis
            [helper.make_node("MatMul", ["x", "w"], ["g"]), norm],
            [("x", F, [2, 4, 3])],
            [("y", F, dims(3))],
            {"w": rand(3, 3), **params},
        )
    )
    model, _ = optimize(three_d, [Fuse()], {"x": rand(2, 4, 3)})
    assert "BatchNormalization" in ops(model)


@pytest.mark.parametrize(
    "op, const, first",
    [
        ("Mul", (1, 6, 1, 1), True),
        ("Mul", (), False),
        ("Add", (6, 1, 1), False),
        ("Sub", (1, 6, 1, 1), True),
        ("Div", (6, 1, 1), True),
    ],
)
def test_conv_affine_per_channel_constants(op, const, first):
    c = rand(*const, low=0.5, high=2.0)
    inputs = ["c", "k"] if first else ["k", "c"]
    proto = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node(op, inputs, ["y"])],
        [("x", F, [2, 3, 6, 6])],
        [("y", F, dims(4))],
        {"w": rand(6, 3, 3, 3), "b": rand(6), "k": c},
    )
    model, _ = optimize(
        proto, [Fuse(only="conv_affine")], {"x": rand(2, 3, 6, 6)}, atol=1e-5, rtol=1e-4
    )
    assert ops(model) == ["Conv"]


def test_conv_affine_on_gemm_and_matmul():
    gemm = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["g"]), helper.make_node("Add", ["g", "k"], ["y"])],
        [("x", F, [3, 4])],
        [("y", F, dims(2))],
        {"w": rand(4, 5), "k": rand(5)},
    )
    model, _ = optimize(gemm, [Fuse(only="conv_affine")], {"x": rand(3, 4)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gemm"]
    matmul = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["g"]), helper.make_node("Mul", ["g", "k"], ["y"])],
        [("x", F, [2, 3, 4])],
        [("y", F, dims(3))],
        {"w": rand(4, 5), "k": rand(5)},
    )
    model, _ = optimize(
        matmul, [Fuse(only="conv_affine")], {"x": rand(2, 3, 4)}, atol=1e-5, rtol=1e-4
    )
    assert ops(model) == ["MatMul"]


@pytest.mark.parametrize(
    "op, const, first",
    [
        ("Mul", (1, 1, 4, 4), True),  # spatial, not per channel
        ("Add", (2, 1, 6, 1, 1), True),  # broadcasting adds a dim
        ("Sub", (6, 1, 1), False),  # constant - conv would negate the weights
        ("Div", (6, 1, 1), False),  # constant / conv is no affine map
    ],
)
def test_conv_affine_refused(op, const, first):
    inputs = ["c", "k"] if first else ["k", "c"]
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node(op, inputs, ["y"])],
        [("x", F, [1, 3, 6, 6])],
        [("y", F, dims(4))],
        {"w": rand(6, 3, 3, 3), "k": rand(*const, low=0.5)},
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(1, 3, 6, 6)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Conv", op]


def test_conv_affine_refused_when_the_conv_output_is_shared():
    proto = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Mul", ["c", "k"], ["m"]),
            helper.make_node("Add", ["c", "m"], ["y"]),
        ],
        [("x", F, [1, 3, 6, 6])],
        [("y", F, dims(4))],
        {"w": rand(6, 3, 3, 3), "k": rand(6, 1, 1)},
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(1, 3, 6, 6)})
    assert ops(model) == ["Conv", "Mul", "Add"]


@pytest.mark.parametrize(
    "bias_shape, fires", [((5,), True), ((1, 5), True), ((3, 1), True), ((2, 3, 5), False)]
)
def test_matmul_add_to_gemm(bias_shape, fires):
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        [("x", F, [3, 4])],
        [("y", F, dims(2))],
        {"w": rand(4, 5), "b": rand(*bias_shape)},
    )
    model, _ = optimize(proto, [Fuse(only="matmul_add")], {"x": rand(3, 4)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == (["Gemm"] if fires else ["MatMul", "Add"])


def test_matmul_add_needs_2d_inputs():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        [("x", F, [2, 3, 4])],
        [("y", F, dims(3))],
        {"w": rand(4, 5), "b": rand(5)},
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(2, 3, 4)})
    assert ops(model) == ["MatMul", "Add"]


def shape_of(x, index, name):
    """Shape → Gather(index) → Unsqueeze, as torch exports x.size(i)."""
    return [
        helper.make_node("Shape", [x], [f"{name}_s"]),
        helper.make_node("Gather", [f"{name}_s", f"{name}_i"], [f"{name}_g"], axis=0),
        helper.make_node("Unsqueeze", [f"{name}_g", "axis0"], [name]),
    ], {f"{name}_i": np.array(index, np.int64)}


def test_reshape_shape_from_the_inputs_own_dims():
    # YOLOv8's DFL head: x.view(b, 4, 16, a) with b and a read from x at run time.
    batch, b_init = shape_of("x", 0, "b")
    anchors, a_init = shape_of("x", 2, "a")
    nodes = [
        *batch,
        *anchors,
        helper.make_node("Concat", ["b", "four", "sixteen", "a"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    init = {
        **b_init,
        **a_init,
        "axis0": np.array([0], np.int64),
        "four": np.array([4], np.int64),
        "sixteen": np.array([16], np.int64),
    }
    proto = make_model(
        nodes, [("x", F, ["batch", 64, "anchors"])], [("y", F, ["batch", 4, 16, "anchors"])], init
    )
    model, _ = optimize(proto, [Fuse(), "prune"], {"x": rand(2, 64, 7)})
    assert ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [0, 4, 16, -1]
    for shape in [(1, 64, 3), (3, 64, 11)]:  # still right for other run-time sizes
        x = rand(*shape)
        np.testing.assert_array_equal(
            run_proto(model, {"x": x})["y"], x.reshape(shape[0], 4, 16, shape[2])
        )


def test_reshape_shape_through_paddle_casts_and_slices():
    # Paddle: Shape → Cast(int32) → Slice[1:2] → Cast(int64) → Concat([0], s, [3, -1])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "one", "two", "zero"], ["d"]),
        helper.make_node("Cast", ["d"], ["d64"], to=TensorProto.INT64),
        helper.make_node("Concat", ["zero", "d64", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    init = {
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "two": np.array([2], np.int64),
        "tail": np.array([3, -1], np.int64),
    }
    proto = make_model(nodes, [("x", F, ["n", "t", 6])], [("y", F, dims(4))], init)
    model, _ = optimize(proto, [Fuse(), "prune"], {"x": rand(2, 5, 6)})
    assert ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [0, 0, 3, -1]


def test_reshape_shape_refused_with_two_unknown_dims_or_allowzero():
    h, h_init = shape_of("other", 0, "h")
    w, w_init = shape_of("other", 1, "w")
    nodes = [
        *h,
        *w,
        helper.make_node("Concat", ["h", "w"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    init = {**h_init, **w_init, "axis0": np.array([0], np.int64)}
    proto = make_model(
        nodes, [("x", F, ["n"]), ("other", F, ["p", "q"])], [("y", F, dims(2))], init
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(6), "other": rand(2, 3)})
    assert "Shape" in ops(model)
    batch, b_init = shape_of("x", 0, "b")
    nodes = [
        *batch,
        helper.make_node("Concat", ["b", "minus"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1),
    ]
    proto = make_model(
        nodes,
        [("x", F, ["n", 4])],
        [("y", F, dims(2))],
        {**b_init, "axis0": np.array([0], np.int64), "minus": np.array([-1], np.int64)},
        opset=14,
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(3, 4)})
    assert "Shape" in ops(model)


def test_skip_leaves_a_rule_out():
    proto = conv_bn_model()
    model, _ = optimize(proto, [Fuse(skip="conv_bn")], {"x": rand(2, 4, 8, 8)})
    assert ops(model) == ["Conv", "BatchNormalization"]
    assert isinstance(model, ir.Model)
