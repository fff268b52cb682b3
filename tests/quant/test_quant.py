"""quant(mode=dynamic): the arithmetic against numpy and onnxruntime, the rewrite on small models, refusals."""

import re

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, cli, make_model, ops, run_proto
from onnx import TensorProto, helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passes import Quantize
from onnxopt.passes.quant.ort_profile import scope_of
from onnxopt.passes.quant.qmath import dequantize, dynamic_uint8, quantize_symmetric

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def timed(notes):
    """tune=latency's whole-model times (float, int8) in ms, from the run's note."""
    (found,) = [
        re.search(r"int8 p20 ([\d.]+) ms vs float ([\d.]+) ms", n) for n in notes if "p20" in n
    ]
    return float(found[2]), float(found[1])


def kept_float(rows):
    """The scopes the rows say were kept float to hold min_cosine."""
    return sorted(
        {
            scope_of(r["layer"])
            for r in rows
            if (r["why_float"] or "").startswith("kept float to hold")
        }
    )


def test_symmetric_per_channel_matches_numpy():
    w = rand(16, 5)
    w[:, 3] = 0  # an all-zero channel gets scale 1, not a division by zero
    q, scale = quantize_symmetric(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (5,) and scale[3] == 1
    expected = np.abs(w).max(0) / 127
    np.testing.assert_allclose(scale[[0, 1, 2, 4]], expected[[0, 1, 2, 4]], rtol=1e-6)
    assert np.abs(q).max() == 127 and np.all(q[:, 3] == 0)
    # rounding error at most half a step per element
    assert np.all(np.abs(dequantize(q, scale, 0, axis=1) - w) <= scale / 2 + 1e-7)


def test_per_tensor_and_reduce_range():
    w = rand(8, 8)
    q, scale = quantize_symmetric(w, None, reduce_range=True)
    assert scale.shape == () and np.abs(q).max() == 63
    np.testing.assert_allclose(scale, np.abs(w).max() / 63, rtol=1e-6)


@pytest.mark.parametrize(
    "x", [rand(4, 7) * 3, np.abs(rand(3, 5)), -np.abs(rand(2, 6)), np.zeros((2, 2), np.float32)]
)
def test_dynamic_uint8_is_what_onnxruntime_computes(x):
    model = make_model(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        [("x", F, list(x.shape))],
        [("q", TensorProto.UINT8, list(x.shape)), ("s", F, []), ("z", TensorProto.UINT8, [])],
    )
    got = run_proto(model, {"x": x})
    q, scale, zero_point = dynamic_uint8(x)
    if x.any():
        np.testing.assert_allclose(got["s"], scale, rtol=1e-6)
        assert got["z"] == zero_point
        assert np.abs(got["q"].astype(int) - q.astype(int)).max() <= 1  # ties may round either way
    else:
        assert not got["q"].any()


def reference(x, w, per_channel=True):
    """Dynamic int8 in numpy: uint8 activations per tensor, 7-bit weights per output channel.

    With 7-bit weights (reduce_range) no pair of uint8 x int8 products overflows int16, so
    onnxruntime's AVX2 kernels (which saturate there) compute exactly this; with 8-bit weights
    they may not, which is what reduce_range is for.
    """
    q, scale = quantize_symmetric(w, 1 if per_channel else None, reduce_range=True)
    xq, xs, xz = dynamic_uint8(x)
    acc = (xq.astype(np.int64) - int(xz)) @ q.astype(np.int64)
    return (acc * (xs * scale)).astype(np.float32)


def matmul_model(w, shape=(6, 16), gemm=None, bias=None):
    if gemm is None:
        nodes, init = [helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}
    else:
        init = {"w": w, **({"b": bias} if bias is not None else {})}
        nodes = [
            helper.make_node(
                "Gemm", ["x", "w", *(["b"] if bias is not None else [])], ["y"], **gemm
            )
        ]
    n = w.shape[0] if gemm and gemm.get("transB") else w.shape[1]
    return make_model(nodes, [("x", F, list(shape))], [("y", F, [shape[0], n])], init)


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_becomes_the_fusable_integer_form(per_channel):
    w, x = rand(16, 8), rand(6, 16)
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(matmul_model(w)),
        [Quantize(tune="off", per_channel=per_channel, reduce_range=True)],
    )
    assert ops(model) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
    assert [
        v.const_value.dtype
        for v in model.graph.initializers.values()
        if v.name.endswith("weight_int8")
    ] == [ir.DataType.INT8]
    assert "w" not in model.graph.initializers  # the float weight is gone
    got = run_proto(model, {"x": x})["y"]
    np.testing.assert_allclose(got, reference(x, w, per_channel), rtol=1e-5, atol=1e-5)
    cosine = (got * (x @ w)).sum() / np.linalg.norm(got) / np.linalg.norm(x @ w)
    assert cosine > 0.995


@pytest.mark.parametrize(
    "gemm, bias", [({"transB": 1, "alpha": 0.5, "beta": 2.0}, rand(8)), ({}, rand(1)), ({}, None)]
)
def test_gemm(gemm, bias):
    w = rand(8, 16) if gemm.get("transB") else rand(16, 8)
    x = rand(6, 16)
    proto = matmul_model(w, gemm=gemm, bias=bias)
    expected = run_proto(proto, {"x": x})["y"]
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(tune="off", reduce_range=True)]
    )
    assert "MatMulInteger" in ops(model) and "Gemm" not in ops(model)
    dense = (w.T if gemm.get("transB") else w) * gemm.get("alpha", 1.0)
    b = 0 if bias is None else bias * gemm.get("beta", 1.0)
    np.testing.assert_allclose(
        run_proto(model, {"x": x})["y"], reference(x, dense) + b, rtol=1e-5, atol=1e-5
    )
    assert np.abs(run_proto(model, {"x": x})["y"] - expected).max() < 0.05 * np.abs(expected).max()


def embedding_model(rows=1400):
    table = rand(rows, 12)
    node = helper.make_node("Gather", ["table", "ids"], ["e"], axis=0)
    return make_model(
        [node], [("ids", TensorProto.INT64, [2, 5])], [("e", F, [2, 5, 12])], {"table": table}
    ), table


def test_gather_keeps_an_int8_table():
    proto, table = embedding_model()
    ids = RNG.integers(0, 50, (2, 5))
    model, _ = onnxopt.run(ir.serde.deserialize_model(proto), [Quantize(tune="off")])
    assert ops(model) == ["Gather", "Cast", "Mul"]  # a per-axis DequantizeLinear's numbers
    q, scale = quantize_symmetric(table, 1)
    np.testing.assert_allclose(
        run_proto(model, {"ids": ids})["e"], dequantize(q, scale, 0, axis=1)[ids], rtol=1e-6
    )
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(tune="off", per_channel=False)]
    )
    assert ops(model) == ["Gather", "DequantizeLinear"]


def test_small_tables_stay_float():
    """A table under MIN_TABLE_BYTES saves nothing and its lookups cost as much as a large one's."""
    proto, _ = embedding_model(rows=50)
    model, _ = onnxopt.run(ir.serde.deserialize_model(proto), [Quantize(tune="off")])
    assert ops(model) == ["Gather"]


def test_options_select_what_is_quantized():
    proto, _ = embedding_model()
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(tune="off", op_types="MatMul")]
    )
    assert ops(model) == ["Gather"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="layer.0/dense"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="head"),
    ]
    proto = make_model(
        nodes, [("x", F, [2, 4])], [("y", F, [2, 3])], {"w": rand(4, 4), "w2": rand(4, 3)}
    )
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), ["quant(tune=off,exclude=head|layer\\.9.*)"]
    )
    assert ops(model).count("MatMulInteger") == 1 and ops(model)[-1] == "MatMul"


def test_weights_in_constant_nodes_and_a_shared_input():
    w = helper.make_node("Constant", [], ["w"], value=helper.make_tensor("v", F, [4, 3], rand(12)))
    nodes = [
        w,
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    proto = make_model(nodes, [("x", F, [2, 4])], [("y", F, [2, 3])], {"w2": rand(4, 3)})
    model, _ = onnxopt.run(ir.serde.deserialize_model(proto), [Quantize(tune="off")])
    assert ops(model).count("MatMulInteger") == 2 and ops(model).count("DynamicQuantizeLinear") == 1


def test_refusals():
    with pytest.raises(UsageError, match="option mode takes one of dynamic, static, got 'fp8'"):
        Quantize(tune="off", mode="fp8")
    with pytest.raises(
        UsageError, match="option op_types takes one of MatMul, Gemm, Gather, got 'Conv'"
    ):
        Quantize(tune="off", op_types="Conv")
    with pytest.raises(UsageError, match="bad regex"):
        Quantize(tune="off", exclude="(")
    proto = matmul_model(rand(16, 8))
    model, _ = onnxopt.run(ir.serde.deserialize_model(proto), [Quantize(tune="off")])
    with pytest.raises(UsageError, match="already quantized .*DynamicQuantizeLinear"):
        onnxopt.run(model, [Quantize(tune="off")])


def test_run_checks_the_fidelity_budget(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(rand(16, 8)), str(path))
    assert cli("run", path, "--passes", "quant(tune=off)", "-o", tmp_path / "ok.onnx") == 0
    assert (
        cli("run", path, "--passes", "quant(tune=off,min_cosine=1)", "-o", tmp_path / "strict.onnx")
        == 1
    )
    assert not (tmp_path / "strict.onnx").exists()


def test_outlier_channels():
    from onnxopt.passes._calibrate import outlier_channels

    amax = np.array([1.0, 1.2, 30.0, 0.9, 9.0, 1.1, 50.0])
    assert outlier_channels(amax, 4.0, 8).tolist() == [2, 4, 6]
    assert outlier_channels(amax, 4.0, 2).tolist() == [2, 6]  # the largest first
    assert outlier_channels(amax, 0, 8).size == 0


def test_calibrated_outliers_stay_float(tmp_path):
    """An input channel 100x larger than the rest would flatten per-tensor int8; with calib it stays float."""
    w = rand(16, 8)
    proto = matmul_model(w, shape=("n", 16))
    x = rand(64, 16)
    x[:, 5] *= 100
    np.savez(tmp_path / "calib.npz", x=x[:32])
    plain, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(tune="off", reduce_range=True)]
    )
    split, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", reduce_range=True, calib=str(tmp_path / "calib.npz"))],
    )
    assert ops(split) == [
        "Mul",
        "Gather",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "Cast",
        "Mul",
        "Mul",
        "MatMul",
        "Add",
    ]
    test = x[32:]
    expected = test @ w
    # the int8 part is the numpy reference on the input without channel 5; channel 5 is exact
    inliers = test.copy()
    inliers[:, 5] = 0
    w_in = w.copy()
    w_in[5] = 0
    got = run_proto(split, {"x": test})["y"]
    np.testing.assert_allclose(
        got, reference(inliers, w_in) + np.outer(test[:, 5], w[5]), rtol=1e-4, atol=1e-4
    )
    error = {
        name: np.abs(run_proto(m, {"x": test})["y"] - expected).mean()
        for name, m in [("plain", plain), ("split", split)]
    }
    assert error["split"] < error["plain"] / 10


def test_outlier_split_takes_the_bias_into_the_int8_kernel(tmp_path):
    """MatMul then Add(bias): the bias goes right after the int8 product (onnxruntime fuses it into
    the int8 kernel), the outliers' Add last; the output keeps its name and matches."""
    rng = np.random.default_rng(7)  # the module's RNG would shift the data of the tests after it
    w, b = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8,)))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense/MatMul"),
        helper.make_node("Add", ["b", "h"], ["y"], name="dense/Add"),
    ]
    proto = make_model(nodes, [("x", F, ["n", 16])], [("y", F, ["n", 8])], {"w": w, "b": b})
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:, 5] *= 100
    np.savez(tmp_path / "calib.npz", x=x[:32])
    split, _ = onnxopt.run(
        ir.serde.deserialize_model(proto),
        [Quantize(tune="off", calib=str(tmp_path / "calib.npz"))],
    )
    assert ops(split)[-4:] == ["Mul", "Add", "MatMul", "Add"]
    assert [n.name for n in split.graph][-1].endswith("with_outliers")
    test = x[32:]
    got = run_proto(split, {"x": test})["y"]
    np.testing.assert_allclose(got, test @ w + b, rtol=0.05, atol=0.05 * np.abs(test @ w).max())


def test_calib_errors(tmp_path):
    proto = matmul_model(rand(16, 8))
    with pytest.raises(UsageError, match="does not exist"):
        onnxopt.run(
            ir.serde.deserialize_model(proto),
            [Quantize(tune="off", calib=str(tmp_path / "none.npz"))],
        )


def test_tune_latency_never_returns_a_slower_model():
    """On a tiny MatMul the int8 form (five kernels instead of one) is slower: the float model comes back."""
    proto = matmul_model(rand(4, 4), shape=(1, 4))
    q = Quantize(tune="latency")
    model, report = onnxopt.run(ir.serde.deserialize_model(proto), [q])
    assert ops(model) == ["MatMul"]
    fp, int8 = timed(report.passes[0].notes)
    assert int8 >= fp
    assert any("cannot speed up this model" in note for note in report.passes[0].notes)
    x = rand(1, 4)
    np.testing.assert_array_equal(run_proto(model, {"x": x})["y"], run_proto(proto, {"x": x})["y"])
    with pytest.raises(UsageError, match="option tune takes one of latency, off, got 'fast'"):
        Quantize(tune="fast")


def test_dynamic_min_cosine_keeps_the_costly_matmul_in_float(tmp_path):
    """Two MatMuls; one reads an input with a 100x channel (and no outlier split): the search keeps that one float."""
    w1, w2 = rand(16, 8), rand(16, 8)
    x = rand(64, 16)
    x2 = rand(64, 16)
    x2[:, 3] *= 100
    proto = make_model(
        [
            helper.make_node("MatMul", ["a", "w1"], ["y1"], name="/clean/MatMul"),
            helper.make_node("MatMul", ["b", "w2"], ["y2"], name="/spiky/MatMul"),
        ],
        [("a", F, ["n", 16]), ("b", F, ["n", 16])],
        [("y1", F, ["n", 8]), ("y2", F, ["n", 8])],
        {"w1": w1, "w2": w2},
    )
    np.savez(tmp_path / "calib.npz", a=x, b=x2)
    q = Quantize(
        tune="off",
        outliers=0,
        reduce_range=True,
        calib=str(tmp_path / "calib.npz"),
        min_cosine=0.9999,
    )
    model, report = onnxopt.run(ir.serde.deserialize_model(proto), [q])
    assert kept_float(report.passes[0].rows) == ["/spiky"]
    assert sorted(ops(model)) == sorted(
        ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "MatMul"]
    )
    got = run_proto(model, {"a": x[:8], "b": x2[:8]})
    np.testing.assert_allclose(got["y2"], x2[:8] @ w2, rtol=1e-5, atol=1e-5)  # kept float: exact
    cos = (got["y1"] * (x[:8] @ w1)).sum() / np.linalg.norm(got["y1"]) / np.linalg.norm(x[:8] @ w1)
    assert cos >= 0.9999
    assert "kept 1 scopes (/spiky) in float to hold min_cosine=0.9999" in report.passes[0].notes[0]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_models_with_subgraphs(mode, tmp_path):
    """A MatMul inside an If branch: dynamic quantizes it there, static leaves the branch float; neither crashes."""
    w, v = rand(16, 8), rand(16, 8)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="/then/MatMul")],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, ["n", 8])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"], name="/else/Neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", F, ["n", 8])],
    )
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "v"], ["h"], name="/main/MatMul"),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="/main/ReduceSum"),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="/main/Greater"),
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=then_branch,
                else_branch=else_branch,
                name="/main/If",
            ),
        ],
        [("x", F, ["n", 16])],
        [("y", F, ["n", 8])],
        {"w": w, "v": v, "zero": np.float32(0)},
    )
    x = np.abs(rand(32, 16))
    np.savez(tmp_path / "calib.npz", x=np.concatenate([x, -x]))  # calibrated for both branches
    options = {"calib": str(tmp_path / "calib.npz"), "mode": "static"} if mode == "static" else {}
    model, _ = onnxopt.run(
        ir.serde.deserialize_model(proto), [Quantize(tune="off", reduce_range=True, **options)]
    )
    branch = model.graph.node("/main/If").attributes["then_branch"].value
    assert [n.op_type for n in branch] == (
        ["MatMul"]
        if mode == "static"
        else ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]
    )
    for sign in (1, -1):  # a positive sum takes the then branch
        got = run_proto(model, {"x": sign * x[:4]})["y"]
        expected = sign * x[:4] @ w if sign > 0 else -(sign * x[:4] @ v)
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
