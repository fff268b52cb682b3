"""The activation rules of the fuse pass: Min/Max → Clip, Relu/Clip chains, HardSwish, Swish."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, optimize
from onnx import TensorProto, helper

from onnxopt.passes import Fuse
from onnxopt.passes.fuse.rules.activation import SWISH_LAST, SWISH_SINCE, count_swish

RNG = np.random.default_rng(0)
SHAPE = [2, 3, 8]


def x_values(dtype=np.float32):
    """Values from -8 to 8 (every clip range below lies inside), with the bounds themselves among them."""
    x = RNG.uniform(-8, 8, SHAPE)
    x.flat[:9] = [-6, -3, -1, 0, 1, 2, 3, 4, 6]
    return {"x": x.astype(dtype)}


def model(nodes, init=None, opset=17, outputs=("y",), elem=F):
    return make_model(
        nodes, [("x", elem, SHAPE)], [(o, elem, SHAPE) for o in outputs], init or {}, opset=opset
    )


def fuse(proto, rule, dtype=np.float32):
    return optimize(proto, [Fuse(only=rule)], x_values(dtype), atol=1e-5, rtol=1e-4)[0]


def s(value, dtype=np.float32):
    return np.array(value, dtype)


def node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], **attrs)


def test_rules_are_listed():
    names = {line.split()[0] for line in Fuse.details()[1:]}
    assert {"min_max_clip", "clip_chain", "hardswish", "swish"} <= names


# min_max_clip


@pytest.mark.parametrize("opset", [9, 17])
@pytest.mark.parametrize(
    "nodes",
    [
        [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")],
        [node("Max", ["lo", "x"], "m"), node("Min", ["hi", "m"], "y")],
        [node("Min", ["x", "hi"], "m"), node("Max", ["m", "lo"], "y")],
    ],
)
def test_min_max_clip_fires(nodes, opset):
    fused = fuse(model(nodes, {"lo": s(-1), "hi": s([2.5])}, opset=opset), "min_max_clip")
    assert ops(fused) == ["Clip"]
    clip = fused.graph.node(0)
    assert (len(clip.inputs), "min" in clip.attributes) == ((1, True) if opset < 11 else (3, False))
    assert fused.graph.outputs[0].name == "y"


def test_min_max_clip_keeps_float16():
    proto = model(
        [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")],
        {"lo": s(0, np.float16), "hi": s(6, np.float16)},
        elem=TensorProto.FLOAT16,
    )
    fused = fuse(proto, "min_max_clip", np.float16)
    assert ops(fused) == ["Clip"]
    assert [v.dtype for v in fused.graph.node(0).inputs] == [ir.DataType.FLOAT16] * 3


@pytest.mark.parametrize(
    "nodes, init, outputs",
    [
        (
            [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")],
            {"lo": s(3), "hi": s(1)},
            ("y",),
        ),  # lo > hi
        (
            [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")],  # per-element bounds
            {"lo": RNG.uniform(-2, 0, [8]).astype(np.float32), "hi": s(1)},
            ("y",),
        ),
        (
            [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")],
            {"lo": s(0), "hi": s(1)},
            ("y", "m"),
        ),
        (
            [
                node("Max", ["x", "lo"], "m"),
                node("Min", ["m", "hi"], "y"),
                node("Add", ["m", "y"], "z"),
            ],
            {"lo": s(0), "hi": s(1)},
            ("z",),
        ),  # the Max is read twice
        (
            [node("Max", ["x", "lo", "lo2"], "m"), node("Min", ["m", "hi"], "y")],
            {"lo": s(0), "lo2": s(-1), "hi": s(1)},
            ("y",),
        ),
    ],
)
def test_min_max_clip_refused(nodes, init, outputs):
    fused = fuse(model(nodes, init, outputs=outputs), "min_max_clip")
    assert "Clip" not in ops(fused)


# clip_chain


def clip(inp, out, lo=None, hi=None, name=""):
    """A Clip node and its bound initializers; None leaves a bound out."""
    inputs = [inp, f"{name}lo" if lo is not None else "", f"{name}hi" if hi is not None else ""]
    while inputs[-1] == "":
        inputs.pop()
    init = {f"{name}{k}": s(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None}
    return node("Clip", inputs, out), init


@pytest.mark.parametrize(
    "inner, outer, want, bounds",
    [
        (("Relu",), ("Relu",), "Relu", None),
        (("Relu",), (-1, 6), "Clip", (0, 6)),
        ((-2, 3), ("Relu",), "Clip", (0, 3)),
        ((-1, 4), (2, 6), "Clip", (2, 4)),
        ((None, 4), (-3, None), "Clip", (-3, 4)),
        ((-5, None), (0, None), "Relu", None),
    ],
)
def test_clip_chain_merges(inner, outer, want, bounds):
    nodes, init = [], {}
    for spec, inp, out, name in ((inner, "x", "a", "i"), (outer, "a", "y", "o")):
        if spec == ("Relu",):
            nodes.append(node("Relu", [inp], out))
        else:
            n, i = clip(inp, out, *spec, name=name)
            nodes.append(n)
            init.update(i)
    fused = fuse(model(nodes, init), "clip_chain")
    assert ops(fused) == [want]
    if bounds is not None:
        got = [v.const_value.numpy() for v in fused.graph.node(0).inputs[1:]]
        assert all(g.dtype == np.float32 and g.shape == () for g in got)
        assert [float(g) for g in got] == list(bounds)


def test_clip_chain_bounds_take_the_inputs_dtype():
    init = {"ilo": s(-1, np.float64), "ihi": s(4, np.float64), "ohi": s(2.5, np.float64)}
    nodes = [node("Clip", ["x", "ilo", "ihi"], "a"), node("Clip", ["a", "", "ohi"], "y")]
    proto = model(nodes, init, elem=TensorProto.DOUBLE)
    fused = fuse(proto, "clip_chain", np.float64)
    assert ops(fused) == ["Clip"]
    assert [v.dtype for v in fused.graph.node(0).inputs] == [ir.DataType.DOUBLE] * 3


@pytest.mark.parametrize("case", ["disjoint", "shared", "output", "input_bound", "opset10"])
def test_clip_chain_refused(case):
    inner, init = clip("x", "a", 0, 1, name="i")
    outer, more = (
        clip("a", "y", 2, 3, name="o") if case == "disjoint" else clip("a", "y", -1, 0.5, name="o")
    )
    init.update(more)
    nodes, outputs, inputs = [inner, outer], ["y"], [("x", F, SHAPE)]
    if case == "shared":
        nodes.append(node("Add", ["a", "y"], "z"))
        outputs = ["z"]
    elif case == "output":
        outputs.append("a")
    elif case == "input_bound":  # a bound the caller feeds is no constant
        del init["ohi"]
        inputs.append(("ohi", F, []))
    opset = 10 if case == "opset10" else 17
    if case == "opset10":
        nodes = [node("Relu", ["x"], "a"), node("Relu", ["a"], "y")]
    proto = make_model(nodes, inputs, [(o, F, SHAPE) for o in outputs], init, opset=opset)
    feeds = {**x_values(), "ohi": s(0.5)}
    fused, _ = optimize(proto, [Fuse(only="clip_chain")], feeds)
    assert len(fused.graph) == len(nodes)


# hardswish


def relu6_of_x_plus_3(out="c"):
    return [node("Add", ["x", "three"], "a"), node("Clip", ["a", "zero", "six"], out)]


SIX = {"three": s(3), "zero": s(0), "six": s(6), "sixth": s(1 / 6)}


@pytest.mark.parametrize(
    "tail",
    [
        [node("Div", ["c", "six"], "h"), node("Mul", ["x", "h"], "y")],
        [node("Mul", ["sixth", "c"], "h"), node("Mul", ["h", "x"], "y")],
        [node("Mul", ["x", "c"], "m"), node("Div", ["m", "six"], "y")],
        [node("Mul", ["c", "x"], "m"), node("Mul", ["m", "sixth"], "y")],
    ],
)
def test_hardswish_from_the_clip_form(tail):
    fused = fuse(model(relu6_of_x_plus_3() + tail, SIX), "hardswish")
    assert ops(fused) == ["HardSwish"]


@pytest.mark.parametrize("inputs", [["x", "h"], ["h", "x"]])
def test_hardswish_from_hardsigmoid(inputs):
    nodes = [node("HardSigmoid", ["x"], "h", alpha=0.16666667, beta=0.5), node("Mul", inputs, "y")]
    assert ops(fuse(model(nodes), "hardswish")) == ["HardSwish"]


def test_hardsigmoid_from_the_clip_form_alone():
    fused = fuse(model(relu6_of_x_plus_3() + [node("Div", ["c", "six"], "y")], SIX), "hardswish")
    assert ops(fused) == ["HardSigmoid"]
    attributes = fused.graph.node(0).attributes
    assert (
        attributes.get_float("alpha") == pytest.approx(1 / 6)
        and attributes.get_float("beta") == 0.5
    )


@pytest.mark.parametrize(
    "case",
    [
        "alpha",
        "opset13",
        "times_other",
        "shared",
        "add_shared",
        "clip_to_5",
        "clip_from_1",
        "add_2",
        "clip_times_other",
    ],
)
def test_hardswish_refused(case):
    if case in ("alpha", "opset13", "times_other"):
        alpha = 0.2 if case == "alpha" else 1 / 6
        factor = "k" if case == "times_other" else "x"
        nodes = [node("HardSigmoid", ["x"], "h", alpha=alpha), node("Mul", [factor, "h"], "y")]
        proto = model(nodes, {"k": s(2)}, opset=13 if case == "opset13" else 17)
    else:
        bounds = {"clip_to_5": ["zero", "five"], "clip_from_1": ["one", "six"]}.get(
            case, ["zero", "six"]
        )
        nodes = [
            node("Add", ["x", "two" if case == "add_2" else "three"], "a"),
            node("Clip", ["a", *bounds], "c"),
        ]
        if case == "clip_times_other":  # (k * Clip(x + 3, 0, 6)) / 6
            nodes += [node("Mul", ["k", "c"], "m"), node("Div", ["m", "six"], "y")]
        else:
            nodes += [node("Div", ["c", "six"], "h"), node("Mul", ["x", "h"], "y")]
        outputs = ("y", {"shared": "c", "add_shared": "a"}[case]) if "shared" in case else ("y",)
        proto = model(
            nodes, {**SIX, "two": s(2), "one": s(1), "five": s(5), "k": s(2)}, outputs=outputs
        )
    fused = fuse(proto, "hardswish")
    assert ops(fused) == [n.op_type for n in proto.graph.node]


# swish


def swish_model(opset, outputs=("y",), inputs=("x", "s")):
    return model(
        [node("Sigmoid", ["x"], "s"), node("Mul", list(inputs), "y")], opset=opset, outputs=outputs
    )


@pytest.mark.skipif(SWISH_SINCE is None, reason="the installed onnx has no Swish")
@pytest.mark.parametrize("inputs", [("x", "s"), ("s", "x")])
def test_swish_fuses_from_its_opset(inputs):
    proto = swish_model(SWISH_SINCE, inputs=inputs)
    assert count_swish(ir.serde.deserialize_model(proto)) == 1
    fused = fuse(proto, "swish")
    assert ops(fused) == ["Swish"]
    assert count_swish(fused) == 0


@pytest.mark.parametrize(
    "opset, outputs", [(17, ("y",)), (SWISH_SINCE or 17, ("y", "s")), (SWISH_LAST + 1, ("y",))]
)
def test_swish_recognised_but_left_alone(opset, outputs):
    proto = swish_model(opset, outputs)
    fused = fuse(proto, "swish")
    assert ops(fused) == ["Sigmoid", "Mul"]
    assert count_swish(fused) == 1


def test_inspect_reports_swish_left_as_is():
    from onnxopt.inspection import describe

    info = describe(ir.serde.deserialize_model(swish_model(17, ("y",))))
    assert list(info["findings"].values()) == [1] and "Sigmoid" in next(iter(info["findings"]))


def test_count_swish_ignores_other_products():
    nodes = [
        node("Sigmoid", ["x"], "s"),
        node("Mul", ["s", "s"], "q"),
        node("Neg", ["x"], "n"),
        node("Mul", ["n", "s"], "p"),
        node("Mul", ["x", "s"], "w"),
        node("Add", ["q", "p"], "r"),
        node("Add", ["r", "w"], "y"),
    ]
    assert count_swish(ir.serde.deserialize_model(model(nodes))) == 1


def test_skip_leaves_an_activation_rule_out():
    nodes = [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"], "y")]
    proto = model(nodes, {"lo": s(0), "hi": s(1)})
    fused, _ = optimize(proto, [Fuse(skip="min_max_clip")], x_values())
    assert ops(fused) == ["Max", "Min"]
