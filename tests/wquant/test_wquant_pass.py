"""The wquant pass itself: quant(bits=4) is the same pass, its declared options, bits=8, and what a
run returns (an Outcome: notes, rows in the declared columns, the fidelity budget)."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, cli, make_model, ops
from onnx import TensorProto, helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passbase import Outcome, parse_pass
from onnxopt.passes import Quantize, WeightQuantize
from onnxopt.passes._common import infer_shapes
from onnxopt.passes.wquant.wquant import quantize_int4


def transformer():
    """An embedding table, then q_proj, k_proj and v_proj on it, and a Gemm wquant leaves alone;
    the same weights on every call."""
    rng = np.random.default_rng(1)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    names = ("q_proj", "k_proj", "v_proj")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    nodes += [helper.make_node("MatMul", ["e", f"w_{n}"], [f"y_{n}"], name=n) for n in names]
    nodes.append(helper.make_node("Gemm", ["e2", "wg"], ["g"], name="head"))
    weights = {f"w_{n}": rand(64, 32) for n in names}
    return make_model(
        nodes,
        [("ids", TensorProto.INT64, [2, 5]), ("e2", F, [2, 64])],
        [*((f"y_{n}", F, [2, 5, 32]) for n in names), ("g", F, [2, 8])],
        {"table": rand(20, 64), "wg": rand(64, 8), **weights},
    )


def run(q):
    model = ir.serde.deserialize_model(transformer())
    return model, q(model)


def serialized(model):
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"symmetric": True, "block": 64},
        {"algo": "hqq", "accuracy_level": 4},
        {"format": "qdq", "keep_8bit": ["v_proj"]},
        {"keep_8bit": "embed", "exclude": "q_proj", "min_cosine": 0.5},
        {"op_types": ["MatMul"]},
    ],
)
def test_quant_bits_4_is_wquant(options):
    alias = Quantize(bits=4, **options)
    direct = WeightQuantize(**options)
    assert type(alias) is WeightQuantize and alias.settings() == direct.settings()
    (model_a, a), (model_d, d) = run(alias), run(direct)
    assert serialized(model_a) == serialized(model_d)
    assert (a.modified, a.notes, a.rows, a.fidelity) == (d.modified, d.notes, d.rows, d.fidelity)


def test_the_alias_on_the_command_line():
    alias = parse_pass("quant(bits=4,block=64,keep_8bit=q_proj;k_proj,format=qdq)")
    assert (
        isinstance(alias, WeightQuantize)
        and repr(alias) == "wquant(block=64,format=qdq,keep_8bit=q_proj;k_proj)"
    )
    assert (
        alias.settings()
        == parse_pass("wquant(block=64,format=qdq,keep_8bit=q_proj;k_proj)").settings()
    )
    assert isinstance(parse_pass("quant(bits=8)"), Quantize)
    assert parse_pass("quant(bits=4,op_types=MatMul;Gemm)").op_types == [
        "MatMul"
    ]  # Gemm: int8 only


def test_the_alias_refuses_or_skips_the_int8_options():
    with pytest.raises(
        UsageError, match="pass quant: bits=4 is weight-only: mode=static does not apply"
    ):
        Quantize(bits=4, mode="static", calib="random")
    with pytest.raises(
        UsageError, match="pass quant: smooth moves outliers out of int8 activations"
    ):
        Quantize(bits=4, smooth=0.5, calib="random")
    with pytest.raises(UsageError, match="pass quant: option tune takes one of latency, off"):
        Quantize(bits=4, tune="fast")  # checked as quant checks it, then skipped
    _, result = run(
        Quantize(bits=4, tune="off", reduce_range=True, method="minmax", mode="dynamic")
    )
    assert result.notes[:2] == [
        "tune does not apply to bits=4 (int4 is for size and memory): skipped",
        "reduce_range, method do not apply to bits=4 (weight-only: activations stay float): skipped",
    ]
    _, plain = run(WeightQuantize())
    assert plain.notes == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 8, "block": 64}, "pass wquant: block applies only with bits=4"),
        ({"bits": 8, "keep_8bit": "q_proj"}, "pass wquant: keep_8bit applies only with bits=4"),
        ({"format": "qdq", "accuracy_level": 4}, "accuracy_level applies only with format=ort"),
        ({"block": 48}, "block must be a power of two of at least 16, got 48"),
        ({"keep_8bit": "auto;q_proj"}, "keep_8bit=auto stands alone"),
        ({"keep_8bit": "(q"}, "keep_8bit has a bad regex"),
        ({"exclude": ["(q"]}, "exclude has a bad regex"),
        ({"op_types": "Gemm"}, "option op_types takes one of MatMul, Gather, got 'Gemm'"),
        ({"min_cosine": 0}, r"min_cosine must be in \(0, 1\]"),
    ],
)
def test_declared_and_hand_checks(options, message):
    with pytest.raises(UsageError, match=message):
        WeightQuantize(**options)


def test_a_regex_with_a_bar_stays_one_regex():
    for q in (WeightQuantize(exclude="(q|k)_proj"), parse_pass("wquant(exclude='(q|k)_proj')")):
        assert q.exclude == ["(q|k)_proj"]
        model, result = run(q)
        assert {n.name for n in model.graph if n.op_type == "MatMul"} == {"q_proj", "k_proj"}
        why = {r["layer"]: r["why_float"] for r in result.rows}
        assert why["q_proj"] == why["k_proj"] == "matches exclude=(q|k)_proj"
    model, result = run(Quantize(bits=4, keep_8bit="(v|k)_proj"))
    assert sorted(
        n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"
    ) == [4, 4, 8, 8]  # the Gemm head too


def test_list_options_as_python_lists():
    q = WeightQuantize(keep_8bit=["q_proj", "embed"], exclude=["k_proj"], op_types=["MatMul"])
    model, result = run(q)
    assert ops(model).count("MatMul") == 1 and "GatherBlockQuantized" not in ops(model)
    assert result.notes == ["kept 1 nodes (q_proj) at 8 bits (keep_8bit)"]  # embed: not a target
    assert repr(q) == "wquant(keep_8bit=q_proj;embed,exclude=k_proj,op_types=MatMul)"


def test_a_run_returns_notes_rows_and_budget_and_leaves_the_pass_as_it_was():
    q = WeightQuantize(keep_8bit=["v_proj"])
    before = dict(vars(q))
    model, result = run(q)
    assert vars(q) == before
    assert isinstance(result, Outcome) and result.modified and result.fidelity == 0.8
    rows = {r["layer"]: r for r in result.rows}
    assert (rows["embed"]["weight"], rows["embed"]["block"], rows["embed"]["output"]) == (
        "uint4",
        32,
        "e",
    )
    assert (rows["v_proj"]["weight"], rows["v_proj"]["bits"]) == ("int8", 8)
    assert (rows["head"]["op"], rows["head"]["weight"]) == ("MatMul", "uint4")  # a Gemm before
    assert {c.header for c in WeightQuantize.columns} >= {"block", "weight MSE", "weight scale"}
    assert result.notes == ["kept 1 nodes (v_proj) at 8 bits (keep_8bit)"]
    assert run(WeightQuantize(min_cosine=0.9))[1].fidelity == 0.9
    assert run(Quantize())[1].fidelity == 0.99


def test_quantize_int4_returns_what_it_did():
    model = ir.serde.deserialize_model(transformer())
    infer_shapes(model)  # as the pass does first: MatMuls need inputs known to be float
    done = quantize_int4(model, WeightQuantize(keep_8bit=["k_proj"]))
    assert done.modified and done.kept_8bit == ["k_proj"]
    assert set(done.layers) == {"e", "y_q_proj", "y_k_proj", "y_v_proj", "g"}
    assert done.layers["y_k_proj"]["bits"] == 8 and done.layers["e"]["layer"] == "embed"


def test_bits_8_keeps_every_layer_at_8_bits():
    model, result = run(WeightQuantize(bits=8))
    assert [n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"] == [
        8,
        8,
        8,
        8,
    ]
    assert ops(model)[:3] == ["Gather", "Cast", "Mul"]  # an int8 table, one scale per dim
    assert result.fidelity == 0.99 and result.notes == []
    assert {r["weight"] for r in result.rows if r["op"] != "Gemm"} == {"int8"}
    out = onnxopt.optimize(transformer_model(), [WeightQuantize(bits=8)])[1]
    assert all(r.passed for r in out.check)


def transformer_model():
    return ir.serde.deserialize_model(transformer())


def test_passes_lists_the_weight_only_options(capsys):
    assert cli("passes", "wquant") == 0
    out = capsys.readouterr().out
    for line in (
        "bits: int = 4  one of 4|8",
        "block: int = 32  in [16, inf]  only with bits=4",
        "format: str = 'ort'  one of ort|qdq",
        "keep_8bit: list of str (separated by ;) = ['auto']",
        "accuracy_level: str = 'auto'  one of auto|0|1|2|3|4  only with format=ort",
    ):
        assert line in out
    assert "mode:" not in out and "tune:" not in out
