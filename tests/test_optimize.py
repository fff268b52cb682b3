"""``onnxopt.optimize``: the Python face of ``onnxopt run``, check, gate and atomic save included."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model
from onnx import helper

import onnxopt
from onnxopt.passbase import OptPass, Outcome, run_context


def linear(path=None):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    proto = make_model(nodes, [("x", F, ["batch", 4])], [("y", F, ["batch", 3])], {"w": w})
    if path is not None:
        onnx.save(proto, str(path))
    return proto


class ScaleWeight(OptPass):
    """Claims to be exact but scales every initializer: the check must refuse it."""

    name = "test-scale-weight"

    def call(self, model):
        for value in model.graph.initializers.values():
            value.const_value = ir.tensor(value.const_value.numpy() * 1.01)
        return Outcome(model, True)


def test_an_exact_pass_that_changes_outputs_raises_and_writes_nothing(tmp_path):
    path = linear(tmp_path / "m.onnx") and tmp_path / "m.onnx"
    before = path.read_bytes()
    with pytest.raises(onnxopt.CheckFailed, match="meant to be exact: outputs differ") as failure:
        onnxopt.optimize(path, [ScaleWeight()], output=tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert path.read_bytes() == before
    assert failure.value.report.check and not failure.value.report.check[0].passed


def test_optimize_checks_writes_and_reports(tmp_path):
    path = tmp_path / "m.onnx"
    linear(path)
    model, report = onnxopt.optimize(path, ["fold", "prune"], output=tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").is_file() and report.output == str(tmp_path / "out.onnx")
    assert [r.name for r in report.records] == ["fold", "prune"]
    assert report.check and all(r.passed and r.max_abs == 0 for r in report.check)
    assert report.notices and "batch set to 1" in report.notices[0]
    assert isinstance(model, ir.Model)


def test_an_in_memory_model_is_left_untouched_and_shapes_reach_the_passes():
    proto = linear()
    original = ir.serde.deserialize_model(proto)
    seen = []

    class Spy(OptPass):
        name = "test-spy"

        def call(self, model):
            seen.append(dict(run_context().shapes))
            return Outcome(model, False, notes=["looked"])

    model, report = onnxopt.optimize(original, [Spy()], shapes={"x": [2, 4]})
    assert seen == [{"x": [2, 4]}] and report.records[0].notes == ["looked"]
    assert report.check[0].samples == 2 and report.output is None
    assert run_context().shapes == {}  # the context ends with the run
    assert model is not original


def test_a_bad_input_raises_usage_error(tmp_path):
    with pytest.raises(onnxopt.UsageError):
        onnxopt.optimize(tmp_path / "missing.onnx")
    path = tmp_path / "m.onnx"
    linear(path)
    with pytest.raises(onnxopt.UsageError, match="unknown pass"):
        onnxopt.optimize(path, ["nope"])
