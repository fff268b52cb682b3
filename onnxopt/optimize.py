"""``onnxopt.optimize``: everything ``onnxopt run`` does, as one Python call.

    model -> passes (pipeline.run) -> check against the input (compare) -> gate (gate) -> save (io)

The input is never modified: the check runs the input model's file and a staged copy of the
output, and the output is renamed into place only once the check and the gate have passed. An
exact pass that changes outputs, or a lossy one that loses more than its fidelity budget, raises
``CheckFailed`` (the CLI's exit 1) and writes nothing; bad input raises ``UsageError`` (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import bench, compare, gate, inputs, io, layer_error, pipeline, policy
from onnxopt.compare import OutputComparison
from onnxopt.errors import CheckFailed, OnnxoptError, UsageError
from onnxopt.passbase import OptPass, RunContext, as_pass
from onnxopt.pipeline import PassRecord, RunReport

SPEEDUP_ITERS = 30  # timed runs per model for the report's speedup


@dataclasses.dataclass
class Report:
    """What a run did and measured: the passes' changes and findings, the check, the gate, sizes,
    and (with ``measure=True``) per-layer SQNR and the speedup on the check's inputs."""

    input: str
    output: str | None
    passes: list[str]
    run: RunReport
    notices: list[str] = dataclasses.field(default_factory=list)
    check: list[OutputComparison] = dataclasses.field(default_factory=list)
    check_title: str = ""
    gate: gate.GateResult | None = None
    size_before: int = 0
    size_after: int = 0
    totals: dict = dataclasses.field(default_factory=dict)

    @property
    def records(self) -> list[PassRecord]:
        return self.run.passes

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "passes": self.passes,
            "size_before": self.size_before,
            "size_after": self.size_after,
            **self.run.to_dict(),
            "check": [r.__dict__ for r in self.check],
            **({"gate": self.gate.to_dict()} if self.gate else {}),
            "layers": [{"pass": r.name, "layers": r.rows} for r in self.records if r.rows],
            "totals": {
                "size_before": self.size_before,
                "size_after": self.size_after,
                **self.totals,
            },
        }


def optimize(
    model: str | os.PathLike | ir.Model,
    passes: Sequence[OptPass | str] = pipeline.DEFAULT_PASSES,
    *,
    output: str | os.PathLike | None = None,
    check: bool = True,
    inputs: str | os.PathLike | None = None,
    shapes: dict[str, list[int]] | None = None,
    gate: str | os.PathLike | policy.Policy | None = None,
    keep_failed: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    external_data: bool | None = None,
    measure: bool = False,
    on_pass: Callable[[OptPass], None] | None = None,
) -> tuple[ir.Model, Report]:
    """Optimize ``model`` (a path, or an in-memory model that is left untouched) with ``passes``,
    check the result against it on ``inputs`` (real samples: .npz or folder) or on generated inputs
    of ``shapes`` (else shapes found to run), gate it with ``gate`` (a policy file or object), and
    write it atomically to ``output`` when given. Returns the optimized model and its Report.

    Raises ``CheckFailed`` when the check or the gate fails (the Report is on the exception's
    ``report``; with ``keep_failed`` a failed gate still writes the output), ``UsageError`` for bad input.
    """
    passes = [as_pass(p) for p in passes]
    gate_policy = policy.load(gate) if isinstance(gate, str | os.PathLike) else gate
    with _input_file(model) as source:
        graph = io.load(source)
        if output is not None:
            io.check_output_path(output, source)
        notices: list[str] = []
        samples = _samples(graph, source, shapes or {}, inputs, notices) if check or measure else []
        context = RunContext(shapes=dict(shapes or {}), samples=tuple(samples))
        graph, run_report = pipeline.run(graph, passes, on_pass=on_pass, context=context)
        report = Report(
            str(source),
            None if output is None else str(output),
            [repr(p) for p in passes],
            run_report,
            notices,
        )
        with _staged(graph, output, external_data) as staged:
            report.size_before, report.size_after = io.file_size(source), io.file_size(staged)
            if check:
                _check(report, source, staged, samples, passes, atol, rtol)
            gate_failed = _gate(report, gate_policy, source, staged, output, keep_failed)
            if measure:
                _measure(report, source, staged, samples[0] if samples else None)
    if gate_failed:
        raise gate_failed
    return graph, report


@contextlib.contextmanager
def _input_file(model):
    """The input model's file: the path given, or a temporary copy of an in-memory model (saved
    before any pass touches it, so the check has its original to compare with)."""
    if not isinstance(model, ir.Model):
        yield Path(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-input-") as folder:
        yield io.save(model.clone(), Path(folder, "input.onnx"))


@contextlib.contextmanager
def _staged(graph: ir.Model, output, external_data):
    """The output written where the check can run it: staged beside ``output`` (renamed into place
    when the block succeeds), or in a temporary folder when there is no output."""
    if output is not None:
        with io.staged_save(graph, output, external_data=external_data) as staged:
            yield staged
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-output-") as folder:
        yield io.save(graph, Path(folder, "output.onnx"), external_data=external_data)


def _samples(graph: ir.Model, source: Path, shapes: dict, data, notices: list[str]) -> list[dict]:
    """The inputs of the check, found before the passes run so that a model nothing runs fails fast:
    the user's samples, or one generated sample of shapes that run the input model (noted)."""
    if data is not None:
        found = list(inputs.InputSpec(data=Path(data)).batches(graph, notices))
        if not found:
            raise UsageError(f"--inputs {data}: no samples")
        return found
    return [inputs.first_batch(inputs.InputSpec(shapes=dict(shapes)), graph, notices, source)]


def _check(report: Report, source, staged, samples, passes, atol, rtol) -> None:
    results = compare.compare_models(source, staged, samples, atol=atol, rtol=rtol)
    report.check = results
    lossy = not all(p.exact for p in passes)
    budget = fidelity_budget(report.records)
    if budget:
        for r in results:
            r.passed = r.cosine >= budget[0]
        report.check_title = f"check (cosine >= {budget[0]:g}, the budget of {budget[1]})"
    else:
        report.check_title = f"check (atol {atol:g}, rtol {rtol:g})"
    try:
        if not lossy:
            compare.require_equivalent(results, f"{source}: the passes were meant to be exact")
        elif budget:
            compare.require_fidelity(results, *budget)
    except CheckFailed as e:
        e.report = report
        raise


def fidelity_budget(records: list[PassRecord]) -> tuple[float, str] | None:
    """The strictest fidelity budget the lossy passes returned, and the pass that set it."""
    budgets = [(r.fidelity, r.name) for r in records if r.fidelity is not None]
    return max(budgets) if budgets else None


def _gate(
    report: Report, gate_policy, source, staged, output, keep_failed: bool
) -> CheckFailed | None:
    if gate_policy is None:
        return None
    result = gate.evaluate(gate_policy, source, staged)
    result.candidate = str(output or staged)
    report.gate = result
    report.notices += [n for n in result.notices if n not in report.notices]
    if result.passed:
        return None
    failure = result.failure()
    failure.report = report
    if not keep_failed:
        raise failure
    return failure


def _measure(report: Report, source, staged, feeds: dict[str, np.ndarray] | None) -> None:
    """Per-layer SQNR of every pass's rows against the input model, and the speedup of the output."""
    rows = [row for record in report.records for row in record.rows]
    try:
        layer_error.attach_sqnr(rows, source, staged, feeds)
    except OnnxoptError as e:
        report.notices.append(f"no per-layer SQNR in the report: {e}")
        for row in rows:
            row["sqnr_db"] = None
    try:
        before, after = bench.bench(
            [source, staged], feeds, settings=bench.Settings(iters=SPEEDUP_ITERS, warmup=3)
        )
    except OnnxoptError as e:
        report.notices.append(f"no speedup in the report: {e}")
        report.totals["speedup"] = None
        return
    report.totals.update(
        p50_ms_before=before.stat("p50"), p50_ms_after=after.stat("p50"), speedup=after.speedup
    )
