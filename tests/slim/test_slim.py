"""slim: FFN neurons found on the graph, removed by calibration importance, the down-projection refit
by least squares; refusals, the budget's rounding, both faces and the run's check."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model, run_proto
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passbase import parse_pass
from onnxopt.passes import Slim
from onnxopt.passes.slim import fit
from onnxopt.passes.slim.units import find

K, H, SEQ = 32, 64, 8


def weights(rng, layers, gated=False):
    w = {}
    for i in range(layers):
        w[f"w1_{i}"] = (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
        w[f"b1_{i}"] = (0.1 * rng.standard_normal(H)).astype(np.float32)
        w[f"w2_{i}"] = (rng.standard_normal((H, K)) / np.sqrt(H)).astype(np.float32)
        w[f"b2_{i}"] = (0.1 * rng.standard_normal(K)).astype(np.float32)
        if gated:
            w[f"wg_{i}"] = (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
    return w


def ffn_model(act="Gelu", layers=2, *, extra_output=None, twice=None, gated=False, seed=0):
    """x [batch, seq, K] through ``layers`` residual FFNs: MatMul W1 + b1, ``act``, MatMul W2 + b2,
    Add x. ``act``: Gelu (opset 20), Relu, erf (the exported Erf decomposition of GELU), silu.
    ``extra_output`` makes layer 0's activation a graph output too; ``twice`` has another node read
    layer 0's pre-activation; ``gated``: act(x Wg) * (x W1 + b1)."""
    rng = np.random.default_rng(seed)
    init = weights(rng, layers, gated)
    init.update({"sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)})
    nodes, x = [], "x"
    for i in range(layers):
        p = f"l{i}_"
        nodes += [
            helper.make_node("MatMul", [x, f"w1_{i}"], [p + "mm1"], name=f"up{i}"),
            helper.make_node("Add", [f"b1_{i}", p + "mm1"], [p + "pre"], name=f"up{i}_bias"),
        ]
        if act == "erf":
            nodes += [
                helper.make_node("Div", [p + "pre", "sqrt2"], [p + "d"]),
                helper.make_node("Erf", [p + "d"], [p + "e"]),
                helper.make_node("Add", [p + "e", "one"], [p + "e1"]),
                helper.make_node("Mul", [p + "pre", p + "e1"], [p + "m"]),
                helper.make_node("Mul", [p + "m", "half"], [p + "h"]),
            ]
        elif act == "silu":
            nodes += [
                helper.make_node("Sigmoid", [p + "pre"], [p + "s"]),
                helper.make_node("Mul", [p + "pre", p + "s"], [p + "h"]),
            ]
        elif gated:
            nodes += [
                helper.make_node("MatMul", [x, f"wg_{i}"], [p + "g"], name=f"gate{i}"),
                helper.make_node(act, [p + "g"], [p + "ga"]),
                helper.make_node("Mul", [p + "ga", p + "pre"], [p + "h"]),
            ]
        else:
            nodes.append(helper.make_node(act, [p + "pre"], [p + "h"]))
        nodes += [
            helper.make_node("MatMul", [p + "h", f"w2_{i}"], [p + "mm2"], name=f"down{i}"),
            helper.make_node("Add", [p + "mm2", f"b2_{i}"], [p + "y"]),
            helper.make_node("Add", [x, p + "y"], [p + "out"]),
        ]
        x = p + "out"
    outputs = [("out", F, ["batch", SEQ, K])]
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    if extra_output:
        outputs.append(("l0_h", F, ["batch", SEQ, H]))
    if twice:
        nodes.append(helper.make_node("Neg", ["l0_pre"], ["side"]))
        outputs.append(("side", F, ["batch", SEQ, H]))
    return make_model(nodes, [("x", F, ["batch", SEQ, K])], outputs, init, opset=20)


def samples(n, seed):
    return np.random.default_rng(seed).standard_normal((n, SEQ, K)).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("slim") / "calib.npz"
    np.savez(path, x=samples(48, 1))
    return str(path)


def slim(proto, **options):
    model = ir.serde.deserialize_model(proto)
    return model, Slim(**options)(model)


def width(model, name):
    node = next(n for n in model.graph if n.name == name)
    return node.inputs[1].const_value.shape[-1]


def error(proto, model, x):
    ref = run_proto(proto, {"x": x})["out"]
    got = run_proto(model, {"x": x})["out"]
    return float(np.mean((ref - got) ** 2) / np.mean(ref**2))


@pytest.mark.parametrize("act", ["Gelu", "Relu", "erf", "silu"])
def test_activations_are_found(act):
    ffns, refused = find(ir.serde.deserialize_model(ffn_model(act)).graph)
    assert [f.name for f in ffns] == ["up0", "up1"] and not refused
    assert {f.kind for f in ffns} == {"ffn"} and all(f.width == H for f in ffns)


def test_widths_round_to_the_multiple():
    assert fit.kept_width(64, 0.5, 16) == 32
    assert fit.kept_width(64, 0.25, 16) == 48
    assert fit.kept_width(64, 0.1, 16) == 64  # 57.6 rounds to 64: unchanged
    assert fit.kept_width(1536, 1 / 6, 16) == 1280
    assert fit.kept_width(40, 0.0, 16) == 40
    assert fit.kept_width(64, 0.9, 16) == 16


@pytest.mark.parametrize("act", ["Gelu", "erf"])
def test_slim_narrows_and_keeps_the_interface(act, calib):
    proto = ffn_model(act)
    model, result = slim(proto, ratio=0.25, calib=calib)
    assert result.modified and result.fidelity == 0.95
    assert width(model, "up0") == width(model, "up1") == 48
    assert [r["units_after"] for r in result.rows] == [48, 48]
    assert result.rows[0]["macs_before"] == (K + K) * H and result.rows[0]["output"] == "l0_y"
    assert result.notes[0] == f"removed 32 of {2 * H} neurons in 2 layer(s) (2 ffn)"
    assert [(v.name, v.dtype, list(v.shape)) for v in model.graph.outputs] == [
        ("out", ir.DataType.FLOAT, ["batch", SEQ, K])
    ]
    x = samples(4, 7)
    assert run_proto(model, {"x": x})["out"].shape == (4, SEQ, K)
    assert error(proto, model, x) < 0.05
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


@pytest.mark.parametrize("sequential", [True, False])
def test_the_refit_beats_dropping_rows(calib, sequential):
    proto = ffn_model("Gelu")
    held_out = samples(16, 99)
    errors = {}
    for refit in ("lsq", "bias", "none"):
        model, _ = slim(proto, ratio=0.5, calib=calib, refit=refit, sequential=sequential)
        errors[refit] = error(proto, model, held_out)
    assert errors["lsq"] < 0.5 * errors["none"], errors
    assert errors["lsq"] < errors["bias"], errors


def test_data_free_warns():
    proto = ffn_model("Relu")
    with pytest.warns(UserWarning, match="data-free"):
        model, result = slim(proto, ratio=0.5)
    assert width(model, "up0") == 32
    assert any(n.startswith("WARNING: slim without calib") for n in result.notes)


def test_a_gated_ffn(calib):
    proto = ffn_model("Sigmoid", layers=1, gated=True)
    ffns, _ = find(ir.serde.deserialize_model(proto).graph)
    assert [(f.kind, len(f.ups)) for f in ffns] == [("gated ffn", 2)]
    model, result = slim(proto, ratio=0.5, calib=calib)
    assert width(model, "up0") == width(model, "gate0") == 32
    assert error(proto, model, samples(4, 5)) < 0.1


def test_a_down_projection_without_bias_gets_one(calib):
    proto = ffn_model("Relu", layers=1)
    graph = proto.graph
    add = next(n for n in graph.node if list(n.input) == ["l0_mm2", "b2_0"])
    graph.node.remove(add)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == "l0_y":
                n.input[i] = "l0_mm2"
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "b2_0"))
    model, result = slim(proto, ratio=0.5, calib=calib)
    assert result.rows[0]["output"] == "l0_mm2"
    producer = next(v for n in model.graph for v in n.outputs if v.name == "l0_mm2").producer()
    assert producer.op_type == "Add"
    assert error(proto, model, samples(4, 5)) < 0.1


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"extra_output": True}, "l0_h inside the chain is a graph output"),
        ({"twice": True}, "l0_pre inside the chain is also read by"),
    ],
)
def test_ambiguous_chains_are_left_alone(calib, options, reason):
    proto = ffn_model("Relu", **options)
    model, result = slim(proto, ratio=0.5, calib=calib)
    assert width(model, "up0") == H and width(model, "up1") == 32
    assert any(n.startswith("left alone: up0: ") and reason in n for n in result.notes)


def test_ratio_zero_changes_nothing(calib):
    proto = ffn_model("Gelu")
    model, result = slim(proto, ratio=0, calib=calib)
    assert not result.modified and result.rows == []
    assert width(model, "up0") == H
    x = samples(2, 3)
    np.testing.assert_array_equal(
        run_proto(model, {"x": x})["out"], run_proto(proto, {"x": x})["out"]
    )


def test_options():
    with pytest.raises(UsageError, match="needs calib"):
        Slim(refit="lsq")
    with pytest.raises(UsageError, match="within"):
        Slim(ratio=0.95)
    assert repr(parse_pass("slim(ratio=0.5,multiple=8)")) == "slim(ratio=0.5,multiple=8)"
    assert Slim(calib="c.npz").score_method == "flap" and Slim().score_method == "magnitude"


def test_both_faces_pass_the_check(tmp_path, calib):
    """The run's check, on held-out samples like the calibration data, holds the budget."""
    path, held_out = tmp_path / "ffn.onnx", tmp_path / "held_out.npz"
    onnx.save(ffn_model("Gelu"), str(path))
    np.savez(held_out, x=samples(8, 42))
    _, report = onnxopt.optimize(str(path), [Slim(ratio=0.5, calib=calib)], inputs=held_out)
    model, report2 = onnxopt.optimize(
        str(path), [f"slim(ratio=0.5,calib={calib})"], inputs=held_out
    )
    assert width(model, "up0") == 32
    assert str(report2) and str(report)
