"""Compare onnxopt's `slim` (structured pruning, issue 15) with onnxsim 0.8.1's structured Wanda
pruning on MiniLM and YOLOv8n, measured by the shared yardsticks: one yardstick run per model, so
every candidate is timed side by side with the original in one process.

Run in a scratch venv that has the anchors installed (never project dependencies):
    python -m venv /tmp/anchors-venv
    /tmp/anchors-venv/bin/pip install onnxsim==0.8.1 onnxruntime onnx numpy
    /tmp/anchors-venv/bin/python benchmarks/slim_vs_anchors.py [--ratios 0.1,0.2,0.25,0.3]
        [--only minilm|yolo] [--out /tmp/slim-anchors] [--shared ../shared]
        [--minilm-passes TEMPLATE] [--yolo-passes TEMPLATE] [--extra [MODEL:]NAME=PASSES ...]
        [--onnxsim-simplify] [--onnxopt-python python] [--onnxopt-src REPO]

Candidates, for each ratio R of `--ratios`:
- `onnxopt_slim_rR`: `onnxopt run MODEL --passes TEMPLATE -o OUT --quiet`, TEMPLATE defaulting to
  "slim(calib={calib},ratio={ratio})" for MiniLM (R of each FFN's neurons) and
  "slim(calib={calib},channels={ratio})" for YOLOv8n (R of the Conv blocks' MACs, allocated by
  measured sensitivity) ({calib}: the model's calibration .npz, {ratio}: R). The CLI
  runs under `--onnxopt-python` (default: the `python` on PATH, the one onnxopt is installed for),
  with this checkout's packages put first on its path (`--onnxopt-src`, default the repository this
  script is in; `--onnxopt-src ''` runs a plain `python -m onnxopt`), so the checkout is measured
  whatever the editable install points at.
- `onnxsim_wanda_rR`: `onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches,
  sparsity=R)`, in this process (the anchor venv). Its sparsity is the fraction of each matched
  producer -> consumer chain's output channels removed, ranked by ||W_row||_2 * ||X||_2 over the
  calibration batches, with no reconstruction of the consumer. It takes a list of batches, each a
  {input_name: array} dict; it gets the same calibration set as onnxopt, cut into 8 batches
  (`--onnxsim-batches`): MiniLM 8 x 16 sentences (all 128 of minilm_calib.npz), YOLOv8n 4 x 3 + 4 x 2
  images (all 20 of yolo_calib.npz). `--onnxsim-simplify` adds `onnxsim_simp_wanda_rR`: onnxsim.simplify
  first, then the same pruning.
- `--extra [minilm:|yolo:]NAME=PASSES` (repeatable): an onnxopt candidate NAME with any passes string
  ({calib} filled in as above), e.g. --extra 'slim_quant=slim(calib={calib}),quant'; without a
  model prefix it is made for both models.

A candidate that fails to build, to load in onnxruntime, or to keep the original's inputs and first
output shape is a "failed: ..." row and stays out of the yardstick run. Each model's section prints
the yardstick's lines verbatim, then a markdown table: speedup and fidelity from the yardstick;
MACs per sample of the MatMul/Gemm/Conv nodes with constant weights (MiniLM: per token, the sum of
K*N over MatMuls with a 2-D constant weight; YOLOv8n: shapes inferred at 1x3x320x320, Conv MACs =
output elements * (Cin/group) * kh * kw), MACs and parameters (constant float weights) relative to
the original; size on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
from onnx import shape_inference

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "slim(calib={calib},ratio={ratio})"  # MiniLM: R of each FFN's neurons
CONV_TEMPLATE = "slim(calib={calib},channels={ratio})"  # YOLOv8n: R of the Conv blocks' MACs
# Runs the onnxopt CLI from a source checkout (argv[1]): the checkout's onnxopt first on the path, and
# its passes/ folder found as onnxopt.passes (pyproject maps package onnxopt.passes to passes/).
BOOTSTRAP = """\
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
import onnxopt
onnxopt.__path__.append(src)
sys.argv[0] = "onnxopt"
runpy.run_module("onnxopt", run_name="__main__", alter_sys=True)
"""


@dataclass
class Bench:
    """One model: where it is, its calibration data, its yardstick and what to read from it."""

    name: str
    model: Path
    calib: Path
    yardstick: Path
    fidelity: tuple[str, ...]
    rounds: int
    run_args: tuple[str, ...] = ()
    out: Path = Path("/tmp/slim-anchors")
    rows: dict[str, dict | str] = field(default_factory=dict)  # label -> yardstick row or failure


def one_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "no message")[:200]


# --- MACs and parameters ---------------------------------------------------------------------------


def constant_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Shapes of the constant tensors: initializers, Constant nodes, and the outputs of
    DequantizeLinear / Cast / Transpose nodes whose first input is one (a quantized weight)."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
        elif node.op_type in ("DequantizeLinear", "Cast") and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
        elif node.op_type == "Transpose" and node.input[0] in shapes:
            dims = shapes[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            shapes[node.output[0]] = [dims[p] for p in perm] if perm else dims[::-1]
    return shapes


# Weight input position of the weight-carrying ops counted (the quantized forms too, so that a
# slim-then-quant candidate still counts its MACs).
MATMUL_WEIGHT = {"MatMul": 1, "MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "QLinearMatMul": 3}
CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def params(model: onnx.ModelProto) -> int:
    """Elements of the constant weights (initializers and Constant nodes) of two or more dims."""
    dims = [list(t.dims) for t in model.graph.initializer]
    dims += [
        list(a.t.dims) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
    ]
    return sum(int(np.prod(d)) for d in dims if len(d) >= 2)


def macs_per_token(model: onnx.ModelProto) -> int:
    """Sum of K*N of every MatMul (or Gemm, MatMulNBits) with a 2-D constant weight."""
    shapes = constant_shapes(model.graph)
    total = 0
    for node in model.graph.node:
        if node.op_type in MATMUL_WEIGHT:
            w = shapes.get(node.input[MATMUL_WEIGHT[node.op_type]])
            if w is not None and len(w) == 2:
                total += w[0] * w[1]
        elif node.op_type == "Gemm" and len(shapes.get(node.input[1], [])) == 2:
            total += int(np.prod(shapes[node.input[1]]))
        elif node.op_type == "MatMulNBits":
            total += attr(node, "K") * attr(node, "N")
    return total


def macs_per_image(model: onnx.ModelProto, input_shape: list[int]) -> int | None:
    """Conv (and constant-weight MatMul/Gemm) MACs at a fixed input shape, from onnx shape
    inference; None when an output shape stays unknown."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, n in zip(dims, input_shape):
        d.Clear()
        d.dim_value = n
    del model.graph.value_info[:]
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    out_shapes = {}
    for vi in [*inferred.value_info, *inferred.output]:
        out_shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
        ]
    shapes = constant_shapes(model.graph)
    total = 0
    for node in model.graph.node:
        # MACs per output element: (Cin/group)*kh*kw for a Conv, K for a MatMul or Gemm
        if node.op_type in CONV_WEIGHT:
            w = shapes.get(node.input[CONV_WEIGHT[node.op_type]])
            per_out = int(np.prod(w[1:])) if w is not None else None
        elif node.op_type in MATMUL_WEIGHT:
            w = shapes.get(node.input[MATMUL_WEIGHT[node.op_type]])
            per_out = w[-2] if w is not None and len(w) >= 2 else None
        elif node.op_type == "Gemm":
            w = shapes.get(node.input[1])
            per_out = w[1 if attr(node, "transB", 0) else 0] if w is not None else None
        elif node.op_type == "MatMulNBits":
            per_out = attr(node, "K")
        else:
            continue
        if per_out is None:
            continue
        out = out_shapes.get(node.output[0])
        if not out or None in out:
            return None
        total += int(np.prod(out)) * per_out
    return total


# --- candidates --------------------------------------------------------------------------------------


def onnxopt_run(args, bench: Bench, passes: str, dst: Path) -> None:
    py = args.onnxopt_python
    cli = (
        [py, "-c", BOOTSTRAP, str(args.onnxopt_src)] if args.onnxopt_src else [py, "-m", "onnxopt"]
    )
    cmd = [*cli, "run", str(bench.model), "--passes", passes, "-o", str(dst), "--quiet"]
    done = subprocess.run([*cmd, *bench.run_args], capture_output=True, text=True, cwd=args.out)
    if done.returncode != 0:
        raise RuntimeError(
            f"onnxopt exit {done.returncode}: {one_line(done.stderr or done.stdout)}"
        )
    if not dst.exists():
        raise RuntimeError("onnxopt wrote no model")


def onnxsim_batches(calib: Path, n: int) -> list[dict[str, np.ndarray]]:
    data = np.load(calib)
    cuts = {k: np.array_split(data[k], n) for k in data.files}
    return [{k: cuts[k][i] for k in cuts} for i in range(n) if len(cuts[data.files[0]][i])]


def onnxsim_wanda(bench: Bench, ratio: float, batches, simplify: bool, dst: Path) -> None:
    model = onnx.load(str(bench.model))
    if simplify:
        model, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim.simplify could not validate its output")
    pruned = onnxsim.apply_structured_wanda_pruning(model, calibration_data=batches, sparsity=ratio)
    onnx.save(pruned, str(dst))


def smoke(bench: Bench, path: Path) -> None:
    """The candidate loads in onnxruntime and keeps the original's inputs and first output shape."""
    data = np.load(bench.calib)
    feeds = {k: data[k][:1] for k in data.files}
    shapes = []
    for p in (bench.model, path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        if names != set(feeds):
            raise RuntimeError(f"inputs {sorted(names)}, not {sorted(feeds)}")
        shapes.append(sess.run(None, feeds)[0].shape)
    if shapes[0] != shapes[1]:
        raise RuntimeError(f"first output {shapes[1]}, not {shapes[0]}")


def make(bench: Bench, label: str, build) -> Path | None:
    path = bench.out / f"{bench.name}_{label}.onnx"
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        build(path)
        smoke(bench, path)
    except Exception as e:  # a candidate that fails is a row, not the end of the run
        bench.rows[label] = f"failed: {type(e).__name__}: {one_line(str(e))}"
        print(f"{label}: {bench.rows[label]}", flush=True)
        return None
    bench.rows[label] = "failed: no yardstick line"  # until the yardstick fills it in
    print(f"made {label} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def candidates(args, bench: Bench, template: str) -> dict[str, Path]:
    made = {}
    batches = onnxsim_batches(bench.calib, args.onnxsim_batches)
    for ratio in args.ratios:
        passes = template.replace("{calib}", str(bench.calib)).replace("{ratio}", str(ratio))
        jobs = {f"onnxopt_slim_r{ratio}": lambda p, s=passes: onnxopt_run(args, bench, s, p)}
        jobs[f"onnxsim_wanda_r{ratio}"] = lambda p, r=ratio: onnxsim_wanda(
            bench, r, batches, False, p
        )
        if args.onnxsim_simplify:
            jobs[f"onnxsim_simp_wanda_r{ratio}"] = lambda p, r=ratio: onnxsim_wanda(
                bench, r, batches, True, p
            )
        for label, build in jobs.items():
            made[label] = make(bench, label, build)
    for spec in args.extra:
        label, _, passes = spec.partition("=")
        target, _, label = label.rpartition(":")
        if target and target != bench.name:
            continue
        passes = passes.replace("{calib}", str(bench.calib))
        made[label] = make(bench, label, lambda p, s=passes: onnxopt_run(args, bench, s, p))
    return {k: v for k, v in made.items() if v is not None}


# --- yardstick and table -----------------------------------------------------------------------------


def yardstick(bench: Bench, paths: dict[str, Path]) -> None:
    if not paths:
        return
    report = bench.out / f"{bench.name}_yardstick.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(bench.yardstick), "--rounds", str(bench.rounds)]
    cmd += [*map(str, paths.values()), "--json", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(f"\n{bench.name} yardstick lines:\n```text\n{done.stdout.rstrip()}\n```")
    if done.returncode != 0:
        failure = f"failed: yardstick exit {done.returncode}: {one_line(done.stderr)}"
        bench.rows.update({label: failure for label in paths})
        return
    by_file = {row["model"]: row for row in json.loads(report.read_text())}
    for label, path in paths.items():
        bench.rows[label] = by_file.get(path.name, "failed: no yardstick line")


def cost(bench: Bench, path: Path) -> tuple[int | None, int]:
    model = onnx.load(str(path))
    if bench.name == "minilm":
        return macs_per_token(model), params(model)
    return macs_per_image(model, [1, 3, 320, 320]), params(model)


def table(bench: Bench) -> None:
    base_macs, base_params = cost(bench, bench.model)
    unit = "MACs/token" if bench.name == "minilm" else "MACs/image"
    head = ["candidate", "speedup", *bench.fidelity, unit, "MACs rel", "params rel", "size MB"]
    size = bench.model.stat().st_size / 1e6
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        "| original | 1.000 | "
        + " | ".join("" for _ in bench.fidelity)
        + f" | {base_macs / 1e6:.2f}M | 1.000 | 1.000 | {size:.2f} |",
    ]
    for label, row in bench.rows.items():
        if isinstance(row, str):
            lines.append(f"| {label} | {row} |" + " |" * (len(head) - 2))
            continue
        macs, n = cost(bench, bench.out / f"{bench.name}_{label}.onnx")
        rel = f"{macs / base_macs:.3f}" if macs is not None else "n/a"
        macs_s = f"{macs / 1e6:.2f}M" if macs is not None else "n/a"
        cells = [label, f"{row['speedup']:.3f}x", *(str(row[k]) for k in bench.fidelity)]
        cells += [macs_s, rel, f"{n / base_params:.3f}", f"{row['size_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print(f"\n{bench.name}:\n" + "\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--out", type=Path, default=Path("/tmp/slim-anchors"))
    ap.add_argument("--only", choices=("minilm", "yolo"))
    ap.add_argument("--ratios", default="0.1,0.2,0.25,0.3", help="comma-separated")
    ap.add_argument("--minilm-passes", default=TEMPLATE, help="{calib} and {ratio} filled in")
    ap.add_argument("--yolo-passes", default=CONV_TEMPLATE, help="{calib} and {ratio} filled in")
    ap.add_argument("--extra", action="append", default=[], metavar="[MODEL:]NAME=PASSES")
    ap.add_argument("--onnxsim-batches", type=int, default=8)
    ap.add_argument("--onnxsim-simplify", action="store_true", help="also simplify, then prune")
    ap.add_argument("--onnxopt-python", default=shutil.which("python") or "python")
    ap.add_argument("--onnxopt-src", default=str(REPO), help="'' for plain python -m onnxopt")
    ap.add_argument("--minilm-rounds", type=int, default=6, help="yardstick timing rounds")
    ap.add_argument("--yolo-rounds", type=int, default=40, help="yardstick timing rounds")
    args = ap.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.extra:
        if "=" not in spec:
            ap.error(f"--extra {spec!r}: expected [MODEL:]NAME=PASSES")
    models, data, sticks = (args.shared / d for d in ("models", "data", "yardstick"))
    benches = {
        "minilm": (
            Bench(
                "minilm",
                models / "minilm-l6-v2.onnx",
                data / "minilm_calib.npz",
                sticks / "minilm.py",
                ("cos_mean", "cos_ho", "top5"),
                args.minilm_rounds,
            ),
            args.minilm_passes,
        ),
        "yolo": (
            Bench(
                "yolo",
                models / "yolov8n-320.onnx",
                data / "yolo_calib.npz",
                sticks / "yolo.py",
                ("detF1", "score_snr", "out_cos"),
                args.yolo_rounds,
                ("--shape", "images=1,3,320,320"),
            ),
            args.yolo_passes,
        ),
    }
    print(
        f"onnxsim {onnxsim.__version__.lstrip('v')}, onnxruntime {ort.__version__}, onnx {onnx.__version__}"
    )
    for name, (bench, template) in benches.items():
        if args.only not in (None, name):
            continue
        bench.out = args.out
        print(f"\n## {name}", flush=True)
        yardstick(bench, candidates(args, bench, template))
        table(bench)


if __name__ == "__main__":
    main()
