"""accuracy_level=auto: the compute precision of the 4-bit MatMulNBits, chosen by timing on this CPU.

Level 0 dequantizes the weights to float and multiplies in fp32; level 4 quantizes each block of the
input to int8 and multiplies in integers. Which is faster depends on the CPU and on the rows per call:
on an AVX2 CPU without VNNI (onnxruntime 1.32, 2 threads) SmolLM2-135M's one-token decode step ran
2.06x fp32's speed at level 4 against 1.32x at level 0, its 128-token prefill the same at both, and
MiniLM at batch 32 x 128 ran 10% slower at level 4. So the model is timed at both levels on
``SEQUENCE`` rows (batch 1) and, when it is a decoder with a cache (which then makes tokens one row
at a time), on one row, and level 4 is kept when the geometric mean of its time ratios shows it
``MIN_GAIN`` faster. MiniLM (no cache) keeps 0: at 128 rows level 4 took 0.95x to 1.14x of level 0's
time across runs (noise), and at batch 32 x 64 its yardstick ran 0.951x fp32 at level 0, 0.841x at
4, though one row ran 0.30x; SmolLM2's geometric mean is about 0.7. Accuracy is the same within noise (SmolLM2-135M
perplexity 82.76 vs 82.81 for onnxruntime's RTN model at the two levels).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnxopt import inputs
from onnxopt.errors import OnnxoptError, one_line
from onnxopt.passes._common import MS_DOMAIN
from onnxopt.passes.quant.tune import SEQUENCE, latencies
from onnxopt.shapes import has_cache, resolve

INT8 = 4
# timed runs per model at each row count (a prefill of 128 takes 100x a step)
ITERS = {1: 30, SEQUENCE: 8}
MIN_GAIN = 1.1  # level 4 must be this much faster: its time at 128 rows moved by +-10% between runs


def four_bit_nodes(model: ir.Model) -> list[ir.Node]:
    """The MatMulNBits with 4-bit weights whose level was left to auto (not set)."""
    return [
        n
        for g in model.graphs()
        for n in g
        if n.op_type == "MatMulNBits"
        and n.domain == MS_DOMAIN
        and n.attributes.get_int("bits", 4) == 4
        and "accuracy_level" not in n.attributes
    ]


def measured_level(model: ir.Model, shapes: dict[str, list[int]] | None) -> tuple[int, str | None]:
    """(level, note): level 4 if it times faster than level 0 on this CPU (see the module docstring)."""
    if not four_bit_nodes(model):
        return 0, None
    trial = model.clone()
    set_level(trial, INT8)
    ratios, seen = {}, []
    for rows in ITERS if has_cache(model) else (SEQUENCE,):
        try:
            chosen = resolve(model, dict(shapes or {}), prefer=rows, prefill=1)  # 1: a decode step
            if chosen.shapes in seen:  # the user's shapes leave no dim to vary
                continue
            seen.append(chosen.shapes)
            feeds = inputs.generate(model, chosen.shapes)[0]
            base, int8 = latencies([model, trial], feeds, iters=ITERS[rows])
        except (OnnxoptError, RuntimeError, ValueError) as exc:  # the model still quantized: keep 0
            return 0, f"accuracy_level=auto kept 0: the model could not be timed ({one_line(exc)})"
        ratios[rows] = int8 / base
    mean = math.exp(sum(map(math.log, ratios.values())) / len(ratios))
    level = INT8 if mean * MIN_GAIN < 1 else 0
    times = ", ".join(f"{r:.2f}x on {rows} row{'s' * (rows > 1)}" for rows, r in ratios.items())
    return (
        level,
        f"accuracy_level=auto chose {level}: level {INT8} (int8 compute) took {times} of level 0's time",
    )


def set_level(model: ir.Model, level: int) -> None:
    for node in four_bit_nodes(model):
        if level:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
