"""The pass framework: registry, typed options, pass lists, the pipeline and its report."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model
from onnx import helper

import onnxopt
from onnxopt.errors import CheckFailed, InternalError, UsageError
from onnxopt.passbase import Option, OptPass, parse_pass_list, registry
from onnxopt.passes import Fold, Prune


def test_registry_and_two_faces_of_a_pass():
    assert {"fold", "prune"} <= set(registry())
    from_cli = parse_pass_list("fold(size_limit=1_000),prune")
    assert [type(p) for p in from_cli] == [Fold, Prune]
    assert from_cli[0].size_limit == 1000 and Fold(size_limit=1000).size_limit == 1000
    assert repr(from_cli[0]) == "fold(size_limit=1000)" and repr(Fold()) == "fold"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fold(size_limit=x)", "takes int"),
        ("fold(limit=3)", "unknown option 'limit'"),
        ("fold(size_limit)", "expected key=value"),
        ("fold(size_limit=3", "unbalanced"),
        ("nope", "unknown pass 'nope'"),
        ("", "no passes"),
    ],
)
def test_bad_pass_lists(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_pass_list(spec)


def test_bool_and_float_options():
    class Toy(OptPass):
        name = "toy-options"
        options = (Option("flag", bool, False, ""), Option("ratio", float, 0.5, ""))

        def call(self, model):
            return ir.passes.PassResult(model, False)

    toy = parse_pass_list("toy-options(flag=yes,ratio=0.25)")[0]
    assert toy.flag is True and toy.ratio == 0.25
    with pytest.raises(UsageError):
        Toy(flag="maybe")


def chain_model():
    nodes = [
        helper.make_node("Add", ["a", "a"], ["a2"]),
        helper.make_node("Identity", ["a2"], ["a3"]),
        helper.make_node("Add", ["x", "a3"], ["y"]),
    ]
    return make_model(nodes, [("x", F, [2])], [("y", F, [2])], {"a": np.ones(2, np.float32)})


def test_pipeline_report_and_fixed_point():
    model, report = onnxopt.run(ir.serde.deserialize_model(chain_model()), ["prune", "fold"])
    assert report.before.nodes == 3 and report.after.nodes == 1
    assert [p.name for p in report.passes] == ["prune", "fold"]
    assert sum(p.delta["nodes"] for p in report.passes) == -2
    assert all(p.rounds >= 1 and p.seconds >= 0 for p in report.passes)
    assert report.to_dict()["after"]["ops"] == {"Add": 1}


def test_a_pass_that_changes_the_interface_is_refused():
    class Renamer(OptPass):
        name = "toy-renamer"

        def call(self, model):
            model.graph.outputs[0].name = "other"
            return ir.passes.PassResult(model, True)

    with pytest.raises(CheckFailed, match="changed the model's inputs or outputs"):
        onnxopt.run(ir.serde.deserialize_model(chain_model()), [Renamer()])


def test_a_pass_that_crashes_is_reported():
    class Crasher(OptPass):
        name = "toy-crasher"

        def call(self, model):
            raise ZeroDivisionError("boom")

    with pytest.raises(
        InternalError, match=r"internal error in pass toy-crasher \(ZeroDivisionError: boom\)"
    ):
        onnxopt.run(ir.serde.deserialize_model(chain_model()), [Crasher()])
