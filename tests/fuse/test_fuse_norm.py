"""LayerNorm and GELU fusions: they fire on the patterns exporters emit, and refuse near misses."""

import numpy as np
import pytest
from helpers import F, make_model, ops, optimize
from onnx import helper

from onnxopt.passes import Fuse

RNG = np.random.default_rng(0)
SHAPE = [2, 5, 8]


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def layernorm_nodes(*, square="Pow", affine=True, axes=(-1,), eps=1e-5, opset=17):
    """x → mean → d = x - mean → var of d → d / sqrt(var + eps) (→ * gamma + beta)."""
    init = {"two": np.float32(2.0), "eps": np.float32(eps)}

    def reduce(src, dst):
        if opset >= 18:
            init["axes"] = np.array(axes, np.int64)
            return helper.make_node("ReduceMean", [src, "axes"], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=list(axes))

    nodes = [
        reduce("x", "mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"])
        if square == "Pow"
        else helper.make_node("Mul", ["d", "d"], ["sq"]),
        reduce("sq", "var"),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n" if affine else "y"]),
    ]
    if affine:
        init.update(gamma=rand(SHAPE[-1]), beta=rand(SHAPE[-1]))
        nodes += [
            helper.make_node("Mul", ["n", "gamma"], ["s"]),
            helper.make_node("Add", ["s", "beta"], ["y"]),
        ]
    return nodes, init


def layernorm_model(outputs=("y",), opset=17, **kwargs):
    nodes, init = layernorm_nodes(opset=opset, **kwargs)
    return make_model(
        nodes, [("x", F, SHAPE)], [(o, F, ["a", "b", "c"]) for o in outputs], init, opset=opset
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"square": "Mul"}, {"affine": False}, {"opset": 18}, {"axes": (1, 2)}]
)
def test_layernorm_fuses(kwargs):
    proto = layernorm_model(**kwargs)
    model, _ = optimize(proto, [Fuse(only="layernorm")], {"x": rand(*SHAPE)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["LayerNormalization"]
    node = model.graph.node(0)
    assert node.attributes.get_int("axis") == -len(kwargs.get("axes", (-1,)))
    assert abs(node.attributes.get_float("epsilon") - 1e-5) < 1e-12


@pytest.mark.parametrize(
    "proto",
    [
        layernorm_model(opset=16),  # LayerNormalization arrives in opset 17
        layernorm_model(outputs=("y", "d")),  # the centred value is needed elsewhere
        layernorm_model(outputs=("y", "var")),
        layernorm_model(axes=(1,)),  # not the last axes: not a LayerNormalization
    ],
    ids=["opset16", "centred-output", "variance-output", "middle-axis"],
)
def test_layernorm_refused(proto):
    model, _ = optimize(proto, [Fuse(only="layernorm")], {"x": rand(*SHAPE)})
    assert "LayerNormalization" not in ops(model)


def test_layernorm_keeps_a_scale_that_is_not_per_feature_outside():
    nodes, init = layernorm_nodes()
    init["gamma"] = rand(SHAPE[1], 1)  # varies along the sequence axis: not LayerNorm's scale
    proto = make_model(nodes, [("x", F, SHAPE)], [("y", F, SHAPE)], init)
    model, _ = optimize(proto, [Fuse(only="layernorm")], {"x": rand(*SHAPE)}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["LayerNormalization", "Mul", "Add"]


# GELU


def erf_gelu(scale="Div", order="x_half"):
    init = {"one": np.float32(1.0), "half": np.float32(0.5)}
    if scale == "Div":
        init["k"] = np.float32(np.sqrt(2.0))
    else:
        init["k"] = np.float32(np.sqrt(0.5))
    nodes = [
        helper.make_node(scale, ["x", "k"], ["s"]),
        helper.make_node("Erf", ["s"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
    ]
    if order == "x_half":  # (x * p) * 0.5, as torch.onnx emits
        nodes += [
            helper.make_node("Mul", ["x", "p"], ["xp"]),
            helper.make_node("Mul", ["xp", "half"], ["y"]),
        ]
    else:  # (x * 0.5) * p
        nodes += [
            helper.make_node("Mul", ["x", "half"], ["xh"]),
            helper.make_node("Mul", ["xh", "p"], ["y"]),
        ]
    return nodes, init


def tanh_gelu(cube="Pow", c=0.044715):
    init = {
        "one": np.float32(1.0),
        "half": np.float32(0.5),
        "c": np.float32(c),
        "k": np.float32(np.sqrt(2 / np.pi)),
        "three": np.float32(3.0),
    }
    if cube == "Pow":
        cube_nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])]
    else:
        cube_nodes = [
            helper.make_node("Mul", ["x", "x"], ["x2"]),
            helper.make_node("Mul", ["x2", "x"], ["x3"]),
        ]
    nodes = cube_nodes + [
        helper.make_node("Mul", ["x3", "c"], ["cx3"]),
        helper.make_node("Add", ["x", "cx3"], ["inner"]),
        helper.make_node("Mul", ["inner", "k"], ["t_in"]),
        helper.make_node("Tanh", ["t_in"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["p"]),
        helper.make_node("Mul", ["half", "x"], ["xh"]),
        helper.make_node("Mul", ["xh", "p"], ["y"]),
    ]
    return nodes, init


def gelu_model(built, outputs=("y",), opset=20):
    nodes, init = built
    return make_model(
        nodes, [("x", F, SHAPE)], [(o, F, ["a", "b", "c"]) for o in outputs], init, opset=opset
    )


@pytest.mark.parametrize(
    "built, approximate",
    [
        (erf_gelu(), None),
        (erf_gelu(scale="Mul"), None),
        (erf_gelu(order="half_x"), None),
        (tanh_gelu(), "tanh"),
        (tanh_gelu(cube="Mul"), "tanh"),
    ],
    ids=["erf-div", "erf-mul", "erf-half-first", "tanh-pow", "tanh-mul"],
)
def test_gelu_fuses(built, approximate):
    proto = gelu_model(built)
    x = rand(*SHAPE) * 3
    model, _ = optimize(proto, [Fuse(only="gelu")], {"x": x}, atol=1e-5, rtol=1e-4)
    assert ops(model) == ["Gelu"]
    assert model.graph.node(0).attributes.get_string("approximate", "none") == (
        approximate or "none"
    )


@pytest.mark.parametrize(
    "proto",
    [
        gelu_model(erf_gelu(), opset=19),  # Gelu arrives in opset 20
        gelu_model(erf_gelu(), outputs=("y", "e")),  # an intermediate is read elsewhere
        gelu_model(tanh_gelu(c=0.05)),  # not GELU's constant
    ],
    ids=["opset19", "intermediate-output", "wrong-constant"],
)
def test_gelu_refused(proto):
    model, _ = optimize(proto, [Fuse(only="gelu")], {"x": rand(*SHAPE)})
    assert "Gelu" not in ops(model)


def test_skip_leaves_a_rule_out():
    model, _ = optimize(gelu_model(erf_gelu()), [Fuse(skip="gelu|layernorm")], {"x": rand(*SHAPE)})
    assert "Gelu" not in ops(model) and "Erf" in ops(model)
