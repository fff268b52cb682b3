"""Human-readable tables for the CLI (rich); plain text when stdout is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from onnxopt.compare import OutputComparison
from onnxopt.pipeline import RunReport


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


def run_tables(report: RunReport, size_before: int | None = None, size_after: int | None = None) -> list[Table]:
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
            rec.name, str(rec.rounds), f"{rec.seconds:.3f} s",
            _signed(d.get("nodes", 0)), _signed(d.get("initializers", 0)),
            _signed(d.get("params", 0)), _signed(d.get("tensor_bytes", 0), human_bytes),
        )
    return [summary, ops, passes]


def _signed(n: int, fmt=human_count) -> str:
    return "0" if not n else ("+" if n > 0 else "-") + fmt(abs(n))


def comparison_table(results: list[OutputComparison], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("output", "max abs", "max rel", "cosine", "result"):
        table.add_column(col, justify="left" if col in ("output", "result") else "right")
    for r in results:
        table.add_row(r.name, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.cosine:.6f}", ("ok" if r.passed else "FAIL") + (f" ({r.detail})" if r.detail else ""))
    return table


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)
