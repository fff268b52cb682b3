"""Run an ordered list of passes, recording what each one did."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import CheckFailed, InternalError, OnnxoptError
from onnxopt.passbase import OptPass, Outcome, RunContext, as_pass, using
from onnxopt.stats import Stats

MAX_ROUNDS = 8
DEFAULT_PASSES = ("fold", "prune", "fuse")  # exact passes, run together to a fixed point


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float = 0.0
    modified: bool = False
    rounds: int = 0
    delta: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict] = dataclasses.field(
        default_factory=list
    )  # per layer, the pass's declared columns
    fidelity: float | None = None  # a lossy pass's budget: the least output cosine the check holds

    def add(self, seconds: float, result: ir.passes.PassResult, delta: dict[str, int]) -> None:
        self.seconds += seconds
        self.modified |= result.modified
        self.rounds += 1
        for key, value in delta.items():
            self.delta[key] = self.delta.get(key, 0) + value
        if isinstance(
            result, Outcome
        ):  # the last run's findings stand (a fixed point repeats a pass)
            self.notes = result.notes or self.notes
            self.rows = result.rows or self.rows
            self.fidelity = result.fidelity if result.fidelity is not None else self.fidelity


@dataclasses.dataclass
class RunReport:
    before: Stats
    after: Stats
    passes: list[PassRecord]
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def signature(model: ir.Model) -> list[tuple]:
    """Names, types and ranks of the graph's inputs and outputs."""
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    return [
        (v.name, v.type, None if v.shape is None else len(v.shape))
        for v in [*inputs, *graph.outputs]
    ]


def same_interface(before: list[tuple], after: list[tuple]) -> bool:
    """Equal names and types; ranks equal where both are known (inference may learn a rank)."""
    return len(before) == len(after) and all(
        (name, type_) == (name2, type2) and (rank is None or rank2 is None or rank == rank2)
        for (name, type_, rank), (name2, type2, rank2) in zip(before, after)
    )


def groups(passes: Sequence[OptPass]) -> list[list[OptPass]]:
    """Consecutive fixed-point passes form one group that is repeated until nothing changes."""
    out: list[list[OptPass]] = []
    for p in passes:
        if p.fixed_point and out and out[-1][-1].fixed_point:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def run(
    model: ir.Model | str | os.PathLike,
    passes: Sequence[OptPass | str],
    *,
    max_rounds: int = MAX_ROUNDS,
    on_pass: Callable[[OptPass], None] | None = None,
    context: RunContext | None = None,
) -> tuple[ir.Model, RunReport]:
    """Run ``passes`` (objects or names such as ``"fold(size_limit=1024)"``) on ``model`` in place,
    unchecked (``onnxopt.optimize`` checks). ``context`` is what passes read with ``run_context()``.

    Returns the optimized model and a report of the time, the changes and the findings of every pass.
    """
    with using(context or RunContext()):
        return _run(model, passes, max_rounds, on_pass)


def _run(model, passes, max_rounds, on_pass) -> tuple[ir.Model, RunReport]:
    passes = [as_pass(p) for p in passes]
    if not isinstance(model, ir.Model):
        model = io.load(model)
    annotated = _annotated(model)
    start = time.perf_counter()
    before = Stats.of(model)
    records = {id(p): PassRecord(repr(p)) for p in passes}
    expected = signature(model)
    current = before
    for group in groups(passes):
        # Cycle through the group until every pass but the last one to change the model has run
        # without changing it (a pass reaches its own fixed point in one call).
        quiet, settled = 0, max(1, len(group) - 1)
        limit = len(group) * (max_rounds if group[0].fixed_point else 1)
        for step in range(limit):
            p = group[step % len(group)]
            if on_pass:
                on_pass(p)
            t = time.perf_counter()
            result = _apply(p, model)
            seconds = time.perf_counter() - t
            after = Stats.of(model)
            records[id(p)].add(seconds, result, current.delta(after))
            current = after
            if not same_interface(expected, signature(model)):
                raise CheckFailed(
                    f"pass {p!r} changed the model's inputs or outputs; refusing its result"
                )
            quiet = 0 if result.modified else quiet + 1
            if quiet >= settled and step + 1 >= len(group):
                break
    _drop_inferred_shapes(model, annotated)
    report = RunReport(before, current, list(records.values()), time.perf_counter() - start)
    return model, report


def _intermediates(model: ir.Model):
    """Values computed inside the graphs (not any graph's inputs or outputs), subgraphs included."""
    for graph in model.graphs():
        ends = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in graph:
            yield from (v for v in node.outputs if id(v) not in ends)


def _annotated(model: ir.Model) -> set[str]:
    return {v.name for v in _intermediates(model) if v.shape is not None or v.type is not None}


def _drop_inferred_shapes(model: ir.Model, annotated: set[str]) -> None:
    """Write no value_info the input model did not have. Passes infer shapes to do their work, but
    shapes in the file change what onnxruntime fuses: with them it turns MiniLM's 12 residual
    Add + LayerNormalization pairs into SkipLayerNormalization, whose CPU kernel took 7.97 ms against
    0.84 ms for Add + Add + LayerNormalization at [32, 64, 384] (onnxruntime 1.32, 2 threads, AVX2): the
    default `run` output measured 0.821x its input, 1.018x without the inferred shapes."""
    for value in _intermediates(model):
        if value.name not in annotated:
            value.shape = None
            value.type = None


def _apply(p: OptPass, model: ir.Model) -> ir.passes.PassResult:
    try:
        return p(model)
    except OnnxoptError:
        raise
    except Exception as e:  # onnx-ir's pass machinery wraps the pass's own exception
        raise InternalError(f"pass {p.name}", e.__cause__ or e) from e
