"""The fuse rule base: explicit precedence, match apart from rewrite, and why a rule does (not) fire."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, optimize
from onnx import helper
from test_fuse import bn, conv_bn_model, dims, rand

from onnxopt.errors import UsageError
from onnxopt.passbase import parse_pass
from onnxopt.passes import Fuse
from onnxopt.passes.fuse.fuse import Explanation
from onnxopt.passes.fuse.rule import Context, Match
from onnxopt.passes.fuse.rules import RULES

# The order rules are tried on a node: the first that fires wins there.
ORDER = [
    "min_max_clip",
    "clip_chain",
    "hardswish",
    "swish",
    "pad_conv",
    "transpose_gemm",
    "transpose_matmul",
    "conv_bn",
    "conv_affine",
    "matmul_add",
    "layernorm",
    "gelu",
    "ort_gelu",
    "bias_gelu",
    "skip_layernorm",
    "gemm_bias_gelu",
    "reshape_shape",
    "reshape_chain",
]


def test_rules_are_tried_in_the_order_of_the_tuple():
    assert [r.name for r in RULES] == ORDER
    names = [line.split()[0] for line in Fuse.details()[1:]]
    assert names == ORDER
    by_op = Fuse(target="ort").rules(Context(20, "ort"))
    assert [r.name for r in by_op["Add"]] == ["conv_affine", "matmul_add", "bias_gelu"]
    assert [r.name for r in by_op["Erf"]] == ["gelu", "ort_gelu"]
    assert "Erf" not in Fuse().rules(Context(13, "onnx"))  # gelu needs opset 20, ort_gelu ort


def test_match_carries_a_reason_or_the_rewrite_bindings():
    failed = Match.fail("the Conv output c is read by 2 nodes")
    assert not failed and failed.reason == "the Conv output c is read by 2 nodes"
    found = Match.ok(node=None, scale=2.0)
    assert found and found.reason is None and dict(found.bindings) == {"node": None, "scale": 2.0}


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def rows_of(rows: list[Explanation], op_type: str, rule: str = "") -> list[tuple[str, bool, str]]:
    return [
        (r.rule, r.fires, r.reason)
        for r in rows
        if r.op_type == op_type and (not rule or r.rule == rule)
    ]


def test_explain_says_why_conv_bn_does_not_fire_and_changes_nothing():
    norm, params = bn("bn", "c", 6, "y")
    proto = make_model(  # the Conv output has a second reader
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            norm,
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
        ],
        [("x", F, [1, 4, 5, 5])],
        [("y", F, dims(4)), ("r", F, dims(4))],
        {"w": rand(6, 4, 3, 3), **params},
    )
    model = ir.serde.deserialize_model(proto)
    before = serialized(model)
    rows = Fuse().explain(model)
    assert serialized(model) == before
    assert rows_of(rows, "BatchNormalization") == [
        ("conv_bn", False, "the Conv output c is read by 2 nodes")
    ]
    ((rule, fires, reason),) = rows_of(rows, "Conv")
    assert (rule, fires) == ("pad_conv", False) and "not computed by Pad" in reason
    assert all(isinstance(r, Explanation) and r.node for r in rows)
    # What explain says is what the pass does.
    fused, _ = optimize(proto, [Fuse()], {"x": rand(1, 4, 5, 5)})
    assert ops(fused) == ["Conv", "BatchNormalization", "Relu"]


def test_explain_says_which_rule_fires():
    proto = conv_bn_model()
    model = ir.serde.deserialize_model(proto)
    before = serialized(model)
    rows = Fuse().explain(model)
    assert serialized(model) == before
    assert rows_of(rows, "BatchNormalization") == [("conv_bn", True, "fires")]
    # Once fused, nothing is left to explain there.
    assert rows_of(Fuse().explain(model, fused=True), "BatchNormalization") == []
    assert "BatchNormalization" in ops(model)


def test_explain_shows_precedence_and_rules_left_out():
    proto = make_model(  # a per-channel Add after a Conv: conv_affine, then matmul_add, bias_gelu
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Add", ["c", "b"], ["y"], name="add"),
        ],
        [("x", F, [1, 4, 5, 5])],
        [("y", F, dims(4))],
        {"w": rand(6, 4, 3, 3), "b": rand(1, 6, 1, 1)},
    )
    model = ir.serde.deserialize_model(proto)
    assert rows_of(Fuse().explain(model), "Add") == [
        ("conv_affine", True, "fires"),
        ("matmul_add", False, "not tried: conv_affine fires first"),
        ("bias_gelu", False, "not tried: conv_affine fires first"),
    ]
    assert rows_of(Fuse(skip="conv_affine").explain(model), "Add") == [
        ("conv_affine", False, "left out by skip"),
        (
            "matmul_add",
            False,
            "c is computed by Conv, not MatMul; b is a constant, not computed by MatMul",
        ),
        ("bias_gelu", False, "only with target=ort"),
    ]
    rows = rows_of(Fuse(only="matmul_add", target="ort").explain(model), "Add")
    assert rows[0] == ("conv_affine", False, "not among only")
    assert rows[2][0] == "bias_gelu" and rows[2][2] == "not among only"


def layernorm_model(opset: int):
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["y"], name="div"),
    ]
    return make_model(
        nodes,
        [("x", F, [2, 3, 8])],
        [("y", F, [2, 3, 8])],
        {"eps": np.array(1e-5, np.float32)},
        opset=opset,
    )


def test_a_rule_the_opset_lacks_is_explained_and_noted():
    model = ir.serde.deserialize_model(layernorm_model(13))
    assert rows_of(Fuse().explain(model), "Div", "layernorm") == [
        ("layernorm", False, "needs opset 17+ (the model has 13)")
    ]
    outcome = Fuse(only="layernorm").call(model)
    assert not outcome.modified
    assert outcome.notes == ["rule layernorm needs opset 17+ (the model has 13): not applied"]
    assert Fuse().call(ir.serde.deserialize_model(layernorm_model(13))).notes == []
    model = ir.serde.deserialize_model(layernorm_model(17))
    assert rows_of(Fuse().explain(model), "Div") == [
        ("conv_affine", False, "d is computed by Sub, not Conv/ConvTranspose/Gemm/MatMul"),
        ("layernorm", True, "fires"),
    ]


def test_skip_and_only_are_lists_of_known_rule_names():
    assert Fuse(only="conv_bn|matmul_add").only == ["conv_bn", "matmul_add"]
    assert Fuse(skip=["gelu", "layernorm"]).skip == ["gelu", "layernorm"]
    parsed = parse_pass("fuse(skip=gelu;layernorm,target=ort)")
    assert (parsed.skip, parsed.target) == (["gelu", "layernorm"], "ort")
    assert parse_pass(repr(parsed)).settings() == parsed.settings()
    assert repr(Fuse()) == "fuse" and Fuse().skip == [] and Fuse().only == []
    with pytest.raises(UsageError, match="only names unknown rules nope"):
        Fuse(only=["conv_bn", "nope"])
    with pytest.raises(UsageError, match="target must be onnx or ort"):
        parse_pass("fuse(target=trt)")
    (target,) = [o for o in Fuse.options if o.name == "target"]
    assert target.choices == ("onnx", "ort")


def test_explain_sees_constant_nodes_and_leaves_them_as_they_are():
    norm, params = bn("bn", "c", 6, "y")
    constants = [  # the parameters as Constant nodes: the pass lifts them, explain on a copy
        helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(f"{name}.t", F, array.shape, array)
        )
        for name, array in params.items()
    ]
    proto = make_model(
        [*constants, helper.make_node("Conv", ["x", "w"], ["c"]), norm],
        [("x", F, [1, 4, 5, 5])],
        [("y", F, dims(4))],
        {"w": rand(6, 4, 3, 3)},
    )
    model = ir.serde.deserialize_model(proto)
    before = serialized(model)
    assert rows_of(Fuse().explain(model), "BatchNormalization") == [("conv_bn", True, "fires")]
    assert rows_of(Fuse().explain(model, fused=True), "BatchNormalization") == []
    assert serialized(model) == before
    assert ops(model).count("Constant") == 4
