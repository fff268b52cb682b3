"""Inputs for validate, bench and check: generated with shapes and ranges, or read from .npz files."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model
from onnx import TensorProto, helper

from onnxopt.errors import UsageError
from onnxopt.inputs import InputSpec, generate, parse_ranges


@pytest.fixture
def model():
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=F),
        helper.make_node("Add", ["x", "ids_f"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [("x", F, ["batch", 4]), ("ids", TensorProto.INT64, ["batch", 4])],
        [("y", F, ["batch", 4])],
    )
    return ir.serde.deserialize_model(proto)


def batches(spec, model):
    notices = []
    return list(spec.batches(model, notices)), notices


def test_generated_inputs_are_seeded_and_ranged(model):
    a, notes = generate(model, ranges={"x": (-3, -2), "ids": (5, 7)}, seed=1)
    b, _ = generate(model, ranges={"x": (-3, -2), "ids": (5, 7)}, seed=1)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["x"].shape == (1, 4) and a["x"].dtype == np.float32
    assert np.all((a["x"] >= -3) & (a["x"] < -2))
    assert set(np.unique(a["ids"])) <= {5, 6, 7} and a["ids"].dtype == np.int64
    assert notes == [
        "input x: batch set to 1 (shape [1, 4]); choose with --shape x=...",
        "input ids: batch set to 1 (shape [1, 4]); choose with --shape ids=...",
    ]
    spec = InputSpec(ranges=parse_ranges(["0,0"]), batch=3, samples=2)
    feeds, notices = batches(spec, model)
    assert len(feeds) == 2 and feeds[0]["x"].shape == (3, 4) and not notices
    assert np.all(feeds[1]["x"] == 0) and np.all(feeds[1]["ids"] == 0)


@pytest.mark.parametrize(
    "spec, message", [("x=1", "bad --range"), ("x=3,1", "LO <= HI"), ("=1,2", "bad --range")]
)
def test_bad_ranges(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_ranges([spec])


def test_npz_rows_of_the_batch_axis_in_batches_with_a_limit(model, tmp_path):
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    ids = np.arange(10 * 4, dtype=np.int32).reshape(
        10, 4
    )  # int32 values fit int64: cast, with a notice
    np.savez(tmp_path / "d.npz", x=x, ids=ids, names=np.array(["ignored"]))
    spec = InputSpec(data=tmp_path / "d.npz", batch=4)
    feeds, notices = batches(spec, model)
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert feeds[0]["ids"].dtype == np.int64 and notices == [
        "ids: int32 values in d.npz cast to int64"
    ]
    assert spec.count(model) == 10
    limited = InputSpec(data=tmp_path / "d.npz", batch=4, samples=5)
    feeds, _ = batches(limited, model)
    assert [f["x"].shape[0] for f in feeds] == [4, 1] and limited.count(model) == 5


def test_npz_with_a_sample_axis_and_a_folder(model, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(2):  # each file: 3 samples of a [2, 4] batch
        np.savez(
            folder / f"{i}.npz",
            x=np.full((3, 2, 4), i, np.float32),
            ids=np.zeros((3, 2, 4), np.int64),
        )
    spec = InputSpec(data=folder)
    feeds, _ = batches(spec, model)
    assert len(feeds) == 6 and all(f["x"].shape == (2, 4) for f in feeds)
    assert [float(f["x"][0, 0]) for f in feeds] == [0, 0, 0, 1, 1, 1]
    assert spec.count(model) == 6


def test_fixed_batch_dim_splits_rows(tmp_path):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2, 3])], [("y", F, [2, 3])]
    )
    model = ir.serde.deserialize_model(proto)
    np.savez(tmp_path / "d.npz", x=np.ones((6, 3), np.float32))
    feeds, _ = batches(InputSpec(data=tmp_path / "d.npz", batch=5), model)
    assert [f["x"].shape for f in feeds] == [(2, 3)] * 3
    np.savez(tmp_path / "odd.npz", x=np.ones((5, 3), np.float32))
    with pytest.raises(UsageError, match="fixed batch size 2"):
        batches(InputSpec(data=tmp_path / "odd.npz"), model)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.ones((2, 4), np.float32)}, "no array for input ids"),
        ({"x": np.ones((2, 2, 2, 4), np.float32), "ids": np.ones((2, 4), np.int64)}, "has rank 4"),
        (
            {"x": np.ones((2, 4), np.float32), "ids": np.ones((3, 4), np.int64)},
            "different numbers of samples",
        ),
        ({"x": np.ones((2, 4), np.float32), "ids": np.full((2, 4), 0.5)}, "cannot represent"),
    ],
)
def test_bad_npz(model, tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        batches(InputSpec(data=tmp_path / "d.npz"), model)


def test_missing_and_unreadable_data(model, tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        batches(InputSpec(data=tmp_path / "nope.npz"), model)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        batches(InputSpec(data=tmp_path / "bad.npz"), model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .npz"):
        batches(InputSpec(data=tmp_path / "empty"), model)
    with pytest.raises(UsageError, match="--shape names no input"):
        batches(InputSpec(shapes={"z": [1]}), model)
