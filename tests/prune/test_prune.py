"""The prune pass: each rule fires where it is exact, and only there."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, optimize
from onnx import TensorProto, helper

from onnxopt.passes import Prune

X = np.linspace(-2, 2, 24, dtype=np.float32).reshape(2, 3, 4)
I64 = TensorProto.INT64


def pruned(nodes, inits=None, x_shape=(2, 3, 4), y_shape=None, y_type=F, opset=17, feeds=None):
    y_shape = list(x_shape) if y_shape is None else y_shape
    proto = make_model(
        nodes, [("x", F, list(x_shape))], [("y", y_type, y_shape)], inits or {}, opset=opset
    )
    model, _ = optimize(proto, ["prune"], feeds or {"x": X})
    return ops(model)


def relu_after(node_op, *args, **attrs):
    """x -> node -> Relu -> y, so that the rule's node is not the graph output."""
    return [
        helper.make_node(node_op, ["x", *args], ["t"], **attrs),
        helper.make_node("Relu", ["t"], ["y"]),
    ]


@pytest.mark.parametrize(
    "nodes, inits",
    [
        (relu_after("Identity"), {}),
        (relu_after("Dropout"), {}),
        (
            relu_after("Dropout", "ratio", "training"),
            {"ratio": np.float32(0.5), "training": np.bool_(False)},
        ),
        (relu_after("Cast", to=TensorProto.FLOAT), {}),
        (relu_after("Reshape", "shape"), {"shape": np.array([2, 3, 4], np.int64)}),
        (relu_after("Reshape", "shape"), {"shape": np.array([0, 0, -1], np.int64)}),
        (relu_after("Expand", "shape"), {"shape": np.array([1, 4], np.int64)}),
        (
            relu_after("Slice", "starts", "ends", "axes"),
            {"starts": np.array([0]), "ends": np.array([2**63 - 1]), "axes": np.array([2])},
        ),
        (
            relu_after("Slice", "starts", "ends"),
            {"starts": np.array([0, 0]), "ends": np.array([2, 3])},
        ),
        (relu_after("Pad", "pads"), {"pads": np.zeros(6, np.int64)}),
        (relu_after("Transpose", perm=[0, 1, 2]), {}),
        (relu_after("Concat", axis=0), {}),
        (relu_after("Split", axis=1, num_outputs=1), {}),
        (relu_after("Mul", "one"), {"one": np.ones((1, 4), np.float32)}),
        (relu_after("Add", "zero"), {"zero": np.float32(0)}),
        (relu_after("Sub", "zero"), {"zero": np.zeros((1, 1, 1), np.float32)}),
        (relu_after("Div", "one"), {"one": np.float32(1)}),
        (
            [helper.make_node("Mul", ["one", "x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
            {"one": np.float32(1)},
        ),
    ],
    ids=[
        "identity",
        "dropout",
        "dropout-not-training",
        "cast",
        "reshape",
        "reshape-copy",
        "expand",
        "slice-to-end",
        "slice-full",
        "pad",
        "transpose",
        "concat",
        "split",
        "mul1",
        "add0",
        "sub0",
        "div1",
        "1mul",
    ],
)
def test_no_op_is_removed(nodes, inits):
    opset = 18 if any(n.op_type == "Split" for n in nodes) else 17
    assert pruned(nodes, inits, opset=opset) == ["Relu"]


@pytest.mark.parametrize(
    "nodes, inits",
    [
        (
            relu_after("Dropout", "ratio", "training"),
            {"ratio": np.float32(0.0), "training": np.bool_(True)},
        ),
        (relu_after("Cast", to=TensorProto.DOUBLE), {}),
        (relu_after("Expand", "shape"), {"shape": np.array([2, 2, 3, 4], np.int64)}),
        (relu_after("Slice", "starts", "ends"), {"starts": np.array([0]), "ends": np.array([1])}),
        (relu_after("Pad", "pads"), {"pads": np.array([0, 0, 1, 0, 0, 0], np.int64)}),
        (relu_after("Transpose", perm=[0, 2, 1]), {}),
        (relu_after("Mul", "two"), {"two": np.float32(2)}),
        (
            relu_after("Add", "zero"),
            {"zero": np.zeros((5, 1, 1, 1), np.float32)},
        ),  # broadcast grows the shape
        (relu_after("Sub", "zero")[::-1][::-1], {"zero": np.zeros(4, np.float32) + 1}),
        (
            [helper.make_node("Div", ["one", "x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
            {"one": np.float32(1)},
        ),
        (
            [helper.make_node("Sub", ["zero", "x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
            {"zero": np.float32(0)},
        ),
    ],
    ids=[
        "dropout-training",
        "cast-double",
        "expand-grows",
        "slice-part",
        "pad",
        "transpose",
        "mul2",
        "add-broadcast",
        "sub1",
        "1div",
        "0sub",
    ],
)
def test_op_that_does_something_stays(nodes, inits):
    if nodes[0].op_type == "Cast":
        assert pruned(
            nodes + [helper.make_node("Cast", ["y"], ["z"], to=F)][:2],
            inits,
            y_type=TensorProto.DOUBLE,
        ) == ["Cast", "Relu"]
        return
    feeds = None
    if nodes[0].op_type == "Dropout":
        # Training-mode dropout is random; ratio 0 keeps it deterministic while still a real node.
        feeds = {"x": X}
    assert len(pruned(nodes, inits, feeds=feeds)) == 2


def test_transpose_pairs_cancel_or_compose():
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["a"], ["y"], perm=[1, 0, 2]),
    ]
    assert pruned(nodes) == ["Identity"]  # y is a graph output fed straight by the graph input x
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Transpose", ["r"], ["a"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["a"], ["y"], perm=[0, 2, 1]),
    ]
    assert pruned(nodes) == ["Relu", "Transpose"]


def test_reshape_chain_collapses_unless_it_copies_dims():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Reshape", ["f", "s1"], ["a"]),
        helper.make_node("Reshape", ["a", "s2"], ["y"]),
    ]
    inits = {"s1": np.array([6, 4], np.int64), "s2": np.array([4, -1], np.int64)}
    assert pruned(nodes, inits, y_shape=[4, 6]) == ["Relu", "Reshape"]
    # The last 0 copies a dim of the intermediate: that Reshape keeps its input; Flatten still goes.
    inits["s2"] = np.array([0, 2, -1], np.int64)
    assert pruned(nodes, inits, y_shape=[6, 2, 2]) == ["Relu", "Reshape", "Reshape"]


def test_squeeze_unsqueeze_pairs_cancel():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "axes"], ["u"]),
        helper.make_node("Squeeze", ["u", "axes_neg"], ["y"]),
    ]
    assert pruned(nodes, {"axes": np.array([1]), "axes_neg": np.array([-3])}) == ["Relu"]
    assert pruned(
        nodes, {"axes": np.array([0, 1]), "axes_neg": np.array([-4])}, y_shape=[1, 2, 3, 4]
    ) == ["Relu", "Unsqueeze", "Squeeze"]


def test_cast_chains_collapse_only_when_exact():
    def chain(middle, last):
        return [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Cast", ["r"], ["m"], to=middle),
            helper.make_node("Cast", ["m"], ["y"], to=last),
        ]

    assert pruned(chain(TensorProto.DOUBLE, F)) == ["Relu"]
    assert pruned(chain(TensorProto.DOUBLE, I64), y_type=I64) == ["Relu", "Cast"]
    # float -> int32 -> float truncates: both casts stay.
    assert pruned(chain(TensorProto.INT32, F)) == ["Relu", "Cast", "Cast"]
    # float -> float16 -> float rounds: both casts stay.
    assert pruned(chain(TensorProto.FLOAT16, F)) == ["Relu", "Cast", "Cast"]


def test_duplicates_dead_code_and_constants():
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("c", F, [4], [1, 2, 3, 4])
        ),
        helper.make_node("Add", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["x", "w2"], ["b"]),  # same as a: w2 duplicates w1
        helper.make_node("Mul", ["a", "b"], ["m"]),
        helper.make_node("Mul", ["m", "c"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead"]),
    ]
    w = np.arange(4, dtype=np.float32)
    proto = make_model(
        nodes, [("x", F, [2, 3, 4])], [("y", F, [2, 3, 4])], {"w1": w, "w2": w.copy(), "unused": w}
    )
    model, report = optimize(proto, ["prune"], {"x": X})
    assert ops(model) == ["Add", "Mul", "Mul"]
    assert report.after.initializers == 2  # w1 (w2 and unused gone) and the lifted Constant
    assert model.graph.outputs[0].name == "y"


def test_output_names_survive_when_the_output_node_is_removed():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    proto = make_model(nodes, [("x", F, [2, 3, 4])], [("y", F, [2, 3, 4])])
    model, _ = optimize(proto, ["prune"], {"x": X})
    assert ops(model) == ["Relu"] and model.graph.outputs[0].name == "y"


def test_prunes_inside_subgraphs():
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", F, [2, 3, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F, [2, 3, 4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    proto = make_model(nodes, [("x", F, [2, 3, 4])], [("y", F, [2, 3, 4])], {"zero": np.float32(0)})
    model, _ = optimize(proto, ["prune"], {"x": X + 3})
    assert sorted(ops(model)) == ["Greater", "If", "Neg", "ReduceSum", "Relu"]


def test_prune_is_quiet_on_a_clean_model():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2, 3, 4])], [("y", F, [2, 3, 4])]
    )
    assert not Prune()(ir.serde.deserialize_model(proto)).modified


def test_reshape_skips_a_whole_shape_chain_in_one_call():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "zero"], ["u"]),
        helper.make_node("Flatten", ["u"], ["f"], axis=1),
        helper.make_node("Squeeze", ["f", "zero"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["y"]),
    ]
    inits = {"zero": np.array([0], np.int64), "shape": np.array([4, 6], np.int64)}
    proto = make_model(nodes, [("x", F, [2, 3, 4])], [("y", F, [4, 6])], inits)
    model = ir.serde.deserialize_model(proto)
    assert Prune().call(model).modified
    assert ops(model) == ["Relu", "Reshape"]
    assert pruned(nodes, inits, y_shape=[4, 6]) == ["Relu", "Reshape"]


@pytest.mark.parametrize("opset", [11, 13])
def test_axes_of_reads_the_attribute_or_the_input(opset):
    from onnxopt.passes._common import axes_of

    if opset < 13:
        node = ir.node("Squeeze", [ir.Value(name="x")], {"axes": [0, -1]})
    else:
        axes = ir.Value(name="axes", const_value=ir.tensor(np.array([0, -1], np.int64)))
        node = ir.node("Squeeze", [ir.Value(name="x"), axes])
    assert axes_of(node) == [0, -1]
    assert axes_of(ir.node("Squeeze", [ir.Value(name="x")])) is None
    assert axes_of(ir.node("Squeeze", [ir.Value(name="x"), ir.Value(name="a")])) is None
