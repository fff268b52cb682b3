"""The CI gate: policies, goals, exit codes and the JSON, Markdown and JUnit reports."""

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from helpers import classifier, cli

from onnxopt import policy
from onnxopt.errors import UsageError

PASSING = """
[inputs]
shape = { x = [8, 8] }
samples = 2
[bench]
iters = 10
warmup = 1
threads = 1
[accuracy]
min_cosine = 0.99
[accuracy.outputs.logits]
min_top1 = 0.5
max_abs_error = 1.0
[latency.cpu]
percentile = "p90"
max_regression_pct = 10000
[size]
max_mb = 1
"""


@pytest.fixture
def models(tmp_path):
    return classifier(tmp_path / "ref.onnx"), classifier(tmp_path / "cand.onnx", noise=0.01)


def write(tmp_path, text, name="gate.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def check(capsys, ref, cand, gate, *extra):
    code = cli("check", ref, cand, "--policy", gate, *extra)
    out, err = capsys.readouterr()
    return code, out, err


def test_passing_policy_exits_0_and_writes_every_report(tmp_path, models, capsys):
    reports = {k: tmp_path / f"gate.{k}" for k in ("json", "md", "xml")}
    code, out, err = check(
        capsys,
        *models,
        write(tmp_path, PASSING),
        "--json",
        reports["json"],
        "--markdown",
        reports["md"],
        "--junit",
        reports["xml"],
    )
    assert code == 0, err
    result = json.loads(reports["json"].read_text())
    assert result["passed"] and [g["name"] for g in result["goals"]] == [
        "accuracy.min_cosine[logits]",
        "accuracy.min_top1[logits]",
        "accuracy.max_abs_error[logits]",
        "latency.cpu.p90.max_regression_pct",
        "size.max_mb",
    ]
    assert [b["model"] for b in result["bench"]] == [str(m) for m in models]
    assert "gate: passed" in out
    assert reports["md"].read_text().startswith("### onnxopt gate: passed")
    suite = ET.parse(reports["xml"]).getroot().find("testsuite")
    assert (
        suite.get("tests") == "5"
        and suite.get("failures") == "0"
        and len(suite.findall("testcase")) == 5
    )


@pytest.mark.parametrize(
    "goals, failing",
    [
        ("[accuracy]\nmin_cosine = 0.9999999", ["accuracy.min_cosine[logits]"]),
        ("[latency.cpu]\nmin_speedup = 50", ["latency.cpu.p50.min_speedup"]),
        (
            "[size]\nmax_mb = 0.0001\nmin_reduction_pct = 10",
            ["size.max_mb", "size.min_reduction_pct"],
        ),
        (
            "[accuracy]\nmax_abs_error = 0\n[size]\nmax_mb = 0.0001\n[latency.cpu]\nmax_regression_pct = 10000",
            ["accuracy.max_abs_error[logits]", "size.max_mb"],
        ),
    ],
)
def test_failing_goals_exit_1_name_the_goal_and_fail_in_junit(
    tmp_path, models, capsys, goals, failing
):
    gate = write(
        tmp_path, "[inputs]\nshape = { x = [4, 8] }\n[bench]\niters = 10\nthreads = 1\n" + goals
    )
    junit, md = tmp_path / "junit.xml", tmp_path / "gate.md"
    code, out, err = check(capsys, *models, gate, "--junit", junit, "--markdown", md)
    assert code == 1
    assert err.strip() == f"error: gate failed: {', '.join(failing)}"
    cases = ET.parse(junit).getroot().iter("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == failing
    assert md.read_text().count("❌ FAIL") == len(failing)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[accuracy]\nmin_cosin = 0.9", "accuracy.min_cosin: unknown key"),
        ("[accuracy]\nmin_cosine = 'high'", "accuracy.min_cosine: must be a number"),
        ("[accuracy]\nmin_cosine = 2", "accuracy.min_cosine: must be in [-1, 1]"),
        ("[latency.tpu]\nmin_speedup = 1", "latency.tpu: unknown key"),
        ("[latency.cpu]\npercentile = 'p95'\nmin_speedup = 1", "latency.cpu.percentile: must be"),
        ("[latency.cpu]\npercentile = 'p90'", "latency.cpu: sets no goal"),
        ("[size]\nmax_mb = -1", "size.max_mb: must be >= 0"),
        ("[size]\nmin_reduction_pct = 120", "size.min_reduction_pct: must be <= 100"),
        (
            "[inputs]\nshape = { x = [1, 'a'] }\n[size]\nmax_mb = 1",
            "inputs.shape.x: must be a list of positive integers",
        ),
        ("[inputs]\nbatch = 0\n[size]\nmax_mb = 1", "inputs.batch: must be >= 1"),
        ("[bench]\niters = 5\nseconds = 2\n[size]\nmax_mb = 1", "bench: set iters or seconds"),
        ("accuracy = 3", "accuracy: must be a table"),
        (
            "[accuracy.outputs.logits]\nmean_pool = 3",
            "accuracy.outputs.logits.mean_pool: must be a string",
        ),
        ("[speed]\nx = 1", "speed: unknown key"),
        ("[inputs]\nseed = 1", "policy: sets no goal"),
        ("[size\nmax_mb = 1", "not valid TOML"),
    ],
)
def test_malformed_policy_exits_2_naming_the_key(tmp_path, models, capsys, text, key):
    code, out, err = check(capsys, *models, write(tmp_path, text))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and key in err, err


def test_policy_names_checked_against_the_models(tmp_path, models, capsys):
    code, _, err = check(
        capsys, *models, write(tmp_path, "[accuracy.outputs.nope]\nmin_cosine = 0.9")
    )
    assert code == 2 and "a bound names no output of the reference: nope" in err
    code, _, err = check(
        capsys,
        *models,
        write(tmp_path, "[inputs]\ndata = 'none.npz'\n[accuracy]\nmin_cosine = 0.9"),
    )
    assert code == 2 and "none.npz: no such file" in err
    assert cli("check", *models, "--policy", tmp_path / "missing.toml") == 2


def test_policy_reads_data_relative_to_itself(tmp_path):
    folder = tmp_path / "ci"
    folder.mkdir()
    gate = write(
        folder,
        "[inputs]\ndata = 'calib'\nbatch = 4\n[accuracy]\nmin_cosine = 0.9\n[bench]\nseconds = 1",
    )
    parsed = policy.load(gate)
    assert parsed.inputs.data == folder / "calib" and parsed.inputs.batch == 4
    assert parsed.bench.seconds == 1 and parsed.bench.iters is None and parsed.latency == []
    with pytest.raises(UsageError, match="must be a table"):
        policy.parse({"latency": {"cpu": 1}})


def test_run_with_a_gate_keeps_the_output_only_if_it_passes(tmp_path, capsys):
    model = classifier(tmp_path / "m.onnx")
    out = tmp_path / "m.opt.onnx"
    ok = write(
        tmp_path,
        "[inputs]\nshape = { x = [2, 8] }\n[accuracy]\nmin_cosine = 0.999\n[size]\nmax_mb = 1",
        "ok.toml",
    )
    assert cli("run", model, "--gate", ok, "--report", tmp_path / "run.json") == 0
    assert out.is_file() and json.loads((tmp_path / "run.json").read_text())["gate"]["passed"]
    out.unlink()
    failing = write(tmp_path, "[size]\nmin_reduction_pct = 90", "fail.toml")
    assert cli("run", model, "--gate", failing) == 1
    assert "gate failed: size.min_reduction_pct" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fail.toml",
        "m.onnx",
        "ok.toml",
        "run.json",
    ]
    assert cli("run", model, "--gate", failing, "--keep-failed") == 1
    assert out.is_file()
    shutil.copy(model, tmp_path / "copy.onnx")
    assert cli("run", model, "--gate", tmp_path / "nope.toml") == 2


def test_the_example_policy_gates_the_demo_model(tmp_path, capsys):
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "ci" / "gate.toml"
    parsed = policy.load(example)
    assert parsed.latency[0].max_regression_pct == 5 and parsed.size.max_mb == 1
    accuracy_only = tmp_path / "gate.toml"
    accuracy_only.write_text(
        example.read_text().split("[latency.cpu]")[0]
    )  # timing is too noisy for a test
    demo = Path(__file__).parents[1] / "models" / "demo.onnx"
    assert cli("run", demo, "-o", tmp_path / "demo.opt.onnx", "--gate", accuracy_only) == 0
    assert (tmp_path / "demo.opt.onnx").is_file()
