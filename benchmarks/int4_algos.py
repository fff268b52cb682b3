"""4-bit weight algorithms (rtn, hqq, gptq) on MiniLM's 36 MatMul weights, offline in numpy.

Each weight's error is the relative output error on the calibration inputs, through their Hessian:
trace(ΔW^T H ΔW) / trace(W^T H W) = ||X ΔW||² / ||X W||². Calibration: the first 128 rows of
minilm_inputs.npz; held-out: rows 128..255 (their own Hessians, not used to quantize). "range search"
is hqq without its iterations (the best shrunk range per block). On a shared machine, time with
single-threaded BLAS:
    OPENBLAS_NUM_THREADS=1 python benchmarks/int4_algos.py [--shared ../shared] [--block 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.passes.wquant.algos import RANGE_FACTORS, gptq, hqq, rtn
from onnxopt.passes.wquant.calib import input_hessians

ROWS = 128


def matmul_weights(model: ir.Model):
    for node in model.graph:
        b = node.inputs[1] if node.op_type == "MatMul" else None
        if b is not None and b.const_value is not None:
            yield node, b.const_value.numpy()


def hessians(model, nodes, npz, rows: slice, folder):
    path = Path(folder, f"calib{rows.start}.npz")
    with np.load(npz) as data:
        np.savez(path, **{k: v[rows] for k, v in data.items()})
    return input_hessians(model, nodes, str(path))[0]


def rel_error(w, wq, h):
    d = wq.astype(np.float64) - w
    return np.sum(d * (h @ d)) / np.sum(w * (h @ w))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    shared = Path(args.shared)
    model = ir.load(shared / "models/minilm-l6-v2.onnx")
    layers = list(matmul_weights(model))
    nodes = [n for n, _ in layers]
    npz = shared / "data/minilm_inputs.npz"
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        calib = hessians(model, nodes, npz, slice(0, ROWS), folder)
        print(
            f"{len(layers)} weights, Hessians of {len(calib)} inputs in {time.perf_counter() - t:.1f}s"
        )
        held = hessians(model, nodes, npz, slice(ROWS, 2 * ROWS), folder)
    algos = {
        "rtn": lambda w, sym, h: rtn(w, args.block, sym),
        "range search": lambda w, sym, h: hqq(w, args.block, sym, iters=0),
        "hqq": lambda w, sym, h: hqq(w, args.block, sym),
        "gptq": lambda w, sym, h: gptq(w, args.block, sym, h),
        "gptq act_order": lambda w, sym, h: gptq(w, args.block, sym, h, act_order=True),
        "gptq act+range": lambda w, sym, h: gptq(
            w, args.block, sym, h, act_order=True, factors=RANGE_FACTORS
        ),
    }
    print(
        f"block {args.block}: mean over weights of ||X ΔW||² / ||X W||² "
        "(calibration / held-out rows), time for all weights"
    )
    print(f"{'':16}{'asymmetric':>30}{'symmetric':>30}")
    for name, algo in algos.items():
        cells = []
        for sym in (False, True):
            spent, errs = 0.0, []
            for node, w in layers:
                key = node.inputs[0].name
                t = time.perf_counter()
                wq = algo(w, sym, calib[key]).dequantize()
                spent += time.perf_counter() - t
                errs.append((rel_error(w, wq, calib[key]), rel_error(w, wq, held[key])))
            e = np.mean(errs, 0)
            cells.append(f"{e[0]:.5f} / {e[1]:.5f} {spent:5.2f}s")
        print(f"{name:16}{cells[0]:>30}{cells[1]:>30}")


if __name__ == "__main__":
    main()
