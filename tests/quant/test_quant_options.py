"""quant's declared options: choices, ranges, options that apply only in one mode, list options (a
Python list, or items separated by ';' on the command line; a regex keeps its '|'), and what a run
returns (an Outcome) instead of keeping it on the pass."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, cli, make_model, ops
from onnx import helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passbase import Outcome, parse_pass
from onnxopt.passes import Quantize

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def projections():
    """Three MatMuls named q_proj, k_proj and v_proj reading one input."""
    names = ("q_proj", "k_proj", "v_proj")
    nodes = [helper.make_node("MatMul", ["x", f"w_{n}"], [f"y_{n}"], name=n) for n in names]
    return make_model(
        nodes,
        [("x", F, [2, 16])],
        [(f"y_{n}", F, [2, 8]) for n in names],
        {f"w_{n}": rand(16, 8) for n in names},
    )


def quantized(model: ir.Model) -> set[str]:
    """The names of the MatMuls that became int8 (MatMulInteger named after them)."""
    return {n.name.removesuffix(".int8") for n in model.graph if n.op_type == "MatMulInteger"}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "minmax"}, "pass quant: method applies only with mode=static"),
        ({"activation_type": "int8"}, "pass quant: activation_type applies only with mode=static"),
        ({"symmetric_activations": True}, "symmetric_activations applies only with mode=static"),
        ({"percentile": 99.0}, "pass quant: percentile applies only with mode=static"),
        ({"bias_correction": True}, "pass quant: bias_correction applies only with mode=static"),
    ],
)
def test_static_only_options_are_refused_in_dynamic_mode(options, message):
    with pytest.raises(UsageError, match=message):
        Quantize(tune="off", **options)
    with pytest.raises(UsageError, match=message):  # the same declaration checks the command line
        parse_pass("quant(" + ",".join(f"{k}={str(v).lower()}" for k, v in options.items()) + ")")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"outliers": 2.0}, "pass quant: outliers applies only with mode=dynamic"),
        ({"max_outliers": 2}, "pass quant: max_outliers applies only with mode=dynamic"),
        ({"op_types": ["MatMul"]}, "pass quant: op_types applies only with mode=dynamic"),
        (
            {"method": "minmax", "percentile": 99.0},
            "percentile applies only with .*method=percentile",
        ),
    ],
)
def test_dynamic_only_options_are_refused_in_static_mode(options, message):
    with pytest.raises(UsageError, match=message):
        Quantize(tune="off", mode="static", calib="random", **options)


def test_declared_ranges_and_the_checks_left_by_hand():
    with pytest.raises(UsageError, match=r"option percentile must be within \[50, 100\]"):
        Quantize(mode="static", calib="random", method="percentile", percentile=101)
    with pytest.raises(UsageError, match=r"percentile must be in \(50, 100\], got 50"):
        Quantize(mode="static", calib="random", method="percentile", percentile=50)
    with pytest.raises(UsageError, match=r"min_cosine must be in \(0, 1\], got 0"):
        Quantize(min_cosine=0)
    with pytest.raises(UsageError, match="option activation_type takes one of uint8, int8"):
        Quantize(mode="static", calib="random", activation_type="int4")
    with pytest.raises(UsageError, match="block apply to bits=4 only"):
        parse_pass("quant(bits=8,block=64)")
    with pytest.raises(UsageError, match="unknown option 'blocks'"):
        Quantize(blocks=64)


def test_a_regex_with_a_bar_stays_one_regex():
    """'|' is regex syntax, not a separator: (q|k)_proj keeps q_proj and k_proj float."""
    for q in (
        Quantize(tune="off", exclude="(q|k)_proj"),
        parse_pass("quant(tune=off,exclude='(q|k)_proj')"),
    ):
        assert q.exclude == ["(q|k)_proj"]
        model, _ = onnxopt.run(ir.serde.deserialize_model(projections()), [q])
        assert quantized(model) == {"v_proj"}
        assert ops(model).count("MatMul") == 2


def test_list_options_as_python_lists_and_on_the_command_line():
    listed = Quantize(tune="off", exclude=["q_proj", "k_.*"], op_types=["MatMul", "Gemm"])
    parsed = parse_pass("quant(tune=off,exclude=q_proj;k_.*,op_types=MatMul;Gemm)")
    for q in (listed, parsed):
        assert (q.exclude, q.op_types) == (["q_proj", "k_.*"], ["MatMul", "Gemm"])
        model, _ = onnxopt.run(ir.serde.deserialize_model(projections()), [q])
        assert quantized(model) == {"v_proj"}
    assert repr(parsed) == "quant(op_types=MatMul;Gemm,exclude=q_proj;k_.*,tune=off)"
    assert Quantize().op_types == ["MatMul", "Gemm", "Gather"]
    with pytest.raises(UsageError, match="option op_types takes one of .* got 'Conv'"):
        Quantize(op_types=["MatMul", "Conv"])


def test_a_run_returns_its_findings_and_leaves_the_pass_as_it_was():
    q = Quantize(tune="off", exclude=["q_proj"], min_cosine=0.95)
    before = dict(vars(q))
    result = q(ir.serde.deserialize_model(projections()))
    assert isinstance(result, Outcome) and result.modified and result.fidelity == 0.95
    assert vars(q) == before
    rows = {r["layer"]: r for r in result.rows}
    assert set(rows) == {"q_proj", "k_proj", "v_proj"}
    assert rows["q_proj"]["why_float"] == "matches exclude=q_proj"
    assert rows["k_proj"]["weight"] == "int8" and rows["k_proj"]["output"] == "y_k_proj"
    assert {c.key for c in Quantize.columns} <= set(rows["k_proj"])
    idle = Quantize(tune="off", op_types=["Gather"])(ir.serde.deserialize_model(projections()))
    assert not idle.modified and idle.notes[0].startswith("nothing to quantize: no Gather")


def test_passes_lists_each_pass_options(capsys):
    assert cli("passes", "quant") == 0
    out = capsys.readouterr().out
    assert "mode: str = 'dynamic'  one of dynamic|static" in out
    assert "method: str = 'minmax'  one of minmax|percentile|entropy  only with mode=static" in out
    assert "op_types: list of str (separated by ;)" in out and "bits: int = 8" in out
    assert "block:" not in out and "keep_8bit" not in out
