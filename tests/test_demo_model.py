"""The committed demo model: small, valid, runnable, and in sync with its build script."""

from __future__ import annotations

from importlib import resources

import numpy as np
import onnx
import pytest

DEMO = resources.files("onnxopt.zoo").joinpath("demo.onnx")


def _model() -> onnx.ModelProto:
    return onnx.load_from_string(DEMO.read_bytes())


def test_exists_and_small():
    assert DEMO.is_file()
    assert len(DEMO.read_bytes()) < 1_000_000


def test_checker():
    model = _model()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import}[""] == 17


def test_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the unused initializer is deliberate; hide ORT's warning
    session = ort.InferenceSession(DEMO.read_bytes(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (2, 10)
    assert np.isfinite(y).all()


def test_contains_the_planted_clutter():
    ops = [n.op_type for n in _model().graph.node]
    for op in (
        "Constant",
        "Identity",
        "Dropout",
        "Cast",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Concat",
        "Reshape",
    ):
        assert op in ops, op
    assert ops.count("Transpose") >= 3


def test_matches_build_script():
    from onnxopt.zoo.build_demo import build

    assert build().SerializeToString() == DEMO.read_bytes(), "run: python models/build_demo.py"
