"""Timing: side-by-side rounds, statistics, providers (CUDA where it exists, fallback detection everywhere)."""

import json

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
from helpers import F, classifier, cli, make_model

from onnxopt import bench, runtime
from onnxopt.errors import UsageError

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_bench_api_times_every_model_alike(tmp_path):
    a, b = classifier(tmp_path / "a.onnx"), classifier(tmp_path / "b.onnx", noise=0.1)
    feeds = {"x": np.ones((4, 8), np.float32)}
    timings = bench.bench([a, b], feeds, ["cpu"], bench.Settings(iters=12, warmup=2, threads=1))
    assert [t.model for t in timings] == [str(a), str(b)]
    for t in timings:
        assert len(t.times_ms) == 12 and t.batch == 4 and t.ep == "cpu"
        assert t.stat("p50") <= t.stat("p90") <= t.stat("p99") and t.stat("mean") > 0
        assert t.throughput == pytest.approx(4e3 / t.stat("mean"))
        assert t.size_bytes == a.stat().st_size and t.session_s > 0 and t.first_run_ms > 0
    assert timings[0].speedup == 1.0
    assert timings[1].speedup == pytest.approx(timings[0].stat("p50") / timings[1].stat("p50"))
    row = timings[1].to_dict()
    assert row["iters"] == 12 and {"p50_ms", "p90_ms", "p99_ms", "std_ms", "rss_mb"} <= set(row)


def test_bench_for_a_time_budget(tmp_path):
    a = classifier(tmp_path / "a.onnx")
    [t] = bench.bench(
        [a], {"x": np.ones((1, 8), np.float32)}, ["cpu"], bench.Settings(seconds=0.2, warmup=0)
    )
    assert len(t.times_ms) >= bench.RUNS_PER_ROUND


def test_bench_command_json_and_table(tmp_path, capsys):
    a, b = classifier(tmp_path / "a.onnx"), classifier(tmp_path / "b.onnx")
    assert (
        cli(
            "bench",
            a,
            b,
            "--shape",
            "x=2,8",
            "--iters",
            "10",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in report["results"]] == [str(a), str(b)]
    assert (
        all(r["iters"] == 10 and r["batch"] == 2 for r in report["results"])
        and report["peak_rss_mb"] > 0
    )
    assert cli("bench", a, "--batch", "3", "--iters", "5") == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "1.000x" in out and "set to 1" not in out


def test_bench_usage_errors(tmp_path, capsys):
    a = classifier(tmp_path / "a.onnx")
    for args, message in [
        (["--iters", "5", "--seconds", "1"], "--iters or --seconds"),
        (["--ep", "cpu,npu"], "unknown execution provider 'npu'"),
    ]:
        assert cli("bench", a, *args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert cli("bench", a, tmp_path / "missing.onnx") == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_requested_without_it_names_what_to_install(tmp_path, capsys):
    a = classifier(tmp_path / "a.onnx")
    assert cli("bench", a, "--ep", "cpu,cuda") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no CUDAExecutionProvider" in err and "onnxruntime-gpu" in err


def test_silent_fallback_to_cpu_is_refused(tmp_path, capsys, monkeypatch):
    # onnxruntime lists CUDA but cannot load it (missing CUDA/cuDNN libraries): the session it makes
    # runs on the CPU and says so only in its providers. Mock the listing; the fallback is onnxruntime's own.
    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *available]
    )
    real = onnxruntime.InferenceSession

    def cpu_only(path, opts=None, providers=None, **kw):
        assert providers[0] == "CUDAExecutionProvider"
        return real(path, opts, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(onnxruntime, "InferenceSession", cpu_only)
    a = classifier(tmp_path / "a.onnx")
    with pytest.raises(
        UsageError, match="fell back to CPUExecutionProvider because CUDAExecutionProvider failed"
    ):
        runtime.session(a, ep="cuda")
    assert cli("bench", a, "--ep", "cuda", "--iters", "5") == 2
    assert "fell back" in capsys.readouterr().err
    assert cli("validate", a, a, "--ep", "cuda") == 2


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA execution provider in this onnxruntime")
def test_cuda_path(tmp_path, capsys):
    a, b = classifier(tmp_path / "a.onnx"), classifier(tmp_path / "b.onnx", noise=0.01)
    timings = bench.bench(
        [a, b], {"x": np.ones((64, 8), np.float32)}, ["cpu", "cuda"], bench.Settings(iters=20)
    )
    assert [t.ep for t in timings] == ["cpu", "cpu", "cuda", "cuda"]
    assert all(len(t.times_ms) == 20 for t in timings)
    assert cli("validate", a, b, "--ep", "cuda", "--shape", "x=16,8", "--min-cosine", "0.999") == 0


def test_io_binding_runs_keep_data_on_the_device(tmp_path):
    # The CUDA path binds device-resident inputs and outputs; the same code runs here on the CPU device.
    a = classifier(tmp_path / "a.onnx")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    runner = bench._Runner(a, "cpu", {"x": x}, threads=1)
    run = runner._bound({"x": x}, "cpu")
    for _ in range(2):
        run()
    [out] = runner.binding.copy_outputs_to_cpu()
    weight = onnx.numpy_helper.to_array(onnx.load(str(a)).graph.initializer[0])
    np.testing.assert_allclose(out, x @ weight, rtol=1e-5, atol=1e-5)


def scoped_model(path):
    """x [n, 64] → /m/dense/MatMul → /m/act/Relu, nodes named by module path as exporters do."""
    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="/m/dense/MatMul"),
        onnx.helper.make_node("Relu", ["h"], ["y"], name="/m/act/Relu"),
    ]
    w = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    model = make_model(nodes, [("x", F, ["n", 64])], [("y", F, ["n", 64])], w)
    onnx.save(model, str(path))
    return path


def test_profile_lines_up_kernels_by_op_and_scope(tmp_path, capsys):
    import onnxopt
    from onnxopt import profile

    a = scoped_model(tmp_path / "a.onnx")
    b = tmp_path / "b.onnx"
    onnxopt.save(onnxopt.optimize(str(a), ["quant(tune=off)"], check=False)[0], b)
    feeds = {"x": np.ones((32, 64), np.float32)}
    pa, pb = profile.profile([a, b], feeds, runs=5, threads=1)
    assert {"MatMul", "Relu"} <= set(pa.by_op()) and pa.total_us > 0
    assert "MatMul" not in pb.by_op()  # onnxruntime runs the int8 form instead
    assert set(pa.by_scope()) == {"/m/dense", "/m/act"}
    assert "/m/dense" in pb.by_scope() and "/m/act" in pb.by_scope()
    assert profile.scope_of("/m/dense/MatMul_quant") == "/m/dense"
    assert cli("bench", a, b, "--shape", "x=32,64", "--iters", "3", "--profile", "5") == 0
    out = capsys.readouterr().out
    assert "kernel time by op type" in out and "/m/dense" in out
    assert cli("bench", a, b, "--shape", "x=32,64", "--iters", "3", "--profile", "5", "--json") == 0
    found = json.loads(capsys.readouterr().out)["profile"]
    assert [p["model"] for p in found] == [str(a), str(b)]
    assert found[0]["by_op"]["MatMul"]["kernels"] == 1
