"""quant(smooth=alpha): SmoothQuant, exact in float, folded into a LayerNorm's affine where it can be."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, run_proto
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passes import Quantize
from onnxopt.passes._common import infer_shapes
from onnxopt.passes.quant.smooth import smooth_inputs, smoothing_scales

K, N = 32, 16
LOUD = [3, 11, 20]  # activation channels far larger than the rest, as in transformers


def rng():
    return np.random.default_rng(0)


def activations(r, rows=32):
    x = r.standard_normal((rows, 8, K)).astype(np.float32)
    x[..., LOUD] *= 100
    return x


def weights(r, count):
    return {f"w{i}": (r.standard_normal((K, N)) * 0.1).astype(np.float32) for i in range(count)}


def layernorm_model(decomposed=False, residual=False):
    """LayerNorm (fused, or its affine tail as Mul + Add) → three MatMuls on its output (Q, K, V)."""
    r = rng()
    gamma = r.uniform(0.5, 1.5, K).astype(np.float32)
    gamma[LOUD] = 40
    init = {"g": gamma, "b": r.standard_normal(K).astype(np.float32), **weights(r, 3)}
    if decomposed:
        init["one"] = np.ones(K, np.float32)
        norm = [
            helper.make_node("LayerNormalization", ["x", "one"], ["n"], axis=-1),
            helper.make_node("Mul", ["n", "g"], ["t"]),
            helper.make_node("Add", ["t", "b"], ["h"]),
        ]
    else:
        norm = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1)]
    nodes = norm + [helper.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"]) for i in range(3)]
    outputs = [(f"y{i}", F, ["n", 8, N]) for i in range(3)]
    if residual:  # a post-LN transformer also adds the LayerNorm's output to the block's result
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"]))
        outputs.append(("r", F, ["n", 8, K]))
    return make_model(nodes, [("x", F, ["n", 8, K])], outputs, init)


def input_model(gemm=False):
    """Two MatMuls (or Gemms, one with transB) reading the graph input."""
    r = rng()
    init = weights(r, 2)
    if gemm:
        init["w1"] = np.ascontiguousarray(init["w1"].T)
        init["b0"] = r.standard_normal(N).astype(np.float32)
        nodes = [
            helper.make_node("Gemm", ["x", "w0", "b0"], ["y0"]),
            helper.make_node("Gemm", ["x", "w1"], ["y1"], transB=1),
        ]
        shape = ["n", K]
    else:
        nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
        shape = ["n", 8, K]
    return make_model(
        nodes, [("x", F, shape)], [(f"y{i}", F, [*shape[:-1], N]) for i in range(2)], init
    )


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=activations(rng()))
    return str(path)


def smoothed(proto, calib, alpha=0.5):
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    nodes = [n for n in model.graph if n.op_type in ("MatMul", "Gemm")]
    return model, smooth_inputs(model, nodes, alpha, calib)


def assert_same_in_float(proto, model, x):
    expected, got = run_proto(proto, {"x": x}), run_proto(model, {"x": x})
    for name in expected:
        np.testing.assert_allclose(
            got[name], expected[name], rtol=1e-5, atol=1e-5 * np.abs(expected[name]).max()
        )


def test_scales():
    s = smoothing_scales(np.array([4.0, 9.0, 0.0, 1e9]), np.array([1.0, 4.0, 2.0, 1e-9]), 0.5)
    np.testing.assert_allclose(
        s, [2.0, 1.5, 1.0, 1e5]
    )  # sqrt(4)/sqrt(1), sqrt(9)/sqrt(4), zero range, clipped
    assert smoothing_scales(np.array([3.0]), np.array([0.0]), 0.5)[0] == 1.0


@pytest.mark.parametrize("decomposed", [False, True])
def test_folded_into_the_layernorm_affine(calib, decomposed):
    proto = layernorm_model(decomposed)
    model, count = smoothed(proto, calib)
    assert count == 1 and ops(model) == [n.op_type for n in proto.graph.node]  # no node added
    assert_same_in_float(proto, model, activations(np.random.default_rng(1)))
    ln_or_mul = next(
        n for n in model.graph if n.op_type == ("Mul" if decomposed else "LayerNormalization")
    )
    gamma = ln_or_mul.inputs[1].const_value.numpy()
    assert gamma[LOUD].max() < 40 / 2  # the loud channels were divided down


@pytest.mark.parametrize(
    "proto",
    [layernorm_model(residual=True), input_model(), input_model(gemm=True)],
    ids=["residual", "input", "gemm"],
)
def test_a_mul_is_inserted_where_nothing_can_absorb_it(calib, tmp_path, proto):
    if (
        proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == K
    ):  # the Gemm model takes 2-D input
        np.savez(tmp_path / "calib2d.npz", x=activations(rng()).reshape(-1, K))
        calib = str(tmp_path / "calib2d.npz")
    model, count = smoothed(proto, calib)
    assert count == 1
    assert ops(model).count("Mul") == 1 and len(ops(model)) == len(proto.graph.node) + 1
    mul = next(n for n in model.graph if n.op_type == "Mul")
    readers = sorted(u.node.op_type for u in mul.outputs[0].uses())
    assert readers in (
        ["MatMul"] * 3,
        ["MatMul"] * 2,
        ["Gemm"] * 2,
    )  # the residual Add still reads h
    x = activations(np.random.default_rng(1))
    assert_same_in_float(proto, model, x if calib.endswith("calib.npz") else x.reshape(-1, K))


def quant_error(proto, calib, **options):
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(calib=calib, tune="off", **options)]
    )
    x = activations(np.random.default_rng(1))
    expected, got = run_proto(proto, {"x": x}), run_proto(model, {"x": x})
    return max(
        float(np.linalg.norm(got[k] - expected[k]) / np.linalg.norm(expected[k])) for k in expected
    )


def test_smoothing_lowers_the_int8_error(calib):
    proto = input_model()
    plain = quant_error(proto, calib, outliers=0)
    smooth = quant_error(proto, calib, outliers=0, smooth=0.5)
    assert plain > 0.02 and smooth < plain / 2, (plain, smooth)  # measured 0.026 and 0.0099


def test_static_mode_smooths_before_calibrating(calib):
    proto = input_model()
    plain = quant_error(proto, calib, mode="static", method="minmax")
    smooth = quant_error(proto, calib, mode="static", method="minmax", smooth=0.5)
    assert smooth < 0.8 * plain, (
        plain,
        smooth,
    )  # measured 0.055 and 0.039 (the output's int8 step stays)
    residual = layernorm_model(
        residual=True
    )  # the Add quantizes h; the smoothing Mul still reads it in float
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(residual),
        [Quantize(mode="static", calib=calib, tune="off", smooth=0.5)],
    )
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert mul.inputs[0].producer().op_type == "LayerNormalization"
    assert [u.node.op_type for u in mul.outputs[0].uses()] == ["QuantizeLinear"]


def test_usage_errors():
    with pytest.raises(UsageError, match="smooth needs calib"):
        Quantize(smooth=0.5, tune="off")
    with pytest.raises(UsageError, match=r"option smooth must be within \[0, 1\], got 1.5"):
        Quantize(smooth=1.5, calib="random", tune="off")
