"""accuracy_level=auto: MatMulNBits' level timed on this CPU, 0 or 4, whichever runs faster."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import make_model, run_proto
from onnx import TensorProto, helper

from onnxopt.passes import Quantize
from onnxopt.passes.wquant import level

F = TensorProto.FLOAT
pytestmark = pytest.mark.auto_level


def decoder_like(cache: bool = True):
    """ids [batch, sequence] → embedding → two MatMuls, and (a decoder) a cache input the output is
    appended to: past [batch, past_sequence, 64] → present."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="up"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
    ]
    inputs = [("ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [("y", F, ["batch", "sequence", 64])]
    if cache:
        nodes.append(helper.make_node("Concat", ["past", "y"], ["present"], axis=1))
        inputs.append(("past", F, ["batch", "past_sequence", 64]))
        outputs.append(("present", F, ["batch", "total", 64]))
    return make_model(
        nodes,
        inputs,
        outputs,
        {
            "table": rng.standard_normal((100, 64)).astype(np.float32),
            "w1": rng.standard_normal((64, 128)).astype(np.float32),
            "w2": rng.standard_normal((128, 64)).astype(np.float32),
        },
    )


def levels(model):
    return [
        n.attributes.get_int("accuracy_level", 0) for n in model.graph if n.op_type == "MatMulNBits"
    ]


@pytest.mark.parametrize("int8_time, chosen", [(0.5, 4), (0.95, 0), (1.5, 0)])  # 0.95: noise
def test_auto_keeps_the_faster_level(monkeypatch, int8_time, chosen):
    timed = []

    def fake(models, feeds, iters):
        timed.append(feeds["ids"].shape)
        assert levels(models[0]) == [0, 0] and levels(models[1]) == [4, 4]
        return [1.0, int8_time]

    monkeypatch.setattr(level, "latencies", fake)
    model = ir.serde.deserialize_model(decoder_like())
    result = Quantize(bits=4)(model)
    assert levels(model) == [chosen, chosen]
    assert timed == [(1, 1), (1, level.SEQUENCE)]  # one row (a decode step), then 128
    assert f"accuracy_level=auto chose {chosen}" in " ".join(result.notes)


def test_a_model_without_a_cache_is_timed_on_whole_sequences(monkeypatch):
    """An encoder runs whole sequences, never one row: one row's verdict (MiniLM: 0.30x at level 4)
    would mislead it (0.84x fp32's speed at batch 32 at level 4, 0.95x at 0)."""
    timed = []

    def fake(models, feeds, iters):
        timed.append(feeds["ids"].shape)
        return [1.0, 1.1]

    monkeypatch.setattr(level, "latencies", fake)
    model = ir.serde.deserialize_model(decoder_like(cache=False))
    Quantize(bits=4)(model)
    assert timed == [(1, level.SEQUENCE)] and levels(model) == [0, 0]


def test_a_given_level_is_not_timed(monkeypatch):
    monkeypatch.setattr(level, "latencies", lambda *a, **k: pytest.fail("timed"))
    model = ir.serde.deserialize_model(decoder_like())
    Quantize(bits=4, accuracy_level=4)(model)
    assert levels(model) == [4, 4]


def test_auto_times_for_real_and_the_outputs_hold():
    proto = decoder_like()
    model = ir.serde.deserialize_model(proto)
    result = Quantize(bits=4)(model)
    assert len(set(levels(model))) == 1 and levels(model)[0] in (0, 4)
    feeds = {"ids": np.array([[1, 5, 99]], np.int64), "past": np.zeros((1, 0, 64), np.float32)}
    ref = run_proto(proto, feeds)["y"]
    got = run_proto(ir.serde.serialize_model(model), feeds)["y"]
    cos = np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > 0.98, result.notes


def test_a_model_that_cannot_be_timed_keeps_level_0_with_a_note(monkeypatch):
    def fail(models, feeds, iters):
        raise RuntimeError("no session")

    monkeypatch.setattr(level, "latencies", fail)
    model = ir.serde.deserialize_model(decoder_like())
    result = Quantize(bits=4)(model)
    assert levels(model) == [0, 0]
    assert "accuracy_level=auto kept 0: the model could not be timed (no session)" in result.notes
