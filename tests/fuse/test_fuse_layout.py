"""The layout rules of the fuse pass (Pad into Conv and pooling, Transpose into Gemm and MatMul) and
the reshape chain: each fires where the rewrite is exact and refuses where it is not."""

import numpy as np
import pytest
from helpers import F, make_model, ops, optimize, run_proto
from onnx import helper

from onnxopt.passes import Fuse

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.uniform(-2.0, 2.0, shape).astype(np.float32)


def dims(rank):
    return [f"d{i}" for i in range(rank)]


def i64(*values):
    return np.array(values, np.int64)


def node_of(model, op):
    return next(n for n in model.graph if n.op_type == op)


# pad_conv


def pad_node(pads, opset, value=None, axes=None, mode="constant", out="p"):
    """A Pad of x, with pads and value as attributes before opset 11 and as inputs since."""
    if opset < 11:
        extra = {} if value is None else {"value": value}
        return helper.make_node("Pad", ["x"], [out], mode=mode, pads=pads, **extra), {}
    init = {"pads": i64(*pads)}
    inputs = ["x", "pads"]
    if value is not None or axes is not None:
        inputs.append("" if value is None else "value")
        if value is not None:
            init["value"] = np.array(value, np.float32)
    if axes is not None:
        inputs.append("axes")
        init["axes"] = i64(*axes)
    return helper.make_node("Pad", inputs, [out], mode=mode), init


def pad_model(op, pads, x_shape, opset=17, value=None, axes=None, mode="constant", attrs=None):
    """Pad → op (a Conv with a 3x3 kernel, or a 3x3 pooling), with ``attrs`` on the op."""
    pad, init = pad_node(pads, opset, value, axes, mode)
    attrs = attrs or {}
    if op == "Conv":
        channels = x_shape[1] + (pads[1] + pads[len(pads) // 2 + 1] if axes is None else 0)
        init["w"] = rand(3, channels, *[3] * (len(x_shape) - 2))
        reader = helper.make_node("Conv", ["p", "w"], ["y"], **attrs)
    else:
        reader = helper.make_node(op, ["p"], ["y"], kernel_shape=[3] * (len(x_shape) - 2), **attrs)
    return make_model(
        [pad, reader], [("x", F, x_shape)], [("y", F, dims(len(x_shape)))], init, opset=opset
    )


@pytest.mark.parametrize(
    "op, pads, opset, value, axes, attrs, merged",
    [
        ("Conv", [0, 0, 1, 2, 0, 0, 3, 1], 17, None, None, {}, [1, 2, 3, 1]),
        (
            "Conv",
            [0, 0, 1, 1, 0, 0, 1, 1],
            17,
            0.0,
            None,
            {"pads": [1, 0, 0, 2], "strides": [2, 2]},
            [2, 1, 1, 3],
        ),
        ("Conv", [0, 0, 2, 0, 0, 1], 13, None, None, {}, [2, 1]),
        ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], 10, 0.0, None, {}, [1, 1, 1, 1]),
        ("Conv", [1, 2, 0, 1], 18, None, [-2, 3], {}, [1, 2, 0, 1]),
        (
            "AveragePool",
            [0, 0, 1, 1, 0, 0, 1, 0],
            17,
            None,
            None,
            {"count_include_pad": 1},
            [1, 1, 1, 0],
        ),
        (
            "AveragePool",
            [0, 0, 1, 1, 0, 0, 1, 1],
            10,
            None,
            None,
            {"count_include_pad": 1, "pads": [1, 0, 0, 0]},
            [2, 1, 1, 1],
        ),
        ("MaxPool", [0, 0, 1, 2, 0, 0, 2, 0], 13, -np.inf, None, {"strides": [2, 2]}, [1, 2, 2, 0]),
    ],
)
def test_pad_conv_folds_the_pads(op, pads, opset, value, axes, attrs, merged):
    x_shape = [2, 2, 7] if len(pads) == 6 else [2, 2, 7, 6]
    proto = pad_model(op, pads, x_shape, opset, value, axes, attrs=attrs)
    model, _ = optimize(proto, [Fuse(only="pad_conv")], {"x": rand(*x_shape)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == [op]
    assert list(node_of(model, op).attributes.get_ints("pads")) == merged


@pytest.mark.parametrize(
    "op, pads, kwargs, attrs",
    [
        ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], {"mode": "reflect"}, {}),
        ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], {"value": 0.5}, {}),
        ("Conv", [0, 1, 1, 1, 0, 0, 1, 1], {}, {}),  # pads the channel axis
        ("Conv", [1, 0, 0, 0, 0, 0, 0, 0], {}, {}),  # pads the batch axis
        ("Conv", [0, 0, -1, 0, 0, 0, 1, 1], {}, {}),  # crops
        ("Conv", [0, 0, 1, 1, 0, 0, 1, 1], {}, {"auto_pad": "SAME_UPPER"}),
        ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], {}, {"count_include_pad": 0}),
        ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], {}, {"count_include_pad": 1, "ceil_mode": 1}),
        (
            "AveragePool",
            [0, 0, 3, 0, 0, 0, 0, 0],
            {},
            {"count_include_pad": 1},
        ),  # pads as large as the kernel
        ("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], {}, {}),  # a zero fill can be the maximum
        ("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], {"value": -np.inf}, {"dilations": [2, 2]}),
    ],
)
def test_pad_conv_refused(op, pads, kwargs, attrs):
    proto = pad_model(op, pads, [1, 2, 7, 6], attrs=attrs, **kwargs)
    model, _ = optimize(proto, [Fuse()], {"x": rand(1, 2, 7, 6)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Pad", op]


def test_pad_conv_refused_when_the_pad_is_read_twice():
    pad, init = pad_node([0, 0, 1, 1, 0, 0, 1, 1], 17)
    nodes = [
        pad,
        helper.make_node("Conv", ["p", "w"], ["y"]),
        helper.make_node("Conv", ["p", "w"], ["z"]),
    ]
    proto = make_model(
        nodes,
        [("x", F, [1, 2, 5, 5])],
        [("y", F, dims(4)), ("z", F, dims(4))],
        {**init, "w": rand(3, 2, 3, 3)},
    )
    model, _ = optimize(proto, [Fuse()], {"x": rand(1, 2, 5, 5)})
    assert ops(model) == ["Pad", "Conv", "Conv"]


# transpose_gemm and transpose_matmul


@pytest.mark.parametrize(
    "on_a, on_b, trans_b", [(True, False, 0), (False, True, 1), (True, True, 0)]
)
def test_transpose_gemm_flips_the_flags(on_a, on_b, trans_b):
    a_shape = [4, 3] if on_a else [3, 4]
    b_shape = (
        [4, 5] if on_b == bool(trans_b) else [5, 4]
    )  # what the Gemm reads is [4, 5], or [5, 4] with transB
    nodes = [
        helper.make_node("Transpose", [v], [v + "t"], perm=[1, 0])
        for v, on in (("a", on_a), ("b", on_b))
        if on
    ]
    nodes.append(
        helper.make_node(
            "Gemm",
            ["at" if on_a else "a", "bt" if on_b else "b", "c"],
            ["y"],
            alpha=0.5,
            transB=trans_b,
        )
    )
    proto = make_model(
        nodes, [("a", F, a_shape), ("b", F, b_shape)], [("y", F, [3, 5])], {"c": rand(5)}
    )
    feeds = {"a": rand(*a_shape), "b": rand(*b_shape)}
    model, _ = optimize(proto, [Fuse(only="transpose_gemm")], feeds, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gemm"]
    gemm = node_of(model, "Gemm")
    assert (gemm.attributes.get_int("transA", 0), gemm.attributes.get_int("transB", 0)) == (
        int(on_a),
        int(on_b) ^ trans_b,
    )


def test_transpose_gemm_refused_when_the_transpose_has_another_reader():
    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("Gemm", ["at", "w"], ["y"]),
        helper.make_node("Relu", ["at"], ["z"]),
    ]
    proto = make_model(
        nodes, [("a", F, [4, 3])], [("y", F, [3, 5]), ("z", F, [3, 4])], {"w": rand(4, 5)}
    )
    model, _ = optimize(proto, [Fuse()], {"a": rand(4, 3)})
    assert ops(model) == ["Transpose", "Gemm", "Relu"]


@pytest.mark.parametrize("side", [0, 1])
def test_transpose_matmul_becomes_a_gemm(side):
    shapes = ([4, 3], [4, 5]) if side == 0 else ([3, 4], [5, 4])
    names = ["xt", "w"] if side == 0 else ["x", "wt"]
    nodes = [
        helper.make_node("Transpose", [["x", "w"][side]], [names[side]], perm=[1, 0]),
        helper.make_node("MatMul", names, ["y"]),
    ]
    proto = make_model(nodes, [("x", F, shapes[0]), ("w", F, shapes[1])], [("y", F, [3, 5])])
    feeds = {"x": rand(*shapes[0]), "w": rand(*shapes[1])}
    model, _ = optimize(proto, [Fuse(only="transpose_matmul")], feeds, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gemm"]
    gemm = node_of(model, "Gemm")
    assert (gemm.attributes.get_int("transA", 0), gemm.attributes.get_int("transB", 0)) == (
        1 - side,
        side,
    )


def test_transpose_matmul_folds_a_constant_transpose():
    # a batched MatMul cannot be a Gemm, but a transposed constant weight can be stored transposed
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    proto = make_model(nodes, [("x", F, [2, 3, 4])], [("y", F, dims(3))], {"w": rand(5, 4)})
    model, _ = optimize(
        proto, [Fuse(only="transpose_matmul")], {"x": rand(2, 3, 4)}, atol=1e-5, rtol=1e-4
    )
    assert ops(model) == ["MatMul"]
    assert "w" not in model.graph.initializers
    assert node_of(model, "MatMul").inputs[1].const_value.numpy().shape == (4, 5)


def test_transpose_matmul_keeps_a_constant_another_node_reads():
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
        helper.make_node("Relu", ["w"], ["z"]),
    ]
    proto = make_model(
        nodes, [("x", F, [2, 3, 4])], [("y", F, dims(3)), ("z", F, [5, 4])], {"w": rand(5, 4)}
    )
    model, _ = optimize(
        proto, [Fuse(only="transpose_matmul")], {"x": rand(2, 3, 4)}, atol=1e-5, rtol=1e-4
    )
    assert ops(model) == ["MatMul", "Relu"]
    assert "w" in model.graph.initializers


@pytest.mark.parametrize("case", ["3d", "opset10", "shared"])
def test_transpose_matmul_refused(case):
    x_shape, opset = ([2, 4, 3], 17) if case == "3d" else ([4, 3], 10 if case == "opset10" else 17)
    perm = [0, 2, 1] if case == "3d" else [1, 0]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=perm),
        helper.make_node("MatMul", ["xt", "w"], ["y"]),
    ]
    outputs = [("y", F, dims(len(x_shape)))]
    if case == "shared":
        outputs.append(("xt", F, [3, 4]))
    proto = make_model(nodes, [("x", F, x_shape), ("w", F, [4, 5])], outputs, opset=opset)
    model, _ = optimize(proto, [Fuse()], {"x": rand(*x_shape), "w": rand(4, 5)})
    assert ops(model) == ["Transpose", "MatMul"]


# reshape_chain


def chain_nodes(opset=17):
    """x [n, 3, 4] → Flatten(axis=1) → Unsqueeze(2) → Reshape(0, 4, 3, 1) → Squeeze(3): [n, 4, 3], dim 0 kept."""
    if opset >= 13:
        unsqueeze = helper.make_node("Unsqueeze", ["f", "ax2"], ["u"])
        squeeze = helper.make_node("Squeeze", ["r", "ax3"], ["y"])
    else:
        unsqueeze = helper.make_node("Unsqueeze", ["f"], ["u"], axes=[2])
        squeeze = helper.make_node("Squeeze", ["r"], ["y"], axes=[3])
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        unsqueeze,
        helper.make_node("Reshape", ["u", "shape"], ["r"]),
        squeeze,
    ]
    return nodes, {"ax2": i64(2), "ax3": i64(3), "shape": i64(0, 4, 3, 1)}


@pytest.mark.parametrize("opset", [11, 17])
def test_reshape_chain_to_a_static_shape(opset):
    nodes, init = chain_nodes(opset)
    proto = make_model(
        nodes,
        [("x", F, [2, 3, 4])],
        [("y", F, dims(3))],
        init if opset >= 13 else {"shape": init["shape"]},
        opset=opset,
    )
    model, _ = optimize(proto, [Fuse(only="reshape_chain")], {"x": rand(2, 3, 4)})
    assert ops(model) == ["Reshape"]
    reshape = node_of(model, "Reshape")
    assert reshape.inputs[0].name == "x"
    assert reshape.inputs[1].const_value.numpy().tolist() == [2, 4, 3]
    assert model.graph.outputs[0].name == "y"


def test_reshape_chain_keeps_a_dynamic_batch_dim():
    nodes, init = chain_nodes()
    proto = make_model(nodes, [("x", F, ["n", 3, 4])], [("y", F, dims(3))], init)
    model, _ = optimize(proto, [Fuse(only="reshape_chain")], {"x": rand(2, 3, 4)})
    assert ops(model) == ["Reshape"]
    assert node_of(model, "Reshape").inputs[1].const_value.numpy().tolist() == [0, 4, 3]
    for n in (1, 5):  # still right for other run-time batch sizes
        x = rand(n, 3, 4)
        np.testing.assert_array_equal(run_proto(model, {"x": x})["y"], x.reshape(n, 4, 3))


@pytest.mark.parametrize("case", ["dynamic", "batch_moved", "graph_output", "lone"])
def test_reshape_chain_refused(case):
    init = {"shape": i64(-1, 4, 3)}
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Reshape", ["f", "shape"], ["y"]),
    ]
    x_shape, outputs = ["n", 3, 4], [("y", F, dims(3))]
    if case == "dynamic":
        x_shape, init = [2, "m", 4], {"shape": i64(0, 4, -1)}
    elif case == "graph_output":
        x_shape, init = [2, 3, 4], {"shape": i64(2, 4, 3)}
        outputs.append(("f", F, [2, 12]))
    elif case == "lone":
        x_shape, init = [2, 3, 4], {"shape": i64(2, 4, 3)}
        nodes = nodes[1:]
        nodes[0].input[0] = "x"
    proto = make_model(nodes, [("x", F, x_shape)], outputs, init)
    model, _ = optimize(proto, [Fuse(only="reshape_chain")], {"x": rand(2, 3, 4)})
    assert ops(model) == [n.op_type for n in nodes]


def test_layout_rules_are_listed_and_skippable():
    names = {line.split()[0] for line in Fuse.details()[1:]}
    assert {"pad_conv", "transpose_gemm", "transpose_matmul", "reshape_chain"} <= names
    nodes, init = chain_nodes()
    proto = make_model(nodes, [("x", F, [2, 3, 4])], [("y", F, dims(3))], init)
    model, _ = optimize(proto, [Fuse(skip="reshape_chain")], {"x": rand(2, 3, 4)})
    assert ops(model) == ["Flatten", "Unsqueeze", "Reshape", "Squeeze"]
