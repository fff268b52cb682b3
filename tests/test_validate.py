"""Validation: comparison metrics against numpy references, bounds, and the `onnxopt validate` command."""

import json
import math

import numpy as np
import pytest
from helpers import classifier, cli

from onnxopt.compare import Accumulator, masked_mean
from onnxopt.inputs import InputSpec
from onnxopt.validate import Bounds, validate


def test_metrics_match_numpy_references():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 5, 7))
    got = ref + 0.01 * rng.standard_normal(ref.shape)
    acc = Accumulator("y", atol=0.0, rtol=0.0)
    acc.update(
        ref[:4].astype(np.float32), got[:4].astype(np.float32)
    )  # two runs stream into one result
    acc.update(ref[4:].astype(np.float32), got[4:].astype(np.float32))
    r = acc.result()
    ref, got = ref.astype(np.float32).astype(np.float64), got.astype(np.float32).astype(np.float64)
    diff = np.abs(ref - got)
    assert r.samples == 6 and r.max_abs == pytest.approx(diff.max())
    assert r.mean_abs == pytest.approx(diff.mean())
    assert r.max_rel == pytest.approx((diff / np.abs(ref)).max())
    assert np.quantile(diff, 0.99) <= r.p99_abs <= 1.06 * np.quantile(diff, 0.99)
    rows_ref, rows_got = ref.reshape(6, -1), got.reshape(6, -1)
    cos = (
        (rows_ref * rows_got).sum(1)
        / np.linalg.norm(rows_ref, axis=1)
        / np.linalg.norm(rows_got, axis=1)
    )
    assert r.cosine == pytest.approx(cos.mean()) and r.cosine_min == pytest.approx(cos.min())
    assert r.snr_db == pytest.approx(10 * np.log10((ref**2).sum() / (diff**2).sum()))
    assert sum(n for _, _, n in r.histogram) == ref.size and not r.passed
    assert r.top1 is None


def test_tolerance_nan_shape_and_exact_outputs():
    ref = np.array([[1.0, np.nan, np.inf]], np.float32)
    same = Accumulator("y", 0.0, 0.0)
    same.update(ref, ref.copy())
    r = same.result()
    assert r.passed and r.max_abs == 0 and math.isinf(r.snr_db)
    nan = Accumulator("y", 1.0, 1.0)
    nan.update(ref, np.array([[1.0, 2.0, np.inf]], np.float32))
    assert nan.result().detail == "NaNs differ" and not nan.result().passed
    shape = Accumulator("y", 1.0, 1.0)
    shape.update(np.zeros((2, 3)), np.zeros((3, 2)))
    assert "shape" in shape.result().detail
    ints = Accumulator("ids", 0.0, 0.0)
    ints.update(np.array([True, False]), np.array([True, True]))
    assert not ints.result().passed
    close = Accumulator("y", 1e-3, 1e-2)
    close.update(np.array([100.0, 0.0]), np.array([100.9, 0.0009]))  # |d| <= atol + rtol * |ref|
    assert close.result().passed


def test_top1_and_topk_agreement():
    ref = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]], np.float32)
    got = np.array([[4, 5, 3, 2, 0, 1], [0, 1, 2, 3, 4, 5]], np.float32)
    acc = Accumulator("logits", 0, 0, topk=3)
    acc.update(ref, got)
    r = acc.result()
    assert r.top1 == 0.5 and r.topk == 1.0 and r.k == 3
    got[0] = [0, 0, 0, 1, 2, 3]  # first row: top-3 {3,4,5} vs {0,1,2}
    acc = Accumulator("logits", 0, 0, topk=3)
    acc.update(ref, got)
    assert acc.result().topk == 0.5


def test_masked_mean_is_a_sentence_embedding():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(masked_mean(hidden, mask), [[1, 2], [6, 7]])


def test_validate_api_bounds_and_auto_topk(tmp_path):
    ref = classifier(tmp_path / "ref.onnx")
    near = classifier(tmp_path / "near.onnx", noise=0.01)
    far = classifier(tmp_path / "far.onnx", noise=1.0)
    spec = InputSpec(shapes={"x": [16, 8]}, samples=3)
    good = validate(
        ref, near, spec, bounds={"": Bounds(min_cosine=0.999, min_top1=0.9)}, tolerance=False
    )
    assert good.passed and good.samples == 48
    [r] = good.results
    assert r.k == 5 and r.top1 >= 0.9 and r.cosine > 0.999
    bad = validate(
        ref, far, spec, bounds={"logits": Bounds(min_cosine=0.999, min_snr=40)}, tolerance=True
    )
    assert not bad.passed
    assert {v.metric: v.passed for v in bad.verdicts} == {
        "tolerance": False,
        "min_cosine": False,
        "min_snr": False,
    }


def run_validate(capsys, *args):
    code = cli("validate", *args)
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_command(tmp_path, capsys):
    ref, near = classifier(tmp_path / "ref.onnx"), classifier(tmp_path / "near.onnx", noise=0.01)
    np.savez(
        tmp_path / "data.npz",
        x=np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32),
    )
    code, out, err = run_validate(
        capsys,
        ref,
        near,
        "--inputs",
        tmp_path / "data.npz",
        "--batch",
        "16",
        "--min-cosine",
        "0.999",
        "--min-top1",
        "logits:0.8",
        "--json",
        tmp_path / "v.json",
    )
    assert code == 0, err
    assert "40 samples" in out and "validation passed" in out and "min_top1" in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["outputs"][0]["samples"] == 40
    assert [v["metric"] for v in report["verdicts"]] == [
        "min_cosine",
        "min_top1",
    ]  # no --atol: bounds only

    code, out, err = run_validate(capsys, ref, near, "--shape", "x=4,8", "--atol", "1e-6")
    assert code == 1 and "absolute errors of logits" in out  # the histogram comes with a failure
    assert err.strip() == "error: validation failed: logits tolerance"

    code, out, err = run_validate(
        capsys,
        ref,
        ref,
        "--shape",
        "x=4,8",
        "--atol",
        "logits:0",
        "--rtol",
        "0",
        "--json",
        tmp_path / "same.json",
    )
    assert code == 0, err
    same = json.loads(
        (tmp_path / "same.json").read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}")
    )
    assert same["outputs"][0]["snr_db"] == "inf" and same["outputs"][0]["max_abs"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--atol", "big"], "bad --atol"),
        (["--atol", "nope:1"], "--atol names no output"),
        (["--min-cosine", "nope:0.9"], "a bound names no output"),
        (["--mean-pool", "logits"], "bad --mean-pool"),
        (["--mean-pool", "logits:mask"], "mask is not an input"),
        (["--ep", "tpu"], "unknown execution provider 'tpu'"),
    ],
)
def test_validate_usage_errors(tmp_path, capsys, args, message):
    ref = classifier(tmp_path / "ref.onnx")
    code, _, err = run_validate(capsys, ref, ref, "--shape", "x=2,8", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_candidate_without_the_references_output(tmp_path, capsys):
    import onnx

    ref = classifier(tmp_path / "ref.onnx")
    proto = onnx.load(str(ref))
    proto.graph.output[0].name = proto.graph.node[0].output[0] = "renamed"
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    code, out, _ = run_validate(capsys, ref, tmp_path / "renamed.onnx", "--shape", "x=2,8")
    assert code == 1 and "missing from the candidate" in out


def test_a_candidate_that_fails_on_the_inputs_exits_1(tmp_path, capsys):
    ref = classifier(tmp_path / "ref.onnx")
    other = classifier(tmp_path / "other.onnx", classes=4)
    import onnx

    proto = onnx.load(str(other))
    proto.graph.output[0].name = proto.graph.node[0].output[0] = "logits"
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # wants [batch, 3]
    proto.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    )
    onnx.save(proto, str(other))
    code, _, err = run_validate(capsys, ref, other, "--shape", "x=2,8")
    assert code == 1 and err.startswith(
        "error: the candidate model does not run in onnxruntime on these inputs"
    )
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_validate(capsys, other, ref, "--shape", "x=2,8")
    assert code == 2 and "the reference model" in err


def test_run_check_reports_models_that_do_not_load(tmp_path):
    from onnxopt.compare import compare_models
    from onnxopt.errors import CheckFailed, UsageError

    ref = classifier(tmp_path / "ref.onnx")
    feeds = {"x": np.ones((1, 8), np.float32)}
    with pytest.raises(CheckFailed, match="the optimized model does not run in onnxruntime"):
        compare_models(ref, b"not a model", feeds)
    with pytest.raises(
        UsageError, match="the reference model does not run in onnxruntime, so it cannot be checked"
    ):
        compare_models(b"not a model", ref, feeds)


def test_run_check_holds_fp16_outputs_to_a_unit_in_the_last_place(tmp_path):
    """An exact pass that skips one fp16 rounding differs by an ulp: within the fp16 floor, while the
    same difference on a float32 output fails the default atol 1e-4."""
    from onnx import TensorProto, helper

    from onnxopt.compare import compare_models

    def model(dtype, scale):
        nodes = [helper.make_node("Mul", ["x", "s"], ["y"])]
        s = helper.make_tensor("s", dtype, [1], [scale])
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", dtype, [4])],
            [helper.make_tensor_value_info("y", dtype, [4])],
            [s],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)]
        ).SerializeToString()

    x = np.array([0.5, 0.9, 1.0, 0.25])
    one_ulp = 1 + 2.0**-9  # two fp16 ulps at 1.0: relative 2e-3 fails float32's rtol 1e-3
    half = compare_models(
        model(TensorProto.FLOAT16, 1.0),
        model(TensorProto.FLOAT16, one_ulp),
        [{"x": x.astype(np.float16)}],
    )
    assert half[0].passed and 0 < half[0].max_abs <= 2e-3
    full = compare_models(
        model(TensorProto.FLOAT, 1.0),
        model(TensorProto.FLOAT, one_ulp),
        [{"x": x.astype(np.float32)}],
    )
    assert not full[0].passed
