"""Compare onnxopt's `quant` with onnxruntime.quantization and onnxsim's quantizers on MiniLM and YOLOv8n,
measured by the shared yardsticks (each yardstick times all candidates in one process, side by side).

Run in a scratch venv that has the anchors installed (never project dependencies):
    /tmp/anchors-venv/bin/python benchmarks/quant_vs_anchors.py [--shared ../shared] [--out DIR]

YOLOv8n is calibrated on images 0-19 of images_320.npz (scaled to [0, 1]: ../shared/data/yolo_calib.npz);
images 20-26 are held out of calibration. MiniLM's calibration (for the variants that take it) is the
first 128 rows of minilm_inputs.npz (../shared/data/minilm_calib.npz). PP-OCRv4 det and rec: images
0-19 calibrate, 20-26 are the held-out set their cosine is measured on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime.quantization as orq
import onnxsim

YOLO_CALIB_IMAGES = 20
MINILM_CALIB_ROWS = 128


class Reader(orq.CalibrationDataReader):
    def __init__(self, name: str, samples: np.ndarray):
        self.rows = iter({name: s[None]} for s in samples)

    def get_next(self):
        return next(self.rows, None)


def onnxopt_run(src: Path, dst: Path, passes: str, *shape: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "onnxopt",
        "run",
        str(src),
        "--passes",
        passes,
        "-o",
        str(dst),
        *shape,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed(label: str, make) -> None:
    start = time.perf_counter()
    make()
    print(f"made {label} in {time.perf_counter() - start:.1f} s", flush=True)


def minilm_candidates(model: Path, data: Path, out: Path) -> list[Path]:
    rows = np.load(data)
    calib = out / "minilm_calib.npz"
    np.savez(calib, **{k: v[:MINILM_CALIB_ROWS] for k, v in rows.items()})
    made = {
        "ort_dynamic": lambda p: orq.quantize_dynamic(model, p, weight_type=orq.QuantType.QInt8),
        "ort_dynamic_per_channel": lambda p: orq.quantize_dynamic(
            model, p, weight_type=orq.QuantType.QInt8, per_channel=True
        ),
        "onnxsim_dynamic": lambda p: onnx.save(
            onnxsim.quantize_dynamic(onnxsim.simplify(str(model))[0]), p
        ),
        "onnxopt_quant": lambda p: onnxopt_run(model, p, "quant"),
        "onnxopt_quant_calib": lambda p: onnxopt_run(model, p, f"quant(calib={calib})"),
    }
    return _make(made, out, "minilm")


def yolo_candidates(model: Path, images: Path, out: Path) -> list[Path]:
    x = np.load(images)["images"][:YOLO_CALIB_IMAGES].astype(np.float32) / 255
    calib = out / "yolo_calib.npz"
    np.savez(calib, images=x)
    made = {
        "ort_static_qdq": lambda p: orq.quantize_static(
            model,
            p,
            Reader("images", x),
            quant_format=orq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=orq.QuantType.QUInt8,
            weight_type=orq.QuantType.QInt8,
        ),
        "onnxsim_static": lambda p: onnx.save(
            onnxsim.quantize_static(
                onnxsim.simplify(str(model))[0], calibration_data=[{"images": s[None]} for s in x]
            ),
            p,
        ),
        "onnxopt_static": lambda p: onnxopt_run(
            model,
            p,
            f"quant(mode=static,calib={calib})",
            "--shape",
            "images=1,3,320,320",
        ),
    }
    return _make(made, out, "yolo")


PPOCR_CALIB_IMAGES = 20  # images 0-19 calibrate, 20-26 are held out
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def ppocr_inputs(images: Path) -> dict[str, np.ndarray]:
    """det: whole photos, ImageNet-normalized; rec: a 48-row band of each, scaled to [-1, 1]."""
    x = np.load(images)["images"].astype(np.float32) / 255
    return {"det": (x - IMAGENET_MEAN) / IMAGENET_STD, "rec": (x[:, :, 136:184] - 0.5) / 0.5}


def ppocr_candidates(models: Path, images: Path, out: Path) -> dict[str, list[Path]]:
    found = {}
    for kind, x in ppocr_inputs(images).items():
        model = models / f"ppocrv4-{kind}.onnx"
        calib, held = out / f"ppocr_{kind}_calib.npz", out / f"ppocr_{kind}_held.npz"
        np.savez(calib, x=x[:PPOCR_CALIB_IMAGES])
        np.savez(held, x=x[PPOCR_CALIB_IMAGES:])
        made = {
            "ort_static_qdq": lambda p, model=model, x=x: orq.quantize_static(
                model,
                p,
                Reader("x", x[:PPOCR_CALIB_IMAGES]),
                quant_format=orq.QuantFormat.QDQ,
                per_channel=True,
                activation_type=orq.QuantType.QUInt8,
                weight_type=orq.QuantType.QInt8,
            ),
            "onnxopt_static": lambda p, model=model, calib=calib: onnxopt_run(
                model, p, f"quant(mode=static,calib={calib})"
            ),
        }
        found[kind] = [model, *_make(made, out, f"ppocr_{kind}")]
    return found


def ppocr_report(found: dict[str, list[Path]], out: Path) -> None:
    """Held-out cosine (onnxopt validate) and side-by-side latency with a kernel profile (onnxopt
    bench --profile) on one held-out image."""
    for kind, (model, *candidates) in found.items():
        held = out / f"ppocr_{kind}_held.npz"
        for path in candidates:
            report = out / f"{path.stem}_validate.json"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxopt",
                    "validate",
                    str(model),
                    str(path),
                    "--inputs",
                    str(held),
                    "--min-cosine",
                    "0.99",
                    "--json",
                    str(report),
                    "-q",
                ],
                stdout=subprocess.DEVNULL,
            )
            print(f"model={path.name}  held_out={_cosines(report)}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxopt",
                "bench",
                str(model),
                *map(str, candidates),
                "--inputs",
                str(held),
                "--threads",
                "2",
                "--iters",
                "100",
                "--profile",
                "12",
            ],
            check=True,
        )


def _cosines(report: Path) -> str:
    """Each output's mean cosine from a validate report."""
    if not report.exists():
        return "validate failed"
    found = json.loads(report.read_text())
    return " ".join(f"{o['name']}:{o['cosine']:.5f}" for o in found["outputs"])


def _make(made: dict, out: Path, prefix: str) -> list[Path]:
    paths = []
    for label, make in made.items():
        path = out / f"{prefix}_{label}.onnx"
        try:
            target = path if "onnxopt" in label else str(path)
            timed(label, lambda make=make, target=target: make(target))
            paths.append(path)
        except Exception as e:  # an anchor that fails is reported, not fatal
            print(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--out", type=Path, default=Path("/tmp/quant-anchors"))
    ap.add_argument("--only", choices=("minilm", "yolo", "ppocr"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models, data, yardstick = (
        args.shared / "models",
        args.shared / "data",
        args.shared / "yardstick",
    )
    if args.only in (None, "minilm"):
        found = minilm_candidates(
            models / "minilm-l6-v2.onnx", data / "minilm_inputs.npz", args.out
        )
        subprocess.run([sys.executable, yardstick / "minilm.py", *map(str, found)], check=True)
    if args.only in (None, "yolo"):
        found = yolo_candidates(models / "yolov8n-320.onnx", data / "images_320.npz", args.out)
        subprocess.run(
            [sys.executable, yardstick / "yolo.py", "--rounds", "40", *map(str, found)], check=True
        )
    if args.only in (None, "ppocr"):
        ppocr_report(ppocr_candidates(models, data / "images_320.npz", args.out), args.out)


if __name__ == "__main__":
    main()
