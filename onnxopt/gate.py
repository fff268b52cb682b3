"""The CI gate: evaluate every goal of a policy for a candidate against its reference, and report.

Reports: JSON for machines, Markdown for a pull-request comment, JUnit XML (one testcase per goal)
for CI systems.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from onnxopt import bench, inputs, io, validate
from onnxopt.errors import CheckFailed
from onnxopt.policy import Policy


@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: str
    passed: bool


@dataclasses.dataclass
class GateResult:
    reference: str
    candidate: str
    policy: str
    goals: list[Goal]
    notices: list[str]
    timings: list[bench.Timing]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.goals)

    @property
    def failed(self) -> list[Goal]:
        return [g for g in self.goals if not g.passed]

    def failure(self) -> CheckFailed:
        """The error a failed gate raises (exit 1)."""
        return CheckFailed(f"gate failed: {', '.join(g.name for g in self.failed)}")

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "policy": self.policy,
            "passed": self.passed,
            "goals": [dataclasses.asdict(g) for g in self.goals],
            "notices": self.notices,
            "bench": [t.to_dict() for t in self.timings],
        }


def evaluate(
    policy: Policy,
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    on_progress: Callable[..., None] | None = None,
) -> GateResult:
    """Measure what the policy's goals need (accuracy, latency, size) and judge each goal.

    ``on_progress(steps, what, total=None)`` follows the work: samples compared, then timed runs."""
    progress = on_progress or (lambda steps, what, total=None: None)
    goals, notices, timings = [], [], []
    model = io.load(reference)
    io.load(candidate)
    if policy.has_accuracy:
        checked = validate.validate(
            reference,
            candidate,
            policy.inputs,
            policy.compare,
            policy.accuracy,
            tolerance=False,
            threads=policy.bench.threads,
            model=model,
            on_batch=lambda n, total=None: progress(n, "accuracy", total),
        )
        notices += checked.notices
        goals += [
            Goal(f"accuracy.{v.metric}[{v.output}]", v.target, v.measured, v.passed)
            for v in checked.verdicts
        ]
    if policy.latency:
        feeds = inputs.first_batch(policy.inputs, model, notices, reference)
        runs = (
            None
            if policy.bench.seconds is not None
            else (policy.bench.iters or 100) * len(policy.latency)
        )
        progress(0, "latency", runs)
        timings = bench.bench(
            [reference, candidate],
            feeds,
            [g.ep for g in policy.latency],
            policy.bench,
            lambda steps, ep: progress(steps, f"latency on {ep}"),
        )
        goals += _latency_goals(policy, timings)
    goals += _size_goals(policy, io.file_size(reference), io.file_size(candidate))
    return GateResult(
        str(reference), str(candidate), policy.source, goals, list(dict.fromkeys(notices)), timings
    )


def _latency_goals(policy: Policy, timings: list[bench.Timing]) -> list[Goal]:
    goals = []
    for goal in policy.latency:
        ref, cand = (t for t in timings if t.ep == goal.ep)
        base, got = ref.stat(goal.percentile), cand.stat(goal.percentile)
        speedup, where = base / got, f"latency.{goal.ep}.{goal.percentile}"
        measured = f"{got:.3f} ms vs {base:.3f} ms"
        if goal.min_speedup is not None:
            goals.append(
                Goal(
                    f"{where}.min_speedup",
                    f">= {goal.min_speedup:g}x",
                    f"{speedup:.3f}x ({measured})",
                    speedup >= goal.min_speedup,
                )
            )
        if goal.max_regression_pct is not None:
            regression = (got / base - 1) * 100
            goals.append(
                Goal(
                    f"{where}.max_regression_pct",
                    f"<= {goal.max_regression_pct:g}%",
                    f"{regression:+.1f}% ({measured})",
                    regression <= goal.max_regression_pct,
                )
            )
    return goals


def _size_goals(policy: Policy, ref_bytes: int, cand_bytes: int) -> list[Goal]:
    goals, size = [], policy.size
    if size.max_mb is not None:
        goals.append(
            Goal(
                "size.max_mb",
                f"<= {size.max_mb:g} MB",
                f"{cand_bytes / 1e6:.2f} MB",
                cand_bytes / 1e6 <= size.max_mb,
            )
        )
    if size.min_reduction_pct is not None:
        reduction = (1 - cand_bytes / ref_bytes) * 100
        goals.append(
            Goal(
                "size.min_reduction_pct",
                f">= {size.min_reduction_pct:g}%",
                f"{reduction:.1f}% ({ref_bytes / 1e6:.2f} -> {cand_bytes / 1e6:.2f} MB)",
                reduction >= size.min_reduction_pct,
            )
        )
    return goals


def write_json(result: GateResult, path: str | os.PathLike) -> None:
    io.write_text(path, io.to_json(result.to_dict()))


def markdown(result: GateResult) -> str:
    verdict = (
        "passed" if result.passed else f"failed ({len(result.failed)} of {len(result.goals)} goals)"
    )
    lines = [
        f"### onnxopt gate: {verdict}",
        "",
        f"`{Path(result.candidate).name}` against `{Path(result.reference).name}`, policy `{result.policy}`",
        "",
        "| goal | target | measured | result |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{g.name}` | {g.target} | {g.measured} | {'✅ pass' if g.passed else '❌ FAIL'} |"
        for g in result.goals
    ]
    lines += [""] + [f"- note: {n}" for n in result.notices]
    return "\n".join(lines).rstrip() + "\n"


def junit(result: GateResult) -> str:
    suite = ET.Element(
        "testsuite",
        name="onnxopt.check",
        tests=str(len(result.goals)),
        failures=str(len(result.failed)),
        errors="0",
        skipped="0",
    )
    for goal in result.goals:
        kind = goal.name.split(".")[0]
        case = ET.SubElement(suite, "testcase", classname=f"onnxopt.check.{kind}", name=goal.name)
        if not goal.passed:
            failure = ET.SubElement(
                case,
                "failure",
                message=f"{goal.name}: measured {goal.measured}, target {goal.target}",
            )
            failure.text = f"candidate {result.candidate}\nreference {result.reference}\n"
    root = ET.Element("testsuites", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(
    result: GateResult, *, json_path=None, markdown_path=None, junit_path=None
) -> None:
    if json_path:
        write_json(result, json_path)
    if markdown_path:
        io.write_text(markdown_path, markdown(result))
    if junit_path:
        io.write_text(junit_path, junit(result))
