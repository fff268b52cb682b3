"""The fold pass: what it folds, what it must leave alone, and that outputs never change."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, optimize
from onnx import TensorProto, helper

from onnxopt.passes import Fold
from onnxopt.passes.fold import fold as fold_module

X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


def test_folds_constant_chains_into_one_initializer():
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("c", F, [4], [1, 2, 3, 4])
        ),
        helper.make_node("Mul", ["c", "two"], ["c2"]),
        helper.make_node("Sqrt", ["c2"], ["c3"]),
        helper.make_node("Add", ["x", "c3"], ["y"]),
    ]
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], {"two": np.float32(2)})
    model, report = optimize(proto, ["fold"], {"x": X})
    assert ops(model) == ["Add"]
    assert report.before.nodes == 4 and report.after.nodes == 1
    assert len(model.graph.initializers) == 1
    folded = next(iter(model.graph.initializers.values())).const_value.numpy()
    np.testing.assert_allclose(folded, np.sqrt(np.array([2, 4, 6, 8], np.float32)))


def test_static_shape_chain_becomes_a_constant():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0u"]),
        helper.make_node("Concat", ["d0u", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = {
        "zero": np.int64(0),
        "axes": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
    }
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], inits)
    model, _ = optimize(proto, ["fold"], {"x": X})
    assert ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [3, -1]


def test_gather_of_a_static_dim_folds_while_symbolic_dims_stay():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["d1"], axis=0),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0u"]),
        helper.make_node("Unsqueeze", ["d1", "axes"], ["d1u"]),
        helper.make_node("Concat", ["d0u", "d1u"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = {"zero": np.int64(0), "one": np.int64(1), "axes": np.array([0], np.int64)}
    proto = make_model(nodes, [("x", F, ["batch", 4])], [("y", F, ["batch", 4])], inits)
    model, _ = optimize(proto, ["fold"], {"x": X})
    assert sorted(ops(model)) == ["Concat", "Gather", "Reshape", "Shape", "Unsqueeze"]


def test_size_limit_keeps_large_results_computed():
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", F, [1], [0.5])
        ),
        helper.make_node("ReduceSum", ["big", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    inits = {"shape": np.array([1000, 4], np.int64), "axes": np.array([0], np.int64)}
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], inits)
    # The sum is small, so it folds even though its input is large.
    model, _ = optimize(proto, ["fold(size_limit=100)"], {"x": X})
    assert ops(model) == ["Add"]
    # Without the reduction, the 4000-element tensor itself would be the result: it stays a node.
    nodes = [nodes[0], helper.make_node("Add", ["x2", "big"], ["y"])]
    proto = make_model(nodes, [("x2", F, [1000, 4])], [("y", F, [1000, 4])], inits)
    model, _ = optimize(proto, [Fold(size_limit=100)], {"x2": np.ones((1000, 4), np.float32)})
    assert ops(model) == ["ConstantOfShape", "Add"]
    model, _ = optimize(proto, [Fold()], {"x2": np.ones((1000, 4), np.float32)})
    assert ops(model) == ["Add"]


def test_random_and_quantization_ops_are_never_folded():
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], shape=[3, 4], seed=1.0),
        helper.make_node("QuantizeLinear", ["w", "scale", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"]),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "dq"], ["a"]),
        helper.make_node("Add", ["a", "r0"], ["y"]),
    ]
    inits = {"w": X, "scale": np.float32(0.1), "zp": np.uint8(128), "zero": np.float32(0)}
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], inits)
    model = ir.serde.deserialize_model(proto)
    Fold()(model)
    assert sorted(ops(model)) == sorted(
        ["RandomNormal", "QuantizeLinear", "DequantizeLinear", "Mul", "Add", "Add"]
    )


def test_initializer_that_is_also_an_input_is_not_a_constant():
    nodes = [
        helper.make_node("Mul", ["w", "w"], ["w2"]),
        helper.make_node("Add", ["x", "w2"], ["y"]),
    ]
    proto = make_model(
        nodes, [("x", F, [3, 4]), ("w", F, [4])], [("y", F, [3, 4])], {"w": np.ones(4, np.float32)}
    )
    model, _ = optimize(proto, ["fold"], {"x": X, "w": np.arange(4, dtype=np.float32)})
    assert ops(model) == ["Mul", "Add"]


def branch(name, value):
    return helper.make_graph(
        [helper.make_node("Add", ["x", f"{name}_c"], [f"{name}_out"])],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", F, [3, 4])],
        initializer=[helper.make_tensor(f"{name}_c", F, [4], [value] * 4)],
    )


def test_if_with_constant_condition_becomes_its_branch():
    nodes = [
        helper.make_node("Greater", ["a", "b"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)
        ),
    ]
    proto = make_model(
        nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], {"a": np.float32(2), "b": np.float32(1)}
    )
    model, _ = optimize(proto, ["fold"], {"x": X})
    assert ops(model) == ["Add"]
    assert model.graph.outputs[0].name == "y"
    assert next(iter(model.graph.initializers.values())).const_value.numpy().tolist() == [1.0] * 4


def test_folds_inside_subgraphs():
    inner = helper.make_graph(
        [helper.make_node("Neg", ["k"], ["nk"]), helper.make_node("Add", ["x", "nk"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", F, [3, 4])],
        initializer=[helper.make_tensor("k", F, [4], [1, 2, 3, 4])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=inner, else_branch=branch("else", -1.0)
        ),
    ]
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])], {"zero": np.float32(0)})
    for sign in (1, -1):
        model, _ = optimize(proto, ["fold"], {"x": sign * np.abs(X) + 0.1})
    assert ops(model) == ["ReduceSum", "Greater", "If", "Add", "Add"]


def test_batch_failure_falls_back_to_node_by_node(monkeypatch):
    real_run = fold_module._run

    def fail_batches(nodes, model, wanted, known=None):
        if len(nodes) > 1:
            raise RuntimeError("batch failed")
        return real_run(nodes, model, wanted, known)

    monkeypatch.setattr(fold_module, "_run", fail_batches)
    test_folds_constant_chains_into_one_initializer()


def test_graph_output_that_folds_keeps_its_name():
    nodes = [
        helper.make_node("Add", ["a", "a"], ["const_out"]),
        helper.make_node("Relu", ["x"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [("x", F, [3, 4])],
        [("y", F, [3, 4]), ("const_out", F, [2])],
        {"a": np.array([1, 2], np.float32)},
    )
    model, _ = optimize(proto, ["fold"], {"x": X})
    assert [v.name for v in model.graph.outputs] == ["y", "const_out"]
    assert ops(model) == ["Relu"]


def test_fold_reports_no_change_on_a_folded_model():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = make_model(nodes, [("x", F, [3, 4])], [("y", F, [3, 4])])
    model = ir.serde.deserialize_model(proto)
    assert not Fold()(model).modified


@pytest.mark.parametrize("dtype", [TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE])
def test_folds_other_dtypes(dtype):
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    nodes = [
        helper.make_node("Mul", ["a", "a"], ["sq"]),
        helper.make_node("Add", ["x", "sq"], ["y"]),
    ]
    proto = make_model(
        nodes, [("x", dtype, [3])], [("y", dtype, [3])], {"a": np.array([1, 2, 3], np_type)}
    )
    model, _ = optimize(proto, ["fold"], {"x": np.array([1, 1, 1], np_type)})
    assert ops(model) == ["Add"]
