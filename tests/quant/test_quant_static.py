"""quant(mode=static): QDQ placement that onnxruntime turns into integer kernels, checked against float."""

import re
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, run_proto
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passes import Quantize
from onnxopt.passes.quant.ort_profile import scope_of
from onnxopt.passes.quant.search import balanced
from onnxopt.passes.quant.static import activation_params

RNG = np.random.default_rng(0)


def conv_silu_model():
    """Conv → SiLU (Sigmoid, Mul) → Conv with biases: a YOLO-style block."""
    w1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (RNG.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s"]),
        helper.make_node("Mul", ["c1", "s"], ["a"]),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    init = {
        "w1": w1,
        "b1": RNG.standard_normal(8).astype(np.float32) * 0.1,
        "w2": w2,
        "b2": RNG.standard_normal(4).astype(np.float32) * 0.1,
    }
    return make_model(nodes, [("x", F, ["n", 3, 16, 16])], [("y", F, ["n", 4, 16, 16])], init)


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=RNG.uniform(0, 1, (16, 3, 16, 16)).astype(np.float32))
    return str(path)


def test_activation_params_hold_zero_exactly():
    scale, zp = activation_params(-1.0, 3.0, "uint8")
    assert scale == np.float32(4 / 255) and zp.dtype == np.uint8 and zp == 64
    scale, zp = activation_params(0.5, 2.0, "int8")  # the range is widened to include 0
    assert scale == np.float32(2 / 255) and zp == -128
    assert activation_params(0.0, 0.0, "uint8")[0] == 1


def test_symmetric_activations_center_the_zero_point():
    scale, zp = activation_params(-1.0, 3.0, "uint8", symmetric=True)
    assert scale == np.float32(6 / 255) and zp == 128
    scale, zp = activation_params(-1.0, 3.0, "int8", symmetric=True)
    assert scale == np.float32(6 / 255) and zp == 0


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_qdq_runs_as_integer_kernels_and_matches_float(calib, method, tmp_path):
    proto = conv_silu_model()
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", mode="static", calib=calib, method=method)],
    )
    kinds = ops(model)
    assert kinds.count("QuantizeLinear") == 5 and kinds.count("Conv") == 2  # x, c1, s, a, y
    weights = [
        n
        for n in model.graph
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
    ]
    assert sorted(str(n.inputs[0].const_value.dtype) for n in weights) == [
        "INT32",
        "INT32",
        "INT8",
        "INT8",
    ]
    for node in model.graph:
        if node.op_type in ("Conv", "Sigmoid", "Mul"):
            assert all(
                v.producer().op_type == "DequantizeLinear" for v in node.inputs if v is not None
            )
            assert [u.node.op_type for u in node.outputs[0].uses()] == ["QuantizeLinear"]
    x = RNG.uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    expected, got = run_proto(proto, {"x": x})["y"], run_proto(model, {"x": x})["y"]
    cosine = float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.995
    if method == "minmax":  # the other methods clip the calibration's extremes on purpose
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    # onnxruntime's own optimizer turns the node units into integer kernels
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    fused = {n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node}
    assert {"QLinearConv", "QLinearSigmoid", "QLinearMul"} <= fused and "Conv" not in fused


def test_exclude_keeps_float(calib):
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(conv_silu_model()),
        [Quantize(tune="off", mode="static", calib=calib, exclude="")],
    )
    assert ops(model).count("QuantizeLinear") == 5
    proto = conv_silu_model()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", mode="static", calib=calib, exclude="n[1-3]")],
    )
    assert ops(model).count("QuantizeLinear") == 2  # the first Conv's input and output only


def test_static_needs_calibration_data(tmp_path):
    with pytest.raises(UsageError, match="mode=static needs calibration data"):
        Quantize(tune="off", mode="static")
    with pytest.raises(UsageError, match="option method takes one of minmax, percentile, entropy"):
        Quantize(tune="off", mode="static", calib="x.npz", method="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnxopt.run(
            ir.serde.deserialize_model(conv_silu_model()),
            [Quantize(tune="off", mode="static", calib="random")],
        )
    assert any("random inputs" in str(w.message) for w in caught)


def test_data_movement_keeps_the_input_scale(calib):
    """Reshape/MaxPool outputs reuse their input's scale, so onnxruntime runs them on int8 directly."""
    w = (RNG.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [("x", F, ["n", 3, 16, 16])],
        [("y", F, ["n", 2, 8, 8])],
        {"w": w, "w2": (RNG.standard_normal((2, 4, 1, 1)) * 0.3).astype(np.float32)},
    )
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", mode="static", calib=calib, min_cosine=0.5)],
    )
    pool = next(n for n in model.graph if n.op_type == "MaxPool")
    before = pool.inputs[0].producer()  # the DQ of the first Conv's output
    after = next(u.node for u in pool.outputs[0].uses())  # the Q of the pool's output
    for i in (1, 2):
        assert before.inputs[i].const_value.numpy() == after.inputs[i].const_value.numpy()


def test_cli_warns_in_one_line(tmp_path, capsys):
    from helpers import cli

    path = tmp_path / "m.onnx"
    onnx.save(conv_silu_model(), str(path))
    assert (
        cli(
            "run",
            path,
            "--passes",
            "quant(mode=static,calib=random,tune=off)",
            "--shape",
            "x=1,3,16,16",
            "-o",
            tmp_path / "q.onnx",
        )
        == 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: pass quant: calibrating on random inputs")
    assert cli("run", path, "--passes", "quant(mode=static)", "-o", tmp_path / "r.onnx") == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: pass quant: mode=static needs calibration data: calib=PATH (.npz or folder), or calib=random"
    )


def test_min_cosine_keeps_the_costliest_scopes_in_float(calib, tmp_path):
    """A block whose int8 output is poor (a huge-range activation) is the one kept in float."""
    proto = conv_silu_model()
    names = ["/block0/conv/Conv", "/block0/act/Sigmoid", "/block0/act/Mul", "/head/conv/Conv"]
    for node, name in zip(proto.graph.node, names):
        node.name = name
    w2 = next(i for i in proto.graph.initializer if i.name == "w2")
    big = onnx.numpy_helper.to_array(w2).copy()
    big[0, 0] = 400.0  # one output channel dwarfs the others: per-tensor int8 output loses the rest
    w2.CopyFrom(onnx.numpy_helper.from_array(big, "w2"))
    loose, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", mode="static", calib=calib, min_cosine=0.5)],
    )
    strict = Quantize(tune="off", mode="static", calib=calib, min_cosine=0.9999)
    tight, report = onnxopt.run(ir.serde.deserialize_model(proto), [strict])
    # the scopes kept float: the note names them all (Sigmoid and Mul have no row), the rows of the
    # Convs among them say so
    listed = re.match(r"kept (\d+) scopes \((.*?)\) in float", report.passes[0].notes[0])
    kept = listed[2].split(", ") if listed else []
    assert listed and int(listed[1]) == len(kept)
    for row in report.passes[0].rows:
        held = (row["why_float"] or "").startswith("kept float to hold min_cosine=0.9999")
        assert held == (scope_of(row["layer"]) in kept), row
    assert kept and set(kept) <= {"/block0/conv", "/block0/act", "/head/conv"}
    assert report.passes[0].notes[0].startswith(f"kept {len(kept)} scopes (")
    assert "in float to hold min_cosine=0.9999" in report.passes[0].notes[0]
    x = np.load(calib)["x"][:8]  # the samples the search holds the budget on
    expected = run_proto(proto, {"x": x})["y"]

    def cos(m):  # as the search measures it: every output channel weighted alike
        ref, got = balanced(expected, run_proto(m, {"x": x})["y"])
        return float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))

    assert cos(tight) > cos(loose) and cos(tight) >= 0.9999
    assert ops(tight).count("QuantizeLinear") < ops(loose).count("QuantizeLinear")


def test_balanced_cosine_sees_small_channels():
    """[1, 84, anchors]-like: 4 channels in pixels, 80 in [0, 1]. Noise on the small channels
    hides in a plain cosine and shows once every channel carries the same energy."""
    rng = np.random.default_rng(3)
    ref = np.concatenate(
        [rng.uniform(0, 320, (1, 4, 500)), rng.uniform(0, 0.05, (1, 80, 500))], axis=1
    )
    got = ref.copy()
    got[:, 4:] += rng.normal(0, 0.05, (1, 80, 500))

    def cos(a, b):
        return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(ref, got) > 0.999
    assert cos(*balanced(ref, got)) < 0.8
    flat = rng.standard_normal((4, 10))  # rank 2: left as it is
    assert balanced(flat, flat)[0] is flat
