"""The README's factorize tables (issue 16): candidate models built by the onnxopt CLI, then timed
and measured by the shared yardstick in one run, so every candidate is side by side with the
original in one process.

    python benchmarks/factorize_table.py [--model minilm|yolo] [--out /tmp/factorize-table]
        [--cuts 0.05,0.1,0.2] [--only NAME,...] [--rounds 12] [--shared ../shared]
        [--extra NAME=PASSES ...]

Candidates (``{calib}``: the model's calibration set; ``{r}``: each cut of ``--cuts``):
- MiniLM, at each cut, ratio = the share of the encoder's MatMul parameters removed:
  ``plain_rR`` plain SVD, ``asvd_rR`` activation-scaled, ``whiten_local_rR`` whitened with ranks by
  each layer's own error, ``whiten_rR`` whitened with ranks by end-to-end sensitivity, those three
  without the refit; ``whiten_refit_rR`` the pass's defaults at that ratio (whitened,
  sensitivity, B refit). Then ``default`` (the budget, min_cosine 0.99), ``quant``,
  ``factorize_quant`` (``factorize(calib,ratio=0.1),quant``), ``wquant4`` (``quant(bits=4)``) and
  ``embed_wquant4`` (the word-embedding table factorized too, then ``quant(bits=4)``).
- YOLOv8n: ``default`` and ``ratio0.1``.
Each candidate's build time and onnxopt's first note line are printed; the yardstick's lines are
printed verbatim. The run's check uses real samples (`--inputs`): MiniLM's 512 sentences, YOLOv8n's
calibration images.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# model, calibration set, the run's check inputs (real samples: a generated one-token sentence or
# noise image says little about a lossy pass), yardstick
MODELS = {
    "minilm": ("minilm-l6-v2.onnx", "minilm_calib.npz", "minilm_inputs.npz", "minilm.py"),
    "yolo": ("yolov8n-320.onnx", "yolo_calib.npz", "yolo_calib.npz", "yolo.py"),
}
VARIANTS = {
    "plain": "factorize(calib={calib},ratio={r},method=plain,refit=false)",
    "asvd": "factorize(calib={calib},ratio={r},method=asvd,refit=false)",
    "whiten_local": "factorize(calib={calib},ratio={r},allocate=local,refit=false)",
    "whiten": "factorize(calib={calib},ratio={r},refit=false)",
    "whiten_refit": "factorize(calib={calib},ratio={r})",
}
MINILM_EXTRA = {
    "default": "factorize(calib={calib})",
    "quant": "quant",
    "factorize_quant": "factorize(calib={calib},ratio=0.1),quant",
    "wquant4": "quant(bits=4)",
    "embed_wquant4": "factorize(calib={calib},embeddings=true),quant(bits=4)",
}
YOLO_EXTRA = {
    "default": "factorize(calib={calib})",
    "ratio0.1": "factorize(calib={calib},ratio=0.1)",
}


def candidates(model: str, cuts: list[float], extra: dict[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    if model == "minilm":
        for r in cuts:
            for name, template in VARIANTS.items():
                found[f"{name}_r{r:g}"] = template.replace("{r}", f"{r:g}")
        found.update(MINILM_EXTRA)
    else:
        found.update(YOLO_EXTRA)
    found.update(extra)
    return found


def build(source: Path, passes: str, out: Path, inputs: Path) -> tuple[float, str]:
    start = time.perf_counter()
    command = [sys.executable, "-m", "onnxopt", "run", str(source), "--passes", passes]
    done = subprocess.run(
        [*command, "-o", str(out), "--inputs", str(inputs)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        return seconds, "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    first = next((ln for ln in done.stdout.splitlines() if "factorized" in ln), "")
    return seconds, first.strip()[:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--out", default="/tmp/factorize-table")
    ap.add_argument("--cuts", default="0.05,0.1,0.2")
    ap.add_argument("--only", default="")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--extra", action="append", default=[])
    a = ap.parse_args()
    shared = Path(a.shared)
    model, calib, checked, yardstick = MODELS[a.model]
    extra = dict(item.split("=", 1) for item in a.extra)
    cuts = [float(c) for c in a.cuts.split(",") if c]
    todo = candidates(a.model, cuts, extra)
    if a.only:
        todo = {k: v for k, v in todo.items() if k in a.only.split(",")}
    out = Path(a.out) / a.model
    out.mkdir(parents=True, exist_ok=True)
    built = []
    for name, template in todo.items():
        passes = template.replace("{calib}", str(shared / "data" / calib))
        path = out / f"{name}.onnx"
        seconds, note = build(shared / "models" / model, passes, path, shared / "data" / checked)
        print(f"{name}: {passes} ({seconds:.0f} s) {note}", flush=True)
        if not note.startswith("failed"):
            built.append(str(path))
    if built:
        command = [sys.executable, str(shared / "yardstick" / yardstick), *built]
        command += ["--rounds", str(a.rounds)]
        subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
