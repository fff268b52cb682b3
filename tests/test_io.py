"""Model I/O: atomic saving, external data, and refusing to overwrite the input."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model, run_proto
from onnx import helper

from onnxopt import compare, io
from onnxopt.errors import UsageError


def weighted_model() -> onnx.ModelProto:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [("x", F, [1, 64])], [("y", F, [1, 64])], {"w": w})


def test_external_data_round_trip(tmp_path):
    model = ir.serde.deserialize_model(weighted_model())
    out = io.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 64 * 4
    loaded = io.load(out)
    assert io.file_size(out) == out.stat().st_size + 64 * 64 * 4
    assert isinstance(
        loaded.graph.initializers["w"].const_value, ir.ExternalTensor
    )  # memory-mapped, lazy
    x = {"x": np.ones((1, 64), np.float32)}
    expected = run_proto(weighted_model(), x)["y"]
    np.testing.assert_array_equal(compare.run_model(out, x)["y"], expected)
    # A model that came with external data is written with external data again, wherever it goes.
    (tmp_path / "copy").mkdir()
    again = io.save(loaded, tmp_path / "copy" / "n.onnx")
    assert (tmp_path / "copy" / "n.onnx.data").is_file()
    np.testing.assert_array_equal(compare.run_model(again, x)["y"], expected)


def test_inline_by_default_for_small_models(tmp_path):
    io.save(ir.serde.deserialize_model(weighted_model()), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_staged_save_leaves_nothing(tmp_path):
    model = ir.serde.deserialize_model(weighted_model())
    with pytest.raises(RuntimeError):
        with io.staged_save(model, tmp_path / "m.onnx") as staged:
            assert staged.is_file() and staged.parent != tmp_path
            raise RuntimeError("check failed")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_input_or_its_data(tmp_path):
    model = ir.serde.deserialize_model(weighted_model())
    src = io.save(model, tmp_path / "m.onnx", external_data=True)
    with pytest.raises(UsageError, match="refusing to write over"):
        io.check_output_path(tmp_path / "m.onnx", src)
    with pytest.raises(UsageError, match="refusing to write over"):
        io.check_output_path(tmp_path / "." / "m.onnx", src)
    with pytest.raises(UsageError, match="does not exist"):
        io.check_output_path(tmp_path / "nowhere" / "out.onnx", src)
    io.check_output_path(tmp_path / "out.onnx", src)


def test_short_external_data_is_reported(tmp_path):
    src = io.save(
        ir.serde.deserialize_model(weighted_model()), tmp_path / "m.onnx", external_data=True
    )
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UsageError, match="too short"):
        io.load(src)
