"""Where int8 pays: the scopes (exporter module paths) to keep in float, for accuracy or for speed.

Both searches take ``quantize(model, keep_float)``, which quantizes a float model in place except the
nodes whose scope is in ``keep_float``, so they serve the dynamic and the static mode alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import compare
from onnxopt.passes.quant.ort_profile import scope, scope_times

QDQ = ("QuantizeLinear", "DequantizeLinear")
Quantizer = Callable[[ir.Model, set], object]
EVAL_ROWS = 8  # calibration samples the accuracy searches check each candidate on
LINEAR_COUNT = 32  # the accuracy search tries every count of float scopes up to this one
MARGIN = (
    0.1  # int8 must be this much slower in the profile before a scope goes back to float (noise)
)


def keep_float_for_accuracy(
    float_model: ir.Model,
    scopes: list[str],
    quantize: Quantizer,
    feeds: dict[str, np.ndarray],
    min_cosine: float,
) -> set[str]:
    """The fewest scopes to leave in float so that the outputs keep ``min_cosine`` on ``feeds``.

    Quantized whole, the model is checked first. Below the budget, each scope is quantized alone to
    measure what it costs, and the costliest are kept in float: one more at a time up to
    ``LINEAR_COUNT``, then doubling and bisecting the count. The fidelity is not monotone in the
    count (float scopes move the int8 ones' neighbours): on YOLOv8n the 23 costliest held the budget
    and the 32 costliest did not, so doubling from 1 ended at 61.
    """
    reference = compare.run_ir(float_model, feeds)

    def cosine(kept: set[str]) -> float:
        trial = float_model.clone()
        quantize(trial, kept)
        return worst_cosine(reference, trial, feeds)

    if cosine(set()) >= min_cosine:
        return set()
    every = set(scopes)
    cost = {s: 1.0 - cosine(every - {s}) for s in scopes}
    ranked = sorted(scopes, key=lambda s: -cost[s])
    count = 1
    while count < len(ranked) and cosine(set(ranked[:count])) < min_cosine:
        if count < LINEAR_COUNT:
            count += 1
            continue
        count *= 2
    if count <= LINEAR_COUNT:
        return set(ranked[:count])
    low, high = count // 2, min(count, len(ranked))
    while low + 1 < high:  # the fewest kept that meet the budget lies in (low, high]
        middle = (low + high) // 2
        low, high = (low, middle) if cosine(set(ranked[:middle])) >= min_cosine else (middle, high)
    return set(ranked[:high])


def worst_cosine(
    reference: dict[str, np.ndarray], model: ir.Model, feeds: dict[str, np.ndarray]
) -> float:
    """The lowest cosine of ``model``'s outputs on ``feeds`` against the ``reference`` outputs,
    each output's channels (axis 1 of [N, C, ...]) weighted alike (``balanced``)."""
    got = compare.run_ir(model, feeds)
    return min(
        compare.compare_arrays(k, *balanced(reference[k], got[k]), 0.0, 0.0).cosine
        for k in reference
    )


def balanced(reference: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays with each channel (axis 1 of a float [N, C, ...]) divided by its RMS in the
    reference, so that every channel carries the same energy in a cosine. A detector's output
    [1, 84, anchors] holds 4 box coordinates in pixels and 80 class scores in [0, 1]: by the plain
    cosine, int8 YOLOv8n held 0.9988 while its class scores had an SNR of 0 dB."""
    if reference.ndim < 3 or reference.shape[1] < 2 or reference.dtype.kind != "f":
        return reference, got
    axes = (0, *range(2, reference.ndim))
    rms = np.sqrt(np.mean(np.square(reference.astype(np.float64)), axis=axes, keepdims=True))
    scale = 1.0 / np.maximum(rms, 1e-12 * max(float(rms.max()), 1e-30))
    return reference * scale, got * scale


def keep_float_for_speed(
    float_model: ir.Model,
    scopes: list[str],
    quantize: Quantizer,
    kept: set[str],
    feeds: dict[str, np.ndarray],
) -> tuple[set[str], list[tuple[str, float, float]]]:
    """Scopes whose int8 kernels are slower than their float ones, profiled side by side in onnxruntime.

    Returns them and, per scope, (scope, float µs, int8 µs). A scope's int8 time includes the
    QuantizeLinear/DequantizeLinear nodes of the values it produces, so the cost of converting
    between float and int8 is charged to the scope that causes it.
    """
    trial = float_model.clone()
    quantize(trial, kept)
    owners = _owners(float_model)
    owners.update(_owners(trial, owners))
    fp, q = scope_times([float_model, trial], feeds, owners)
    rows = sorted(
        ((s, fp.get(s, 0.0), q.get(s, 0.0)) for s in set(fp) | set(q) if s),
        key=lambda r: r[2] - r[1],
        reverse=True,
    )
    slower = {s for s, f, i in rows if i > f * (1 + MARGIN) and s in scopes and s not in kept}
    return slower, rows


def _owners(model: ir.Model, known: dict[str, str] | None = None) -> dict[str, str]:
    """Node names and value names → the scope that computes them. Nodes a quantizer made, named
    ``<node>.<role>`` after the node they replace, belong to that node's scope in ``known``."""
    owners = {}
    for node in model.graph:
        name = node.name or ""
        base = name.rpartition(".")[0]
        if known and name in known:
            owner = known[name]
        elif known and base in known and node.op_type not in QDQ:
            owner = known[base]
        else:
            owner = _owner(node)
        owners[name] = owner
        for v in node.outputs:
            owners[v.name or ""] = owner
    return owners


def _owner(node: ir.Node) -> str:
    """A node's scope; for a Q or DQ, the scope of the node whose value it converts."""
    if node.op_type not in QDQ:
        return scope(node)
    producer = node.inputs[0].producer()
    if producer is not None:
        return _owner(producer)
    readers = [u.node for u in node.outputs[0].uses() if u.node.op_type not in QDQ]
    return scope(readers[0]) if readers else ""
