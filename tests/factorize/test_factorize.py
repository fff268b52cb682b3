"""factorize: layers found and rewritten as two factors (exact at full rank), ranks placed under a
budget or a ratio, refusals, both faces and the run's check."""

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model, run_proto
from onnx import TensorProto, helper

import onnxopt
from onnxopt import compare
from onnxopt.errors import UsageError
from onnxopt.passes import Factorize
from onnxopt.passes.factorize import lowrank
from onnxopt.passes.factorize.layers import KINDS, find

K, H, SEQ = 32, 128, 6


def low_rank(rng, k, n, rank, noise=0.05):
    return (
        rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(k * rank)
        + noise * rng.standard_normal((k, n)) / np.sqrt(k)
    ).astype(np.float32)


def mlp_model(seed=0, layers=2):
    """x [batch, SEQ, K] through ``layers`` residual blocks: MatMul [K, H] + b, Relu, MatMul [H, K]."""
    rng = np.random.default_rng(seed)
    init, nodes, x = {}, [], "x"
    for i in range(layers):
        init[f"w1_{i}"] = low_rank(rng, K, H, 12)
        init[f"b1_{i}"] = (0.1 * rng.standard_normal(H)).astype(np.float32)
        init[f"w2_{i}"] = low_rank(rng, H, K, 12)
        nodes += [
            helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"], name=f"up{i}"),
            helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"]),
            helper.make_node("Relu", [f"hb{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"d{i}"], name=f"down{i}"),
            helper.make_node("Add", [x, f"d{i}"], [f"y{i}"]),
        ]
        x = f"y{i}"
    nodes[-1].output[0] = "out"
    return make_model(nodes, [("x", F, ["batch", SEQ, K])], [("out", F, ["batch", SEQ, K])], init)


MIX = np.random.default_rng(100).standard_normal((K, K)) * np.logspace(0, -1.5, K)[:, None]


def samples(n, seed):
    """Correlated inputs, every seed from the same distribution."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, SEQ, K)) @ MIX).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("factorize") / "calib.npz"
    np.savez(path, x=samples(128, 1))
    return str(path)


def factorize(proto, **options):
    model = ir.serde.deserialize_model(proto)
    options.setdefault("multiple", 4)
    options.setdefault("latency", False)
    return model, Factorize(**options)(model)


def cosine(proto, model, x):
    ref = run_proto(proto, {"x": x})["out"].reshape(len(x), -1)
    got = run_proto(model, {"x": x})["out"].reshape(len(x), -1)
    return float(
        np.min(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))
    )


def exact_rewrite(proto, feeds, kind):
    """Every layer of ``kind`` rewritten with its full-rank factors: the same outputs."""
    model = ir.serde.deserialize_model(proto)
    layers = find(model.graph, KINDS)
    assert layers and {layer.kind for layer in layers} == {kind}
    for layer in layers:
        b = lowrank.basis(layer.weight, "plain")
        layer.rewrite(*b.factors(min(layer.weight.shape)))
    expected, got = run_proto(proto, feeds), run_proto(model, feeds)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=1e-4)
    return model


def test_matmul_full_rank_is_exact():
    model = exact_rewrite(mlp_model(), {"x": samples(3, 5)}, "matmul")
    assert sum(n.op_type == "MatMul" for n in model.graph) == 8


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_full_rank_is_exact(trans_b):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24) if not trans_b else (24, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["out"], alpha=0.5, beta=2.0, transB=trans_b)
    ]
    proto = make_model(
        nodes,
        [("x", F, ["n", 16])],
        [("out", F, ["n", 24])],
        {"w": w, "c": rng.standard_normal(24).astype(np.float32)},
    )
    exact_rewrite(proto, {"x": rng.standard_normal((5, 16)).astype(np.float32)}, "gemm")


def test_conv1x1_full_rank_is_exact():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["out"], strides=[2, 2])]
    proto = make_model(
        nodes,
        [("x", F, [1, 16, 8, 8])],
        [("out", F, [1, 24, 4, 4])],
        {
            "w": rng.standard_normal((24, 16, 1, 1)).astype(np.float32),
            "b": rng.standard_normal(24).astype(np.float32),
        },
    )
    exact_rewrite(proto, {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}, "conv1x1")


def embedding_model(vocab=300, dim=24):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["out"])]
    return make_model(
        nodes,
        [("ids", TensorProto.INT64, ["b", "s"])],
        [("out", F, ["b", "s", dim])],
        {"table": rng.standard_normal((vocab, dim)).astype(np.float32)},
    )


def test_embedding_full_rank_is_exact():
    ids = np.random.default_rng(1).integers(0, 300, (2, 7))
    model = exact_rewrite(embedding_model(), {"ids": ids}, "embedding")
    assert [n.op_type for n in model.graph] == ["Gather", "MatMul"]


def test_embedding_rows_weighted_by_token_counts(tmp_path):
    """The tokens of the calibration data come through the truncation best."""
    rng = np.random.default_rng(2)
    seen = rng.integers(0, 10, (64, 8))
    path = tmp_path / "ids.npz"
    np.savez(path, ids=seen)
    proto = embedding_model()
    model, result = factorize(
        proto, calib=str(path), ratio=0.4, embeddings=True, refit=False, allocate="local"
    )
    assert result.modified and result.rows[0]["kind"] == "embedding"
    table = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    got = run_proto(model, {"ids": np.arange(300)[None]})["out"][0]
    row_error = np.sum(np.square(got - table), 1) / np.sum(np.square(table), 1)
    assert row_error[:10].max() < 1e-3 < row_error[10:].mean()


def test_factorize_keeps_the_interface_and_saves_parameters(calib):
    proto = mlp_model()
    model, result = factorize(proto, calib=calib, ratio=0.3)
    assert result.modified
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [(v.name, v.shape.dims[-1]) for v in model.graph.outputs] == [("out", K)]
    before = sum(r["params_before"] for r in result.rows)
    after = sum(r["params_after"] for r in result.rows)
    total = 4 * K * H
    assert (before - after) >= 0.3 * total * 0.9
    assert all(r["rank"] < lowrank.break_even(K, H) for r in result.rows)
    assert all(r["macs_after"] == r["rank"] * (K + H) < r["macs_before"] for r in result.rows)
    out = run_proto(model, {"x": samples(4, 9)})["out"]
    assert out.shape == (4, SEQ, K)
    assert cosine(proto, model, samples(16, 7)) > 0.99


def test_budget_is_respected_on_the_calibration_data(calib):
    proto = mlp_model()
    model, result = factorize(proto, calib=calib, min_cosine=0.999)
    assert result.modified
    data = np.load(calib)["x"]
    held = compare.compare_models(
        proto.SerializeToString(),
        ir.serde.serialize_model(model).SerializeToString(),
        [{"x": data}],
    )
    assert held[0].cosine >= 0.999
    assert result.fidelity == 0.999
    assert any(n.startswith("budget: min_cosine 0.999") for n in result.notes)


def test_an_unreachable_budget_returns_the_model_unchanged(calib):
    proto = mlp_model()
    _, result = factorize(proto, calib=calib, min_cosine=1.0)
    assert not result.modified
    assert result.notes[0].startswith("nothing factorized: no layer's rank pays within the budget")


def test_whitening_beats_plain_svd_on_correlated_inputs(calib):
    proto = mlp_model()
    x = samples(32, 11)
    errors = {}
    for method in ("plain", "asvd", "whiten"):
        model, _ = factorize(proto, calib=calib, ratio=0.3, method=method, exclude=["down.*"])
        errors[method] = 1 - cosine(proto, model, x)
    assert errors["whiten"] < min(errors["asvd"], errors["plain"])


def test_the_refit_lowers_the_error(calib):
    proto = mlp_model(layers=3)
    x = samples(32, 11)
    errors = {}
    for refit in (False, True):
        model, _ = factorize(proto, calib=calib, ratio=0.5, refit=refit, ridge=1e-3)
        errors[refit] = 1 - cosine(proto, model, x)
    assert errors[True] < errors[False]


def test_data_free_warns_and_needs_a_ratio():
    proto = mlp_model()
    with pytest.raises(UsageError, match="needs calib=PATH .* or ratio=F"):
        Factorize()
    with pytest.raises(UsageError, match="method=whiten needs calib"):
        Factorize(ratio=0.2, method="whiten")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, result = factorize(proto, ratio=0.3)
    assert result.modified and any("data-free" in str(w.message) for w in caught)
    assert any(n.startswith("WARNING: factorize without calib") for n in result.notes)


def test_latency_keeps_only_faster_ranks(calib):
    """Tiny products are not faster in two factors: nothing changes, and the note says so."""
    proto = mlp_model()
    model, result = factorize(proto, calib=calib, ratio=0.3, latency=True)
    timed = [n for n in result.notes if n.startswith("latency")]
    assert timed
    for row in result.rows:
        assert row["time"] <= 0.97


def test_exclude_and_small_weights(calib):
    proto = mlp_model()
    _, result = factorize(proto, calib=calib, ratio=0.3, exclude=["up.*"])
    assert all(not r["layer"].startswith("up") for r in result.rows)
    assert "excluded: up0" in result.notes


def test_both_faces_pass_the_check(tmp_path, calib):
    path, held_out = tmp_path / "mlp.onnx", tmp_path / "held_out.npz"
    onnx.save(mlp_model(), str(path))
    np.savez(held_out, x=samples(8, 42))
    model, report = onnxopt.optimize(
        str(path), [Factorize(ratio=0.3, calib=calib, multiple=4, latency=False)], inputs=held_out
    )
    model2, report2 = onnxopt.optimize(
        str(path), [f"factorize(ratio=0.3,calib={calib},multiple=4,latency=false)"], inputs=held_out
    )
    names = sorted(n.op_type for n in model.graph)
    assert names == sorted(n.op_type for n in model2.graph) and names.count("MatMul") > 4
    assert str(report) and str(report2)


@pytest.mark.parametrize("after", ["quant(tune=off)", "quant(bits=4)"])
def test_composes_with_quantization(tmp_path, calib, after):
    """The factors are ordinary constant MatMul weights: quant and wquant take them like any."""
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    first = f"factorize(ratio=0.3,calib={calib},multiple=4,latency=false)"
    model, _ = onnxopt.optimize(str(path), [first, after], check=False)
    quantized = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"}
    kinds = [n.op_type for n in model.graph]
    assert sum(k in quantized for k in kinds) > 4, kinds


def test_the_intermediate_is_level_for_int8(calib):
    """Each channel of x·A carries the same energy on the calibration rows, so that a later
    dynamic int8 pass (one scale per tensor) does not drown the small singular directions."""
    model, outcome = factorize(mlp_model(), ratio=0.3, calib=calib)
    assert outcome.modified
    first = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[0].name == "x")
    a = first.inputs[1].const_value.numpy()
    assert a.shape[1] < K
    rows = np.load(calib)["x"].reshape(-1, K).astype(np.float64)
    energy = np.sum(np.square(rows @ a), axis=0)
    np.testing.assert_allclose(energy, np.median(energy), rtol=0.05)


def test_slim_then_factorize(tmp_path, calib):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    passes = [
        f"slim(ratio=0.25,heads=0,calib={calib})",
        f"factorize(ratio=0.3,calib={calib},multiple=4,latency=false)",
    ]
    model, report = onnxopt.optimize(str(path), passes, inputs=None, check=True)
    records = report.run.passes
    assert [r.modified for r in records] == [True, True]
    assert sum(n.op_type == "MatMul" for n in model.graph) > 4
