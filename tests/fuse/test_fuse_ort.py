"""fuse(target=ort): onnxruntime contrib ops, only when asked, and only where onnxruntime runs them."""

import pytest
from helpers import F, make_model, ops, optimize
from onnx import helper
from test_fuse_norm import SHAPE, erf_gelu, rand, tanh_gelu

from onnxopt.passes import Fuse

OUT = ["a", "b", "c"]


def with_bias(built, bias=True):
    """x + bias (a vector along the last axis), then the GELU pattern."""
    nodes, init = built
    if not bias:
        return nodes, init
    renamed = [
        helper.make_node(n.op_type, [("xb" if i == "x" else i) for i in n.input], n.output)
        for n in nodes
    ]
    init = {**init, "bias": rand(SHAPE[-1])}
    return [helper.make_node("Add", ["x", "bias"], ["xb"]), *renamed], init


def gelu_model(built, opset=17):
    nodes, init = built
    return make_model(nodes, [("x", F, SHAPE)], [("y", F, OUT)], init, opset=opset)


def ort_ops(model):
    return [(n.domain, n.op_type) for n in model.graph]


@pytest.mark.parametrize(
    "built, expected",
    [
        (erf_gelu(), [("com.microsoft", "Gelu")]),
        (tanh_gelu(), [("com.microsoft", "FastGelu")]),
        (with_bias(erf_gelu()), [("com.microsoft", "BiasGelu")]),
        (with_bias(tanh_gelu()), [("com.microsoft", "FastGelu")]),
    ],
    ids=["gelu", "fast-gelu", "bias-gelu", "fast-gelu-bias"],
)
def test_gelu_becomes_contrib_ops_before_opset_20(built, expected):
    model, _ = optimize(
        gelu_model(built), [Fuse(target="ort")], {"x": rand(*SHAPE) * 3}, atol=1e-4, rtol=1e-3
    )
    assert ort_ops(model) == expected
    assert model.opset_imports["com.microsoft"] == 1


def test_bias_folds_into_a_standard_gelu_at_opset_20():
    model, _ = optimize(
        gelu_model(with_bias(erf_gelu()), opset=20),
        [Fuse(target="ort")],
        {"x": rand(*SHAPE)},
        atol=1e-5,
        rtol=1e-4,
    )
    assert ort_ops(model) == [("com.microsoft", "BiasGelu")]


def test_contrib_ops_only_with_target_ort():
    model, _ = optimize(gelu_model(with_bias(erf_gelu())), [Fuse()], {"x": rand(*SHAPE)})
    assert (
        ops(model) == ["Add", "Div", "Erf", "Add", "Mul", "Mul"]
        and "com.microsoft" not in model.opset_imports
    )


def residual_layernorm(skip_shape=SHAPE, mean_output=False):
    outputs = ["y", "mean"] if mean_output else ["y"]
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["s"]),
        helper.make_node(
            "LayerNormalization", ["s", "gamma", "beta"], outputs, axis=-1, epsilon=1e-6
        ),
    ]
    return make_model(
        nodes,
        [("x", F, SHAPE), ("skip", F, skip_shape)],
        [(o, F, OUT) for o in outputs],
        {"gamma": rand(SHAPE[-1]), "beta": rand(SHAPE[-1])},
    )


def test_skip_layernorm():
    feeds = {"x": rand(*SHAPE), "skip": rand(*SHAPE)}
    model, _ = optimize(residual_layernorm(), [Fuse(target="ort")], feeds, atol=1e-5, rtol=1e-4)
    assert ort_ops(model) == [("com.microsoft", "SkipLayerNormalization")]
    assert abs(model.graph.node(0).attributes.get_float("epsilon") - 1e-6) < 1e-12


@pytest.mark.parametrize(
    "kwargs",
    [{"skip_shape": [1, 1, SHAPE[-1]]}, {"mean_output": True}],
    ids=["broadcast-skip", "mean-output-used"],
)
def test_skip_layernorm_refused(kwargs):
    proto = residual_layernorm(**kwargs)
    feeds = {"x": rand(*SHAPE), "skip": rand(*kwargs.get("skip_shape", SHAPE))}
    model, _ = optimize(proto, [Fuse(target="ort")], feeds)
    assert ops(model) == ["Add", "LayerNormalization"]


def gemm_gelu(trans_b=1, bias_len=6, alpha=1.0, outputs=("y",)):
    w = rand(6, 4) if trans_b else rand(4, 6)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=trans_b, alpha=alpha),
        helper.make_node("Gelu", ["g"], ["y"]),
    ]
    return make_model(
        nodes,
        [("x", F, [3, 4])],
        [(o, F, [3, 6]) for o in outputs],
        {"w": w, "b": rand(bias_len)},
        opset=20,
    )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bias_moves_into_bias_gelu(trans_b):
    model, _ = optimize(
        gemm_gelu(trans_b), [Fuse(target="ort")], {"x": rand(3, 4)}, atol=1e-5, rtol=1e-4
    )
    assert ort_ops(model) == [("", "MatMul"), ("com.microsoft", "BiasGelu")]


@pytest.mark.parametrize(
    "kwargs",
    [{"bias_len": 1}, {"alpha": 0.5}, {"outputs": ("y", "g")}],
    ids=["broadcast-bias", "alpha", "gemm-output-used"],
)
def test_gemm_bias_gelu_refused(kwargs):
    model, _ = optimize(
        gemm_gelu(**kwargs), [Fuse(target="ort", only="gemm_bias_gelu")], {"x": rand(3, 4)}
    )
    assert ops(model) == ["Gemm", "Gelu"]
