"""Human-readable tables for the CLI (rich); plain text when stdout is not a terminal."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt.compare import OutputComparison
from onnxopt.passbase import Column
from onnxopt.pipeline import RunReport

if TYPE_CHECKING:
    from onnxopt.bench import Timing
    from onnxopt.gate import GateResult
    from onnxopt.validate import Validation, Verdict


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_count(n: int) -> str:
    return f"{n:,}"


def _delta(before: float, after: float, fmt=human_count) -> str:
    change = after - before
    if not change:
        return ""
    sign = "+" if change > 0 else "-"
    pct = f" ({change / before:+.1%})" if before else ""
    return f"{sign}{fmt(abs(change))}{pct}"


def run_tables(
    report: RunReport, size_before: int | None = None, size_after: int | None = None
) -> list[Table]:
    b, a = report.before, report.after
    summary = Table(title="model", title_justify="left")
    for col in ("", "before", "after", "change"):
        summary.add_column(col, justify="right" if col else "left")
    rows = [
        ("nodes", b.nodes, a.nodes, human_count),
        ("initializers", b.initializers, a.initializers, human_count),
        ("parameters", b.params, a.params, human_count),
        ("tensor bytes", b.tensor_bytes, a.tensor_bytes, human_bytes),
    ]
    if size_before is not None and size_after is not None:
        rows.append(("file size", size_before, size_after, human_bytes))
    for name, x, y, fmt in rows:
        summary.add_row(name, fmt(x), fmt(y), _delta(x, y, fmt))

    ops = Table(title="nodes by op type", title_justify="left")
    for col in ("op", "before", "after", "change"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    names = sorted(set(b.ops) | set(a.ops), key=lambda k: (-b.ops.get(k, 0), k))
    for op in names:
        x, y = b.ops.get(op, 0), a.ops.get(op, 0)
        ops.add_row(op, str(x), str(y), _delta(x, y))

    passes = Table(title=f"passes ({report.seconds:.2f} s)", title_justify="left")
    for col in ("pass", "rounds", "time", "nodes", "initializers", "parameters", "tensor bytes"):
        passes.add_column(col, justify="left" if col == "pass" else "right")
    for rec in report.passes:
        d = rec.delta
        passes.add_row(
            rec.name,
            str(rec.rounds),
            f"{rec.seconds:.3f} s",
            _signed(d.get("nodes", 0)),
            _signed(d.get("initializers", 0)),
            _signed(d.get("params", 0)),
            _signed(d.get("tensor_bytes", 0), human_bytes),
        )
    return [summary, ops, passes]


def _signed(n: int, fmt=human_count) -> str:
    return "0" if not n else ("+" if n > 0 else "-") + fmt(abs(n))


def comparison_table(results: list[OutputComparison], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("output", "max abs", "max rel", "cosine", "result"):
        table.add_column(col, justify="left" if col in ("output", "result") else "right")
    for r in results:
        _add(
            table,
            r.name,
            f"{r.max_abs:.3g}",
            f"{r.max_rel:.3g}",
            f"{r.cosine:.6f}",
            ("ok" if r.passed else "FAIL") + (f" ({r.detail})" if r.detail else ""),
        )
    return table


def _table(title: str, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    table = Table(title=escape(title), title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def _add(table: Table, *cells: str) -> None:
    """A row of plain text: names such as 'logits[0]' are not rich markup."""
    table.add_row(*(escape(c) for c in cells))


def _opt(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def validation_table(result: Validation, title: str) -> Table:
    table = _table(
        title,
        [
            "output",
            "max abs",
            "mean abs",
            "p99 abs",
            "max rel",
            "cosine",
            "cos min",
            "SNR dB",
            "top1",
            "topk",
        ],
        left=("output",),
    )
    for r in result.results:
        if r.detail:
            _add(table, r.name, *["-"] * 8, r.detail)
            continue
        topk = f"{r.topk:.4f} (k={r.k})" if r.topk is not None else "-"
        snr = "inf" if math.isinf(r.snr_db) else f"{r.snr_db:.1f}"
        _add(
            table,
            r.name,
            f"{r.max_abs:.3g}",
            f"{r.mean_abs:.3g}",
            f"{r.p99_abs:.3g}",
            f"{r.max_rel:.3g}",
            f"{r.cosine:.6f}",
            f"{r.cosine_min:.6f}",
            snr,
            _opt(r.top1),
            topk,
        )
    return table


def verdict_table(verdicts: list[Verdict]) -> Table:
    table = _table(
        "checks",
        ["output", "check", "target", "measured", "result"],
        left=("output", "check", "result"),
    )
    for v in verdicts:
        _add(table, v.output, v.metric, v.target, v.measured, "ok" if v.passed else "FAIL")
    return table


def error_histogram(r: OutputComparison, width: int = 40) -> str:
    """Absolute errors of one output by decade, as text bars."""
    top = max(n for _, _, n in r.histogram)
    lines = [f"absolute errors of {r.name}:"]
    for lo, hi, n in r.histogram:
        label = "0" if hi == 0 else f"[{lo:.0e}, {hi:.0e})"
        lines.append(f"  {label:>16} {'#' * max(1, round(width * n / top)):<{width}} {n}")
    return "\n".join(lines)


def bench_table(timings: list[Timing], title: str) -> Table:
    table = _table(
        title,
        [
            "model",
            "ep",
            "batch",
            "mean",
            "std",
            "p50",
            "p90",
            "p99",
            "samples/s",
            "speedup",
            "session s",
            "first run ms",
            "size",
            "RSS MB",
        ],
        left=("model", "ep"),
    )
    for t in timings:
        _add(
            table,
            t.model,
            t.ep,
            str(t.batch),
            *(f"{t.stat(s):.3f}" for s in ("mean", "std", "p50", "p90", "p99")),
            f"{t.throughput:.1f}",
            f"{t.speedup:.3f}x",
            f"{t.session_s:.3f}",
            f"{t.first_run_ms:.2f}",
            human_bytes(t.size_bytes),
            _opt(t.rss_mb, ".0f"),
        )
    return table


def profile_tables(profiles: list, top: int = 20) -> list[Table]:
    """Kernel time per run (ms) by op type, then by scope (the ``top`` scopes whose time differs
    most from the first model's), the models side by side."""
    names = [Path(p.model).name for p in profiles]
    ops = [p.by_op() for p in profiles]
    by_op = _table("kernel time by op type, ms per run (kernels)", ["op", *names], left=("op",))
    for op in sorted(set().union(*ops), key=lambda o: -max(d.get(o, (0, 0))[1] for d in ops)):
        _add(by_op, op, *(f"{d[op][1] / 1e3:.3f} ({d[op][0]})" if op in d else "-" for d in ops))
    _add(by_op, "total", *(f"{p.total_us / 1e3:.3f}" for p in profiles))
    scopes = [p.by_scope() for p in profiles]
    first = scopes[0]
    spread = sorted(  # by how much they differ from the first model, then by time
        set().union(*scopes),
        key=lambda s: (
            -max(abs(d.get(s, 0.0) - first.get(s, 0.0)) for d in scopes),
            -max(d.get(s, 0.0) for d in scopes),
        ),
    )
    which = f"that differ most from {names[0]}" if len(profiles) > 1 else "slowest"
    by_scope = _table(
        f"kernel time by scope, ms per run (the {top} {which})",
        ["scope", *names],
        left=("scope",),
    )
    for scope in spread[:top]:
        _add(by_scope, scope or "(no scope)", *(_opt(d.get(scope, 0) / 1e3, ".3f") for d in scopes))
    return [by_op, by_scope]


def layer_table(
    title: str, columns: tuple[Column, ...], rows: list[dict], limit: int = 40
) -> Table:
    """A pass's layer rows in graph order, in the columns the pass declares (those with a value in
    some row) and their SQNR; past ``limit`` rows, only the ``limit`` of lowest SQNR."""
    shown = rows
    if len(rows) > limit:
        worst = sorted(range(len(rows)), key=lambda i: _sqnr(rows[i]))[:limit]
        shown = [rows[i] for i in sorted(worst)]
    used = [c for c in (*columns, SQNR_COLUMN) if any(r.get(c.key) is not None for r in rows)]
    text = {c.header for c in used if all(isinstance(r.get(c.key), str | None) for r in rows)}
    table = _table(title, [c.header for c in used], left=tuple(text))
    for r in shown:
        _add(table, *(_cell(c, r) for c in used))
    if len(rows) > limit:
        table.caption, table.caption_justify = (
            f"{len(rows) - limit} more layers, of higher SQNR, in the report",
            "left",
        )
    return table


SQNR_COLUMN = Column("sqnr_db", "SQNR dB", ".1f")


def _cell(column: Column, row: dict) -> str:
    if callable(column.format):
        return column.format(row)
    value = row.get(column.key)
    return "-" if value is None else format(value, column.format) if column.format else str(value)


def _sqnr(row: dict) -> float:
    value = row.get("sqnr_db")
    return math.inf if value is None else value


def explain_table(title: str, rows: list[tuple]) -> Table:
    """A pass's explanation rows (named tuples), one column per field."""
    fields = list(rows[0]._fields) if rows else ["node"]
    table = _table(title, fields, left=tuple(fields))
    for row in rows:
        _add(table, *(str(value) for value in row))
    return table


def gate_table(result: GateResult) -> Table:
    verdict = "passed" if result.passed else f"FAILED {len(result.failed)} of {len(result.goals)}"
    table = _table(
        f"gate: {verdict}",
        ["goal", "target", "measured", "result"],
        left=("goal", "measured", "result"),
    )
    for g in result.goals:
        _add(table, g.name, g.target, g.measured, "ok" if g.passed else "FAIL")
    return table


def console() -> Console:
    """Rich on a terminal; wide plain text otherwise, so that logs keep whole table cells."""
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
