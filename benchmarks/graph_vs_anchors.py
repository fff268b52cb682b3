"""Compare onnxopt's graph passes (`fold,prune` and `fold,prune,fuse`) with onnxsim, onnxslim and
onnxruntime's offline BASIC optimizer.

Run in a scratch venv that has the anchors installed (never project dependencies):
    /tmp/anchors-venv/bin/python benchmarks/graph_vs_anchors.py [--models-dir DIR] [--json out.json]

For each model: node counts (top level; "(rec N)" when subgraphs add nodes), wall time of each tool,
and the max abs error of each tool's output model vs the original on one random input (ORT CPU,
graph optimizations disabled so only the tool's rewrite is checked). A failing tool is reported in its cell.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

MODELS = ["minilm-l6-v2", "ppocrv4-det", "ppocrv4-rec", "yolov8n-320"]
TOOLS = ["fold,prune", "fold,prune,fuse", "onnxsim", "onnxslim", "ort-basic"]
# Concrete shapes for the random check input; any other symbolic dim becomes 1.
SHAPES = {
    "minilm-l6-v2": {"*": [1, 16]},
    "ppocrv4-det": {"x": [1, 3, 320, 320]},
    "ppocrv4-rec": {"x": [1, 3, 48, 320]},
    "yolov8n-320": {"images": [1, 3, 320, 320]},
}
TMP = Path(tempfile.mkdtemp(prefix="anchors-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes in `graph`, recursing into subgraph attributes (If/Loop/Scan bodies)."""
    n = 0
    for node in graph.node:
        n += 1
        for a in node.attribute:
            n += count_nodes(a.g) if a.type == onnx.AttributeProto.GRAPH else 0
            n += sum(count_nodes(g) for g in a.graphs)
    return n


def make_inputs(model: onnx.ModelProto, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        shape = (
            SHAPES[name].get(vi.name)
            or SHAPES[name].get("*")
            or [d.dim_value or 1 for d in t.shape.dim]
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.integer):
            # token ids in [0, 1000); masks all ones and segment ids zero so the model stays in range
            if "mask" in vi.name:
                feeds[vi.name] = np.ones(shape, dtype)
            elif "type" in vi.name:
                feeds[vi.name] = np.zeros(shape, dtype)
            else:
                feeds[vi.name] = rng.integers(0, 1000, shape).astype(dtype)
        else:
            feeds[vi.name] = rng.random(shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto | str, feeds) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def max_abs_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    assert len(ref) == len(got), f"{len(got)} outputs, expected {len(ref)}"
    return max(
        float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)), initial=0.0))
        for r, g in zip(ref, got)
    )


# Each tool: (path, loaded ModelProto) -> (output ModelProto, top-level node count, core seconds, extra timings)
def tool_onnxopt(passes: str):
    def run(path: Path, model: onnx.ModelProto):
        import onnx_ir as ir

        import onnxopt  # ImportError -> "n/a"

        t = time.perf_counter()
        out, _report = onnxopt.run(str(path), passes.split(","))
        primary = time.perf_counter() - t
        pre = ir.load(str(path))
        t = time.perf_counter()
        onnxopt.run(pre, passes.split(","))
        extra = {"onnxopt_preloaded_s": time.perf_counter() - t}
        return ir.serde.serialize_model(out), len(list(out.graph)), primary, extra

    return run


def tool_onnxsim(path: Path, model: onnx.ModelProto):
    import onnxsim

    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = time.perf_counter()
    out, ok = onnxsim.simplify(m)
    core = time.perf_counter() - t
    t = time.perf_counter()
    onnx.save(onnxsim.simplify(onnx.load(str(path)))[0], str(TMP / "sim.onnx"))
    return (
        out,
        len(out.graph.node),
        core,
        {"load_simplify_save_s": time.perf_counter() - t, "check_ok": ok},
    )


def tool_onnxslim(path: Path, model: onnx.ModelProto):
    import onnxslim

    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = time.perf_counter()
    out = onnxslim.slim(m)
    core = time.perf_counter() - t
    t = time.perf_counter()
    onnxslim.slim(str(path), str(TMP / "slim.onnx"))
    return out, len(out.graph.node), core, {"load_slim_save_s": time.perf_counter() - t}


def tool_ort_basic(path: Path, model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(TMP / "ort_basic.onnx")
    t = time.perf_counter()
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    core = time.perf_counter() - t
    out = onnx.load(so.optimized_model_filepath)
    return out, len(out.graph.node), core, {}


RUNNERS = {
    "fold,prune": tool_onnxopt("fold,prune"),
    "fold,prune,fuse": tool_onnxopt("fold,prune,fuse"),
    "onnxsim": tool_onnxsim,
    "onnxslim": tool_onnxslim,
    "ort-basic": tool_ort_basic,
}


def versions() -> dict[str, str]:
    v = {}
    for pkg in ["onnxopt", "onnxsim", "onnxslim", "onnxruntime", "onnx", "onnx-ir", "numpy"]:
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            try:  # importable but not installed (e.g. on PYTHONPATH)
                v[pkg] = getattr(__import__(pkg.replace("-", "_")), "__version__", "n/a")
            except ImportError:
                v[pkg] = "n/a"
    return v


def bench_model(path: Path, name: str) -> dict:
    model = onnx.load(str(path))
    res = {
        "original": {
            "nodes": len(model.graph.node),
            "nodes_rec": count_nodes(model.graph),
            "nodes_no_const": sum(n.op_type != "Constant" for n in model.graph.node),
        }
    }
    feeds = make_inputs(model, name)
    ref = run_ort(str(path), feeds)
    for tool, fn in RUNNERS.items():
        r: dict = {}
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
                out, nodes, secs, extra = fn(path, model)
            r.update(
                nodes=nodes,
                nodes_rec=count_nodes(out.graph),
                time_s=secs,
                **extra,
                nodes_no_const=sum(n.op_type != "Constant" for n in out.graph.node),
            )
            try:
                r["max_abs_err"] = max_abs_err(ref, run_ort(out, feeds))
            except Exception as e:  # noqa: BLE001 - report, don't stop
                r["check_error"] = f"{type(e).__name__}: {e}"
        except ImportError as e:
            r["error"] = "n/a" if tool.startswith("fold") else f"ImportError: {e}"
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"
        res[tool] = r
    return res


def cell(r: dict, key: str) -> str:
    if "error" in r:
        return (
            r["error"]
            if r["error"] == "n/a"
            else "ERR " + r["error"][:60].replace("|", "/").replace("\n", " ")
        )
    if key == "nodes_no_const":
        return str(r[key])
    if key == "nodes":
        return str(r["nodes"]) + (
            f" (rec {r['nodes_rec']})" if r["nodes_rec"] != r["nodes"] else ""
        )
    if key == "max_abs_err":
        return (
            f"{r['max_abs_err']:.2e}"
            if "max_abs_err" in r
            else "ERR " + r.get("check_error", "?")[:60].replace("|", "/")
        )
    v = r.get(key)
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "models"
    )
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()

    vers = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "\n")
    results = {}
    for name in args.models:
        results[name] = bench_model(args.models_dir / f"{name}.onnx", name)

    print(
        "| model | original | "
        + " | ".join(TOOLS)
        + " | "
        + " | ".join(f"t {t} (s)" for t in TOOLS)
        + " |"
    )
    print("|---" * (2 + 2 * len(TOOLS)) + "|")
    for name, res in results.items():
        o = res["original"]
        orig = str(o["nodes"]) + (
            f" (rec {o['nodes_rec']})" if o["nodes_rec"] != o["nodes"] else ""
        )
        print(
            f"| {name} | {orig} | "
            + " | ".join(cell(res[t], "nodes") for t in TOOLS)
            + " | "
            + " | ".join(cell(res[t], "time_s") for t in TOOLS)
            + " |"
        )

    print(
        "\nMax abs error vs original (one random input, ORT CPU, no ORT graph opts) and secondary timings (s):\n"
    )
    print(
        "| model | "
        + " | ".join(f"err {t}" for t in TOOLS)
        + " | onnxopt preloaded IR (fold,prune,fuse) | onnxsim load+simplify+save | onnxslim load+slim+save |"
    )
    print("|---" * (1 + len(TOOLS) + 3) + "|")
    for name, res in results.items():
        print(
            f"| {name} | "
            + " | ".join(cell(res[t], "max_abs_err") for t in TOOLS)
            + " | "
            + " | ".join(
                cell(res[t], k)
                for t, k in [
                    ("fold,prune,fuse", "onnxopt_preloaded_s"),
                    ("onnxsim", "load_simplify_save_s"),
                    ("onnxslim", "load_slim_save_s"),
                ]
            )
            + " |"
        )

    print(
        "\nTop-level node counts excluding Constant nodes (onnxsim keeps folded values as Constant nodes by default):\n"
    )
    print("| model | original | " + " | ".join(TOOLS) + " |")
    print("|---" * (2 + len(TOOLS)) + "|")
    for name, res in results.items():
        print(
            f"| {name} | "
            + " | ".join(cell(res[t], "nodes_no_const") for t in ["original", *TOOLS])
            + " |"
        )

    if args.json:
        args.json.write_text(
            json.dumps({"versions": vers, "results": results}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
