"""A tiny decoder (grouped-query attention, rotary embedding, head tied to the embedding table
through a Transpose) quantized to 4 bits in both formats: the logits are those of the same graph
run on numpy's dequantized weights, the attention graph is left as it was, and calibration runs the
model once per batch however deep it is."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import ops, run_proto
from tiny_decoder import SEQ, VOCAB, decoder, weights

from onnxopt.passes import Quantize
from onnxopt.passes.wquant.algos import rtn

BLOCK = 32
IDS = np.array([[5, 17, 0, 95, 42, 42]], np.int64)
UNTOUCHED = ("Expand", "Softmax", "Neg", "Sigmoid", "ReduceMean")  # GQA, rotary, norms, MLP gate


def dequantized(arrays: dict) -> dict:
    """Every weight as its symmetric 4-bit blocks stand for it; the table blocked along its rows
    (as the table's transpose, which is the head's weight: one set of blocks for both)."""
    out = {k: rtn(v, BLOCK, True).dequantize() for k, v in arrays.items() if k != "table"}
    out["table"] = rtn(arrays["table"].T, BLOCK, True).dequantize().T
    return out


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_a_tiny_gqa_decoder_matches_numpy_dequantization(fmt):
    arrays = weights(layers=2)
    proto = decoder(weights=arrays)
    model = ir.serde.deserialize_model(proto)
    result = Quantize(bits=4, symmetric=True, format=fmt)(model)
    assert result.modified
    before, after = ops(ir.serde.deserialize_model(proto)), ops(model)
    # qdq's symmetric table lookup expands its zero point (one Expand of its own)
    added = {"Expand": 1} if fmt == "qdq" else {}
    assert [after.count(op) for op in UNTOUCHED] == [
        before.count(op) + added.get(op, 0) for op in UNTOUCHED
    ]
    assert after.count("MatMul") == before.count("MatMul") - (15 if fmt == "ort" else 0)
    assert "lm_head" in {r["layer"] for r in result.rows} and "embed" in {
        r["layer"] for r in result.rows
    }
    got = run_proto(model, {"input_ids": IDS})["logits"]
    want = run_proto(decoder(weights=dequantized(arrays)), {"input_ids": IDS})["logits"]
    assert got.shape == (1, SEQ, VOCAB)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    floats = [
        v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
    ]
    assert all(v.const_value.size < arrays["table"].size for v in floats)  # no float table left


def test_calibration_runs_the_model_once_per_batch_whatever_the_depth(tmp_path, monkeypatch):
    """GPTQ's statistics and keep_8bit=auto's ranking come from one run over the calibration data:
    the number of onnxruntime runs does not grow with the layers (it did: one run per layer)."""
    runs = []
    real = ort.InferenceSession.run

    def counted(self, *args, **kwargs):
        runs[-1] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, VOCAB, (8, SEQ)).astype(np.int64))
    for layers in (1, 4):
        model = ir.serde.deserialize_model(decoder(layers=layers))
        runs.append(0)
        result = Quantize(bits=4, calib=str(tmp_path / "calib.npz"))(model)
        assert result.modified and any(r["layer"] == "l0.q_proj" for r in result.rows)
    assert runs[0] == runs[1] > 0, runs


@pytest.mark.parametrize("bias", [False, True])
def test_a_gemm_head_with_trans_b_shares_the_table(bias):
    """Gemm(h, table, transB=1) (a head exported as a Linear on 2-D rows) becomes a 4-bit MatMul,
    plus its bias, and its table's lookup reads the same packed blocks."""
    from helpers import F, make_model
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    c = rng.standard_normal(40).astype(np.float32)
    inputs = ["h", "table"] + (["c"] if bias else [])
    proto = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
            helper.make_node("Gemm", inputs, ["logits"], name="head", transB=1),
        ],
        [("ids", TensorProto.INT64, [3])],
        [("logits", F, [3, 40])],
        {"table": table, **({"c": c} if bias else {})},
    )
    model = ir.serde.deserialize_model(proto)
    Quantize(bits=4, symmetric=True)(model)
    assert "Gemm" not in ops(model) and {"MatMulNBits", "GatherBlockQuantized"} <= set(ops(model))
    packed = [
        v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8
    ]
    assert len(packed) == 1
    ids = np.array([0, 7, 39], np.int64)
    w = rtn(table.T, BLOCK, True).dequantize()  # [64, 40]
    want = w.T[ids] @ w + (c if bias else 0)
    np.testing.assert_allclose(run_proto(model, {"ids": ids})["logits"], want, rtol=1e-4, atol=1e-4)
