"""`onnxopt run --passes quant --report`: a row per layer (dtypes, scales, SQNR against the float model),
totals with the speedup, and the console table."""

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import F, make_model
from onnx import TensorProto, helper

from onnxopt import layer_error, report
from onnxopt.cli import cli
from onnxopt.passes import Quantize, WeightQuantize

RNG = np.random.default_rng(0)
LAYER_OPS = ("Conv", "MatMul", "Gemm", "Gather")


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def run_report(model_path, passes, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(model_path),
            "--passes",
            passes,
            "-o",
            str(tmp_path / "q.onnx"),
            "--report",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(out.read_text()), result.output


def rows_of(data):
    (section,) = data["layers"]
    assert section["pass"].startswith("quant")
    return {r["layer"]: r for r in section["layers"]}, section["layers"]


def layer_count(proto):
    return sum(n.op_type in LAYER_OPS for n in proto.graph.node)


def assert_scales(row, w, axis, qmax):
    expected = np.abs(w).max(axis=axis) / qmax
    assert row["weight_scale_count"] == expected.size and row["weight_zero_point_is_zero"] is True
    np.testing.assert_allclose(
        [row["weight_scale_min"], row["weight_scale_max"]],
        [expected.min(), expected.max()],
        rtol=1e-6,
    )


def assert_totals(data):
    totals = data["totals"]
    assert (
        totals["size_before"] == data["size_before"] > 0
        and totals["size_after"] == data["size_after"] > 0
    )
    assert isinstance(totals["speedup"], float) and totals["speedup"] > 0
    assert totals["p50_ms_before"] > 0 and totals["p50_ms_after"] > 0


@pytest.fixture
def dense_model(tmp_path):
    """Embedding → MatMul → Relu → Gemm, a MatMul to exclude, and a Conv (float in dynamic mode)."""
    w = {
        "table": rand(1100, 16),  # above dynamic.MIN_TABLE_BYTES
        "w1": rand(16, 8),
        "w2": rand(8, 4),
        "b2": rand(4, scale=0.1),
        "w3": rand(16, 4),
        "cw": rand(4, 3, 3, 3, scale=0.3),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
        helper.make_node("MatMul", ["e", "w3"], ["z"], name="skip"),
        helper.make_node("Conv", ["img", "cw"], ["c"], name="conv"),
    ]
    proto = make_model(
        nodes,
        [("ids", TensorProto.INT64, [4]), ("img", F, [1, 3, 8, 8])],
        [("y", F, [4, 4]), ("z", F, [4, 4]), ("c", F, [1, 4, 6, 6])],
        w,
    )
    proto.graph.value_info.extend(
        helper.make_tensor_value_info(n, F, s)
        for n, s in (("e", [4, 16]), ("h", [4, 8]), ("r", [4, 8]))
    )
    path = tmp_path / "dense.onnx"
    onnx.save(proto, str(path))
    return path, proto, w


def test_dynamic_rows(dense_model, tmp_path):
    path, proto, w = dense_model
    # 7-bit weights: CPUs without VNNI saturate on 8-bit ones, which would make the SQNR machine-dependent
    data, output = run_report(path, "quant(tune=off,reduce_range=true,exclude=skip)", tmp_path)
    rows, ordered = rows_of(data)
    assert len(ordered) == layer_count(proto) == 5
    assert [r["layer"] for r in ordered] == ["embed", "fc1", "fc2", "skip", "conv"]

    fc1, fc2 = rows["fc1"], rows["fc2"]
    assert (fc1["op"], fc1["weight"], fc1["activation"], fc1["output"]) == (
        "MatMul",
        "int8",
        "dynamic uint8",
        "h",
    )
    assert (fc2["op"], fc2["weight"], fc2["output"]) == ("Gemm", "int8", "y")
    assert_scales(fc1, w["w1"], 0, 63)
    assert_scales(fc2, w["w2"], 0, 63)
    assert math.isfinite(fc1["sqnr_db"]) and fc1["sqnr_db"] > 20
    assert fc1["why_float"] is None and fc1["activation_scale"] is None  # chosen at run time

    embed = rows["embed"]
    assert (embed["op"], embed["weight"], embed["activation"], embed["output"]) == (
        "Gather",
        "int8",
        None,
        "e",
    )
    assert_scales(embed, w["table"], 0, 127)
    assert embed["sqnr_db"] > 20

    skip = rows["skip"]
    assert (skip["weight"], skip["activation"], skip["weight_scale_min"]) == (
        "float32",
        "float32",
        None,
    )
    assert "exclude" in skip["why_float"]
    assert rows["conv"]["why_float"] == "Conv stays float in dynamic mode"
    assert rows["conv"]["sqnr_db"] == "inf"  # untouched, and nothing quantized feeds it

    assert_totals(data)
    assert (
        "layers of" in output
        and "fc1" in output
        and "dynamic uint8" in output
        and "speedup" in output
    )


def test_static_rows(tmp_path):
    w = {
        "w1": rand(8, 3, 3, 3, scale=0.3),
        "b1": rand(8, scale=0.1),
        "w2": rand(4, 8, 3, 3, scale=0.2),
        "b2": rand(4, scale=0.1),
        "w3": rand(2, 3, 1, 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
        helper.make_node("Mul", ["c1", "s"], ["a"], name="silu"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["x", "w3"], ["z"], name="side"),
    ]
    proto = make_model(
        nodes,
        [("x", F, ["n", 3, 16, 16])],
        [("y", F, ["n", 4, 16, 16]), ("z", F, ["n", 2, 16, 16])],
        w,
    )
    path, calib = tmp_path / "conv.onnx", tmp_path / "calib.npz"
    onnx.save(proto, str(path))
    x = RNG.uniform(0, 1, (16, 3, 16, 16)).astype(np.float32)
    np.savez(calib, x=x)

    data, output = run_report(
        path, f"quant(mode=static,calib={calib},method=minmax,tune=off,exclude=side)", tmp_path
    )
    rows, ordered = rows_of(data)
    assert len(ordered) == layer_count(proto) == 3
    conv1, conv2, side = rows["conv1"], rows["conv2"], rows["side"]
    for row, weight in ((conv1, w["w1"]), (conv2, w["w2"])):
        assert (row["op"], row["weight"], row["activation"], row["why_float"]) == (
            "Conv",
            "int8",
            "uint8",
            None,
        )
        assert_scales(row, weight, (1, 2, 3), 127)
    # x lies in [0, 1): minmax calibration gives zero point 0 and the scale of its largest value
    assert conv1["activation_zero_point"] == 0
    np.testing.assert_allclose(conv1["activation_scale"], x.max() / 255, rtol=1e-6)
    assert conv1["output"] == "c1" and conv1["sqnr_db"] > 20
    assert conv2["output"] == "y" and math.isfinite(
        conv2["sqnr_db"]
    )  # the graph output's name is on its DQ
    assert (side["weight"], side["activation"]) == ("float32", "float32") and "exclude" in side[
        "why_float"
    ]
    assert_totals(data)
    assert "conv1" in output and "uint8" in output


def test_sqnr():
    ref = np.ones((4, 8), np.float32)
    assert layer_error.sqnr(ref, ref.copy()) == math.inf
    assert layer_error.sqnr(ref, ref * 1.1) == pytest.approx(20.0)
    assert layer_error.sqnr(ref, np.full_like(ref, np.nan)) == -math.inf


def test_table_shows_the_lowest_sqnr_layers():
    rows = [
        {
            "layer": f"l{i}",
            "op": "MatMul",
            "weight": "int8",
            "activation": "dynamic uint8",
            "weight_scale_min": 0.01,
            "weight_scale_max": 0.02,
            "sqnr_db": float(i),
        }
        for i in range(45)
    ]
    rows[3]["sqnr_db"] = None  # not measured: never among the lowest
    table = report.layer_table("layers of quant", Quantize.columns, rows, limit=40)
    shown = list(table.columns[0].cells)
    assert len(shown) == 40 and "l3" not in shown and shown[0] == "l0" and shown[-1] == "l40"
    assert "5 more" in table.caption
    assert list(table.columns[4].cells)[0] == "0.01–0.02"


def test_table_shows_block_and_weight_mse_of_block_quantized_layers():
    rows = [
        {
            "layer": "fc1",
            "op": "MatMul",
            "weight": "uint4",
            "activation": "float32",
            "block": 32,
            "weight_mse": 0.0099,
            "weight_scale_min": 0.1,
            "weight_scale_max": 0.4,
            "sqnr_db": 19.4,
        },
        {
            "layer": "fc2",
            "op": "MatMul",
            "weight": "int8",
            "activation": "float32",
            "block": 128,
            "weight_mse": 4.09e-05,
            "weight_scale_min": 0.02,
            "weight_scale_max": 0.03,
            "sqnr_db": 21.8,
        },
    ]
    table = report.layer_table("layers of wquant", WeightQuantize.columns, rows)
    columns = {c.header: list(c.cells) for c in table.columns}
    assert columns["block"] == ["32", "128"] and columns["weight MSE"] == ["0.0099", "4.09e-05"]
