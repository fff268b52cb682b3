"""The command line as a user meets it: exit codes, one-line errors, nothing left behind."""

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import onnx
import pytest
from helpers import F, make_model
from onnx import helper

DEMO = Path(str(resources.files("onnxopt.zoo").joinpath("demo.onnx")))


def onnxopt(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "from onnxopt.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def demo(tmp_path):
    path = tmp_path / "demo.onnx"
    shutil.copy(DEMO, path)
    return path


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_run_on_the_demo_model(demo, tmp_path):
    before = demo.read_bytes()
    result = onnxopt("run", demo, "--report", tmp_path / "run.json")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo.opt.onnx"
    assert out.is_file() and demo.read_bytes() == before
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["after"]["nodes"] < report["before"]["nodes"]
    assert [p["name"] for p in report["passes"]] == ["fold", "prune", "fuse"]
    assert all(c["passed"] for c in report["check"])
    assert "nodes by op type" in result.stdout and "wrote" in result.stdout
    assert not [n for n in files(tmp_path) if n.startswith(".onnxopt")]


def test_pass_options_and_external_data(demo, tmp_path):
    out = tmp_path / "ext.onnx"
    result = onnxopt(
        "run", demo, "--passes", "fold(size_limit=16),prune", "-o", out, "--external-data"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ext.onnx.data").stat().st_size > 10_000
    assert out.stat().st_size < 10_000
    model = onnx.load(str(out))
    onnx.checker.check_model(model)


def bad_inputs(tmp_path, demo):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(demo.read_bytes()[: len(demo.read_bytes()) // 2])
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    result = onnxopt("run", demo, "--no-check", "--external-data", "-o", external)
    assert result.returncode == 0, result.stderr
    (external.parent / "model.onnx.data").unlink()
    return {
        "missing file": (["run", tmp_path / "nope.onnx"], "no such file"),
        "not onnx": (["run", text], "not a readable ONNX model"),
        "truncated": (["run", truncated], "not a readable ONNX model"),
        "external data missing": (
            ["run", external],
            "external data file model.onnx.data is missing",
        ),
        "unknown pass": (["run", demo, "--passes", "fold,frobnicate"], "unknown pass 'frobnicate'"),
        "bad option name": (
            ["run", demo, "--passes", "fold(sizelimit=3)"],
            "unknown option 'sizelimit'",
        ),
        "bad option value": (
            ["run", demo, "--passes", "fold(size_limit=big)"],
            "option size_limit takes int",
        ),
        "output is input": (["run", demo, "-o", demo], "refusing to write over the input"),
        "bad shape": (["run", demo, "--shape", "x:1,2"], "bad --shape"),
        "unknown cli option": (["run", demo, "--frobnicate"], "No such option"),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, demo):
    cases = bad_inputs(tmp_path, demo)
    for name, (args, message) in cases.items():
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        result = onnxopt(*args)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert "Traceback" not in result.stderr
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before, name  # input unchanged, no output and no temporary file left


def test_failed_check_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    # A pass that claims to be exact but changes the numbers must be refused.
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [("x", F, [2, 3])], [("y", F, [2, 3])])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    script = (
        "import onnx_ir as ir\n"
        "from onnxopt.passbase import OptPass\n"
        "class Wrong(OptPass):\n"
        "    name = 'wrong'\n"
        "    def call(self, model):\n"
        "        model.graph.node(0).op_type = 'Sigmoid'\n"
        "        return ir.passes.PassResult(model, True)\n"
        "from onnxopt.cli import main; main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "run", str(path), "--passes", "wrong"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "outputs differ" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert files(tmp_path) == {"m.onnx"}


def test_passes_and_inspect(demo):
    listing = onnxopt("passes")
    assert listing.returncode == 0 and "fold" in listing.stdout and "prune" in listing.stdout
    one = onnxopt("passes", "fold")
    assert "size_limit: int = 1048576" in one.stdout
    assert onnxopt("passes", "nope").returncode == 2
    info = json.loads(onnxopt("inspect", demo, "--json").stdout)
    assert info["opsets"] == {"": 17} and info["ir_version"] == 8
    assert info["inputs"] == [{"name": "x", "dtype": "FLOAT", "dims": ["batch", 3, 32, 32]}]
    assert info["nodes"] == sum(info["ops"].values()) == len(onnx.load(str(demo)).graph.node)
    assert info["constant_nodes"] == info["ops"]["Constant"]
    assert info["file_bytes"] == demo.stat().st_size
    text = onnxopt("inspect", demo)
    assert text.returncode == 0 and "parameters" in text.stdout


def test_default_output_path_and_generated_input_notice(demo, tmp_path):
    result = onnxopt("run", demo, "--shape", "x=4,3,32,32")
    assert result.returncode == 0, result.stderr
    assert "set to 1" not in result.stdout
    result = onnxopt("run", demo)
    assert "set to 1" in result.stdout


def _save(tmp_path, proto, name="m.onnx"):
    path = tmp_path / name
    onnx.save(proto, str(path))
    return path


def test_a_model_that_fails_at_size_1_runs_validates_and_benches_with_no_flags(tmp_path):
    from test_shapes import patch_net

    path = _save(tmp_path, patch_net())
    result = onnxopt("run", path, "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert (
        "pin them with --shape x=1,1,32,32" in result.stdout and "--no-check" not in result.stdout
    )
    assert onnxopt("validate", path, tmp_path / "out.onnx").returncode == 0
    timed = onnxopt("bench", path, tmp_path / "out.onnx", "--iters", "5")
    assert timed.returncode == 0 and "--shape x=1,1,32,32" in timed.stdout


def test_a_model_that_runs_at_no_size_is_one_line_exit_2(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    proto = make_model(nodes, [("x", F, ["n"])], [("y", F, [7])], {"shape": [7]})
    path = _save(tmp_path, proto)
    result = onnxopt("run", path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert (
        "--shape x=n" in result.stderr
        and "--inputs" in result.stderr
        and "--no-check" not in result.stderr
    )
    assert files(tmp_path) == {"m.onnx"}
    for command in (("validate", path, path), ("bench", path)):
        result = onnxopt(*command)
        assert result.returncode == 2 and "--shape x=n" in result.stderr


CRASHING_PASS = (
    "import onnxopt.compare\n"
    "from onnxopt.passbase import OptPass\n"
    "class Boom(OptPass):\n"
    "    name = 'boom'\n"
    "    def call(self, model):\n"
    "        return {}['x']\n"
    "def broken(*args, **kwargs):\n"
    "    raise ValueError('not expected')\n"
    "onnxopt.compare.compare_sessions = broken\n"
    "from onnxopt.cli import main; main()\n"
)


def test_an_unexpected_error_is_one_line_exit_3_and_debug_shows_the_traceback(tmp_path, demo):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", CRASHING_PASS, *map(str, args)], capture_output=True, text=True
        )

    result = run("run", demo, "--passes", "boom")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        "error: internal error in pass boom (KeyError: 'x'); rerun with --debug for the traceback"
    )
    assert files(tmp_path) == {"demo.onnx"}
    debug = run("run", demo, "--passes", "boom", "--debug")
    assert debug.returncode == 3 and "Traceback" in debug.stderr and "in call" in debug.stderr
    stage = run("run", demo, "--passes", "fold")  # the check itself breaks
    assert stage.returncode == 3 and len(stage.stderr.strip().splitlines()) == 1
    assert "internal error in onnxopt run (ValueError: not expected)" in stage.stderr
    assert files(tmp_path) == {"demo.onnx"}


def test_run_checks_on_real_samples_and_quiet(tmp_path, demo):
    import numpy as np

    np.savez(tmp_path / "s.npz", x=np.random.default_rng(0).random((3, 3, 32, 32), np.float32))
    result = onnxopt(
        "run", demo, "--inputs", tmp_path / "s.npz", "--report", tmp_path / "r.json", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [f"wrote {tmp_path / 'demo.opt.onnx'}"]
    check = json.loads((tmp_path / "r.json").read_text())["check"]
    assert check and all(c["samples"] == 3 for c in check)
    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 3, 32, 32), np.float32))
    bad = onnxopt("run", demo, "--inputs", tmp_path / "bad.npz")
    assert bad.returncode == 2 and "--inputs" in bad.stderr and "no array for input x" in bad.stderr
    calib = onnxopt("run", demo, "--passes", f"quant(mode=static,calib={tmp_path / 'bad.npz'})")
    assert calib.returncode == 2 and "calib=" in calib.stderr and "--inputs" not in calib.stderr
    for command in ("validate", "bench", "check", "inspect", "run"):
        assert "--quiet" in onnxopt(command, "--help").stdout, command


def test_inspect_explains_why_each_fuse_rule_fires_or_not(demo):
    rows = json.loads(onnxopt("inspect", demo, "--explain", "fuse", "--json").stdout)
    assert {"node", "op_type", "rule", "fires", "reason"} <= set(rows[0])
    assert any(r["fires"] for r in rows) and all(r["reason"] for r in rows)
    assert any(r["reason"] == "only with target=ort" for r in rows)
    table = onnxopt("inspect", demo, "--explain", "fuse(target=ort)")
    assert table.returncode == 0 and "candidate rules fire" in table.stdout
    refused = onnxopt("inspect", demo, "--explain", "prune")
    assert refused.returncode == 2 and "nothing to explain" in refused.stderr
