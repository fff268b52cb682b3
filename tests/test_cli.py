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
        capture_output=True, text=True, cwd=cwd, timeout=300,
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
    result = onnxopt("run", demo, "--passes", "fold(size_limit=16),prune", "-o", out, "--external-data")
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
        "external data missing": (["run", external], "external data file model.onnx.data is missing"),
        "unknown pass": (["run", demo, "--passes", "fold,frobnicate"], "unknown pass 'frobnicate'"),
        "bad option name": (["run", demo, "--passes", "fold(sizelimit=3)"], "unknown option 'sizelimit'"),
        "bad option value": (["run", demo, "--passes", "fold(size_limit=big)"], "option size_limit takes int"),
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
    result = subprocess.run([sys.executable, "-c", script, "run", str(path), "--passes", "wrong"],
                            capture_output=True, text=True)
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
