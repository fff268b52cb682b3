"""Validation: a candidate model against its reference on the same inputs, with pass/fail bounds."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import onnx_ir as ir

from onnxopt import compare, io, runtime
from onnxopt.compare import OutputComparison, Settings
from onnxopt.errors import CheckFailed, OnnxoptError, UsageError, one_line
from onnxopt.inputs import InputSpec


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Metric bounds for one output. ``min_cosine`` is on the mean over samples."""

    min_cosine: float | None = None
    min_snr: float | None = None
    min_top1: float | None = None
    max_abs_error: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in dataclasses.asdict(self).values())

    def merged(self, override: Bounds) -> Bounds:
        return Bounds(
            **{
                k: v if v is not None else getattr(self, k)
                for k, v in dataclasses.asdict(override).items()
            }
        )


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One bound (or the tolerance check) evaluated on one output."""

    output: str
    metric: str
    target: str
    measured: str
    passed: bool


_MEASURES = {
    "min_cosine": (lambda r: r.cosine, ">="),
    "min_snr": (lambda r: r.snr_db, ">="),
    "min_top1": (lambda r: r.top1, ">="),
    "max_abs_error": (lambda r: r.max_abs, "<="),
}


def judge(
    result: OutputComparison, bounds: Bounds, tolerance: bool, settings: Settings
) -> list[Verdict]:
    """The verdicts of ``bounds`` on ``result``, and of the atol/rtol check when ``tolerance``."""
    out = []
    if result.detail:
        return [Verdict(result.name, "output", "comparable", result.detail, False)]
    if tolerance:
        atol, rtol = settings.tolerances(result.name)
        out.append(
            Verdict(
                result.name,
                "tolerance",
                f"atol {atol:g}, rtol {rtol:g}",
                f"max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g}",
                result.passed,
            )
        )
    for key, value in dataclasses.asdict(bounds).items():
        if value is None:
            continue
        measure, op = _MEASURES[key]
        got = measure(result)
        if got is None:
            out.append(
                Verdict(
                    result.name, key, f"{op} {value:g}", "n/a (not class scores; set --topk)", False
                )
            )
            continue
        passed = got >= value if op == ">=" else got <= value
        out.append(
            Verdict(
                result.name,
                key,
                f"{op} {value:g}",
                f"{got:.6g}",
                bool(passed and not math.isnan(got)),
            )
        )
    return out


@dataclasses.dataclass
class Validation:
    results: list[OutputComparison]
    verdicts: list[Verdict]
    notices: list[str]
    samples: int

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)


def validate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    spec: InputSpec | None = None,
    settings: Settings | None = None,
    bounds: dict[str, Bounds] | None = None,
    *,
    tolerance: bool = True,
    ep: str = "cpu",
    threads: int = 0,
    on_batch: Callable[..., None] | None = None,
    model: ir.Model | None = None,
) -> Validation:
    """Run both models on the inputs of ``spec`` and judge every output.

    ``bounds`` maps output names ('' for every output) to metric bounds; ``tolerance`` adds the
    atol/rtol check of ``settings``. The candidate must keep the reference's output names.
    ``on_batch(samples, total=None)`` is told the number of samples first, then each batch's.
    ``model`` is the loaded reference, when the caller has it.
    """
    spec, settings, bounds = spec or InputSpec(), settings or Settings(), bounds or {}
    model = model or io.load(reference)
    io.load(candidate)
    _check_names(model, settings, bounds)
    if on_batch:
        on_batch(0, total=spec.count(model))
    ref_sess = _session(reference, ep, threads, UsageError, "the reference model")
    cand_sess = _session(candidate, ep, threads, CheckFailed, "the candidate model")
    notices: list[str] = []
    settings = compare.low_precision_floors(settings, ref_sess)
    results = compare.compare_sessions(
        ref_sess, cand_sess, spec.batches(model, notices, reference), settings, on_batch
    )
    everyone = bounds.get("", Bounds())
    verdicts = [
        v
        for r in results
        for v in judge(r, everyone.merged(bounds.get(r.name, Bounds())), tolerance, settings)
    ]
    return Validation(results, verdicts, notices, max((r.samples for r in results), default=0))


def _check_names(model: ir.Model, settings: Settings, bounds: dict[str, Bounds]) -> None:
    """Refuse, before any run, options that name outputs or inputs the reference does not have."""
    outputs = {v.name for v in model.graph.outputs}
    inputs = {v.name for v in model.graph.inputs}
    for option, table in (
        ("--atol", settings.atol),
        ("--rtol", settings.rtol),
        ("--topk", settings.topk),
        ("--mean-pool", settings.mean_pool),
        ("a bound", bounds),
    ):
        unknown = set(table) - outputs - {""}
        if unknown:
            raise UsageError(
                f"{option} names no output of the reference: {', '.join(sorted(unknown))}"
            )
    for output, mask in settings.mean_pool.items():
        if mask not in inputs:
            raise UsageError(
                f"--mean-pool {output}:{mask}: {mask} is not an input of the reference"
            )


def _session(path, ep: str, threads: int, error: type[OnnxoptError], what: str):
    try:
        return runtime.session(path, ep=ep, optimize=True, threads=threads)
    except OnnxoptError:
        raise
    except Exception as e:
        raise error(f"{what} does not load in onnxruntime ({one_line(e)})") from None
