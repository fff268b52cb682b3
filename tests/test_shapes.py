"""The input-shape resolver: dynamic dims of every kind get sizes that run the model."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model
from onnx import TensorProto, helper

from onnxopt.errors import UsageError
from onnxopt.inputs import InputSpec
from onnxopt.shapes import resolve


def _ir(proto):
    return ir.serde.deserialize_model(proto)


def patch_net(kernel=4, tokens=64):
    """A strided Conv (kernel = stride = 4) then a Reshape to a fixed [1, tokens]: it runs only where
    (h / 4) * (w / 4) == tokens, e.g. at 32 x 32, and fails at 1 (the image is smaller than the kernel)."""
    w = np.ones((1, 1, kernel, kernel), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[kernel, kernel]),
        helper.make_node("Reshape", ["c", "shape"], ["y"]),
    ]
    return make_model(
        nodes,
        [("x", F, ["batch", 1, "height", "width"])],
        [("y", F, [1, tokens])],
        {"w": w, "shape": np.array([1, tokens], np.int64)},
    )


def test_declared_minus_one_zero_and_unnamed_dims_are_dynamic():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = make_model(nodes, [("x", F, [2, 3])], [("y", F, [2, 3])])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1  # Paddle's way
    dims[1].Clear()  # no value, no name
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 0
    choice = resolve(_ir(proto))
    assert choice.shapes == {"x": [1, 1]}
    assert "x[1] set to 1" in choice.note() and "--shape x=1,1" in choice.note()
    feeds = next(iter(InputSpec().batches(_ir(proto), [])))
    assert feeds["x"].shape == (1, 1)  # was: "negative dimensions are not allowed"


def test_dims_that_share_a_name_share_a_size_and_a_given_shape_binds_them():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    proto = make_model(
        nodes, [("a", F, ["n", "seq"]), ("b", F, ["n", "seq"])], [("y", F, ["n", "seq"])]
    )
    assert resolve(_ir(proto)).shapes == {"a": [1, 1], "b": [1, 1]}
    assert resolve(_ir(proto), {"a": [2, 7]}).shapes == {"a": [2, 7], "b": [2, 7]}
    assert resolve(_ir(proto), batch=3).shapes == {"a": [3, 1], "b": [3, 1]}


def test_a_model_that_fails_at_1_is_searched_until_it_runs():
    choice = resolve(_ir(patch_net()))
    assert choice.shapes == {"x": [1, 1, 32, 32]} and choice.searched and choice.tried > 1
    note = choice.note()
    assert "height, width set to 32" in note and "pin them with --shape x=1,1,32,32" in note
    assert "first guess failed" in note
    # sizes other than the joint one: the width alone when the height is given through a hint
    wide = patch_net(tokens=8 * 16)
    wide.metadata_props.add(key="imgsz", value="[32, 64]")
    choice = resolve(_ir(wide))
    assert choice.shapes == {"x": [1, 1, 32, 64]} and not choice.searched


def test_one_dim_at_a_time_when_no_joint_size_runs():
    # [n, k]: k must be exactly 48 (a MatMul with a [48, 2] weight); n may be anything.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = make_model(
        nodes,
        [("x", F, ["rows", "k"])],
        [("y", F, ["rows", 2])],
        {"w": np.ones((48, 2), np.float32)},
    )
    assert resolve(_ir(proto), prefer=128).shapes == {"x": [1, 48]}  # rows is the batch dim
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    proto = make_model(
        nodes,
        [("x", F, [1, "rows", "k"])],
        [("y", F, [1, "rows", 2])],
        {"w": np.ones((48, 2), np.float32)},
    )
    choice = resolve(_ir(proto), prefer=128)
    assert choice.shapes == {
        "x": [1, 128, 48]
    }  # the joint 48 would do too, but the preferred rows come first


def test_a_model_that_runs_at_no_size_says_which_shape_to_give():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    proto = make_model(
        nodes, [("x", F, ["n"])], [("y", F, [7])], {"shape": np.array([7], np.int64)}
    )
    with pytest.raises(
        UsageError, match=r"runs on none of the \d+ input shapes tried.*--shape x=n.*--inputs"
    ):
        resolve(_ir(proto))


def test_a_model_with_only_fixed_dims_is_not_run():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    proto = make_model(nodes, [("x", F, [6])], [("y", F, [7])], {"shape": np.array([7], np.int64)})
    choice = resolve(
        _ir(proto)
    )  # it would fail in onnxruntime; nothing to choose, so nothing is tried
    assert choice.shapes == {"x": [6]} and choice.note() is None


def test_integer_and_image_hint_inputs():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=F), helper.make_node("Relu", ["f"], ["y"])]
    proto = make_model(
        nodes, [("ids", TensorProto.INT64, ["batch", "seq"])], [("y", F, ["batch", "seq"])]
    )
    assert resolve(_ir(proto), prefer=128).shapes == {"ids": [1, 128]}
    image = patch_net()
    image.metadata_props.add(key="imgsz", value="32")
    assert resolve(_ir(image)).shapes == {"x": [1, 1, 32, 32]}


def test_the_resolver_reads_the_file_when_given(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(patch_net(), str(path))
    choice = resolve(_ir(patch_net()), source=path)
    assert choice.shapes["x"] == [1, 1, 32, 32]


def test_a_decoder_cache_starts_empty_and_the_prefill_has_16_tokens():
    """past_* dims at 0 (random keys and values are nothing the model sees), the other sequence dims
    at PREFILL (position 0 alone is the attention sink); prefill=1 asks for a decode step's shapes."""
    from onnxopt.shapes import PREFILL, has_cache

    proto = make_model(
        [
            helper.make_node("Concat", ["past", "x"], ["present"], axis=1),
            helper.make_node("ReduceSum", ["mask"], ["n"]),
        ],
        [
            ("past", F, ["batch", "past_sequence", 4]),
            ("x", F, ["batch", "sequence", 4]),
            ("mask", TensorProto.INT64, ["batch", "total_sequence"]),
        ],
        [("present", F, ["batch", "total", 4]), ("n", TensorProto.INT64, [])],
    )
    model = _ir(proto)
    assert has_cache(model)
    choice = resolve(model)
    assert choice.shapes == {"past": [1, 0, 4], "x": [1, PREFILL, 4], "mask": [1, PREFILL]}
    assert resolve(model, prefill=1).shapes["x"] == [1, 1, 4]
    assert not has_cache(_ir(patch_net()))
