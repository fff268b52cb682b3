"""slim on Conv channels: dependency groups through Split, residual Add, Concat and depthwise
Convs are cut together or left; pinned channels stay; the least-squares refit of the readers."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, run_proto
from onnx import helper

from onnxopt.passes import Slim
from onnxopt.passes._common import infer_shapes, lift_constants
from onnxopt.passes.slim import fit
from onnxopt.passes.slim.channels import analyse

C_IN, SIDE = 4, 12


def conv_model(*, pin_residual=False, reshape_head=False, seed=0):
    """x [N, 4, 12, 12]: stem Conv 3x3 to 16 + SiLU, Split [8, 8]; the second half through a
    bottleneck Conv 3x3 + Relu added back to it (residual); Concat of the first half, the second
    and the sum (24); a depthwise 3x3; a 1x1 head to 6 channels, the graph output. With
    ``pin_residual`` the bottleneck's output is a graph output too; with ``reshape_head`` the stem
    feeds a Reshape to the output directly."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    # The stem's 16 filters mix 6 (plus a little noise): redundant channels, as trained nets have.
    stem = np.einsum("oc,cikl->oikl", rng.standard_normal((16, 6)), w(6, C_IN, 3, 3))
    init = {
        "ws": (stem + 0.05 * w(16, C_IN, 3, 3)).astype(np.float32),
        "bs": (0.1 * rng.standard_normal(16)).astype(np.float32),
        "wm": w(8, 8, 3, 3),
        "bm": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "wd": w(24, 1, 3, 3),
        "wh": w(6, 24, 1, 1),
        "bh": np.zeros(6, np.float32),
        "split": np.array([8, 8], np.int64),
        "shape": np.array([0, -1], np.int64),
    }
    pad = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="stem", **pad),
        helper.make_node("Sigmoid", ["s"], ["sg"]),
        helper.make_node("Mul", ["s", "sg"], ["t"]),
    ]
    outputs = [("out", F, ["batch", 6, SIDE, SIDE])]
    if reshape_head:
        nodes.append(helper.make_node("Reshape", ["t", "shape"], ["out"]))
        outputs = [("out", F, ["batch", 16 * SIDE * SIDE])]
        return make_model(nodes, [("x", F, ["batch", C_IN, SIDE, SIDE])], outputs, init, 18)
    nodes += [
        helper.make_node("Split", ["t", "split"], ["t0", "t1"], axis=1),
        helper.make_node("Conv", ["t1", "wm", "bm"], ["m"], name="bottleneck", **pad),
        helper.make_node("Relu", ["m"], ["u"]),
        helper.make_node("Add", ["t1", "u"], ["r"]),
        helper.make_node("Concat", ["t0", "t1", "r"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "wd"], ["dw"], name="depthwise", group=24, **pad),
        helper.make_node("Conv", ["dw", "wh", "bh"], ["out"], name="head"),
    ]
    if pin_residual:
        outputs.append(("u", F, ["batch", 8, SIDE, SIDE]))
    return make_model(nodes, [("x", F, ["batch", C_IN, SIDE, SIDE])], outputs, init, 18)


def images(n, seed):
    return np.random.default_rng(seed).standard_normal((n, C_IN, SIDE, SIDE)).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("channels") / "calib.npz"
    np.savez(path, x=images(24, 1))
    return str(path)


def blocks_of(proto):
    model = ir.serde.deserialize_model(proto)
    lift_constants(model)
    infer_shapes(model)
    return {b.name: b.width for b in analyse(model.graph).blocks()}


def weight(model, name):
    node = next(n for n in model.graph if n.name == name)
    return node.inputs[1].const_value.numpy()


def slim(proto, **options):
    model = ir.serde.deserialize_model(proto)
    return model, Slim(allocate="uniform", multiple=4, **options)(model)


def relative_error(proto, model, x):
    ref = run_proto(proto, {"x": x})["out"]
    got = run_proto(model, {"x": x})["out"]
    return float(np.mean((ref - got) ** 2) / np.mean(ref**2))


def test_blocks_follow_split_residual_and_concat():
    # The stem's halves are separate blocks (the Split); the bottleneck's channels join the second
    # half (the residual Add); the depthwise Conv and the Concat carry them; the head's output is
    # the graph output, so it is no block.
    assert blocks_of(conv_model()) == {"stem[0:8]": 8, "stem[8:16]": 8}


def test_pinned_channels_stay():
    # The bottleneck's output is a graph output: the residual class is pinned, the first half not.
    assert blocks_of(conv_model(pin_residual=True)) == {"stem[0:8]": 8}
    assert blocks_of(conv_model(reshape_head=True)) == {}


def test_coupled_channels_are_cut_together(calib):
    proto = conv_model()
    model, result = slim(proto, calib=calib, channels=0.5)
    assert result.modified
    assert weight(model, "stem").shape == (8, C_IN, 3, 3)
    assert weight(model, "bottleneck").shape == (4, 4, 3, 3)  # in: t1's kept, out: the same
    assert weight(model, "depthwise").shape == (12, 1, 3, 3)  # 4 + 4 + 4 through the Concat
    assert weight(model, "head").shape == (6, 12, 1, 1)
    depthwise = next(n for n in model.graph if n.name == "depthwise")
    assert depthwise.attributes["group"].value == 12
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [4, 4]
    x = images(8, 7)
    out = run_proto(model, {"x": x})["out"]
    assert out.shape == (8, 6, SIDE, SIDE)
    assert relative_error(proto, model, x) < 0.5
    rows = {r["layer"]: r for r in result.rows}
    assert rows["stem[8:16]"]["units_after"] == 4
    assert rows["stem[0:8]"]["macs_after"] < rows["stem[0:8]"]["macs_before"]


def test_a_pinned_class_keeps_its_coupled_channels(calib):
    model, result = slim(conv_model(pin_residual=True), calib=calib, channels=0.5)
    assert weight(model, "stem").shape == (12, C_IN, 3, 3)  # only the first half was cut
    assert weight(model, "bottleneck").shape == (8, 8, 3, 3)
    assert [r["layer"] for r in result.rows] == ["stem[0:8]"]


def test_nothing_to_cut_is_left_unchanged(calib):
    model, result = slim(conv_model(reshape_head=True), calib=calib, channels=0.5)
    assert not result.modified
    assert "nothing to slim" in result.notes[0]


def test_the_refit_beats_dropping_channels(calib):
    proto = conv_model(seed=3)
    x = images(16, 9)
    lsq, _ = slim(proto, calib=calib, channels=0.5)
    bias, _ = slim(proto, calib=calib, channels=0.5, refit="bias")
    none, _ = slim(proto, calib=calib, channels=0.5, refit="none")
    errors = [relative_error(proto, m, x) for m in (lsq, bias, none)]
    # measured: 0.139, 0.173, 0.286
    assert errors[0] < 0.85 * errors[1] < 0.7 * errors[2]


def test_sensitivity_allocates_by_measured_error(calib):
    proto = conv_model(seed=4)
    model = ir.serde.deserialize_model(proto)
    result = Slim(calib=calib, channels=0.3, multiple=4)(model)  # auto: sensitivity for channels
    note = next(n for n in result.notes if n.startswith("allocate: sensitivity (conv channels)"))
    assert "stem" in note
    x = images(8, 5)
    assert run_proto(model, {"x": x})["out"].shape == (8, 6, SIDE, SIDE)


def test_patches_reproduce_the_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 0, 1, 1])],
        [("x", F, [2, 3, 7, 6])],
        [("y", F, [2, 5, 4, 6])],
        {"w": w},
    )
    y = run_proto(proto, {"x": x})["y"]
    rows = fit.patches(x, (3, 2), (2, 1), (1, 0, 1, 1))
    got = (rows @ w.reshape(5, -1).T).reshape(2, y.shape[2], y.shape[3], 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_random_calibration_warns_in_slims_name():
    model = ir.serde.deserialize_model(conv_model())
    with pytest.warns(UserWarning, match="pass slim: calibrating on random inputs"):
        Slim(calib="random", channels=0.5, multiple=4, allocate="uniform")(model)


def bn_model(seed=0):
    """x -> Conv 3x3 to 16 -> BatchNormalization -> Relu -> Conv 1x1 to 6 (the output)."""
    rng = np.random.default_rng(seed)
    init = {
        "w1": (rng.standard_normal((16, C_IN, 3, 3)) / 6).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "bias": (0.1 * rng.standard_normal(16)).astype(np.float32),
        "mean": (0.1 * rng.standard_normal(16)).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "w2": (rng.standard_normal((6, 16, 1, 1)) / 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn"
        ),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["out"], name="head"),
    ]
    return make_model(
        nodes,
        [("x", F, ["batch", C_IN, SIDE, SIDE])],
        [("out", F, ["batch", 6, SIDE, SIDE])],
        init,
        18,
    )


def test_batch_normalization_carries_its_channels(calib):
    proto = bn_model()
    assert blocks_of(proto) == {"conv": 16}
    model, result = slim(proto, calib=calib, channels=0.5)
    assert weight(model, "conv").shape == (8, C_IN, 3, 3)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    assert all(v.const_value.shape == (8,) for v in bn.inputs[1:])
    assert weight(model, "head").shape == (6, 8, 1, 1)
    x = images(8, 2)
    assert run_proto(model, {"x": x})["out"].shape == (8, 6, SIDE, SIDE)
    assert relative_error(proto, model, x) < 0.5


def test_a_missing_calib_is_named_in_slims_name(tmp_path):
    from onnxopt.errors import UsageError

    model = ir.serde.deserialize_model(conv_model())
    with pytest.raises(UsageError, match="pass slim: calib .* does not exist"):
        Slim(calib=str(tmp_path / "nope.npz"))(model)
