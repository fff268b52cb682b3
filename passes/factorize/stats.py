"""What calibration data says about the layers factorize may split: the Gram matrix of each layer's
input rows (an embedding's: its token counts, the diagonal of the one-hot Gram matrix), mean |x|
per input channel, and how far a changed model's outputs move from the original's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxopt import compare
from onnxopt.passes._calibrate import calibration_batches, token_mask, tokens
from onnxopt.passes.factorize.layers import SEED, Layer

WHO = "factorize"


class Stats:
    def __init__(self, layer: Layer):
        k = layer.weight.shape[0]
        self.diagonal = layer.kind == "embedding"
        self.gram = np.zeros(k) if self.diagonal else np.zeros((k, k))
        self.abs_sum = np.zeros(k)
        self.count = 0
        self.per_run = 0  # input rows of one calibration run, padding included: what a run costs

    def add(self, rows: np.ndarray) -> None:
        if self.diagonal:
            counts = np.bincount(rows.astype(np.int64), minlength=len(self.gram))
            self.gram += counts[: len(self.gram)]
            self.abs_sum += counts[: len(self.gram)]
        else:
            rows = rows.astype(np.float64)
            self.gram += rows.T @ rows
            self.abs_sum += np.abs(rows).sum(0)
        self.count += len(rows)

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)


def run(model: ir.Model, names: list[str], calib: str) -> Iterator[dict[str, np.ndarray]]:
    """Per calibration batch, the values ``names`` of ``model`` and the feeds, by name."""
    sess = compare.model_session(model, names)
    for feeds in calibration_batches(model, calib, WHO):
        results = compare.run_session(sess, feeds)
        results.update(feeds)
        yield results


def rows_of(layer: Layer, results: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The layer's input rows in one batch's ``results``, padding tokens left out."""
    x = results[layer.source.name]
    if layer.kind == "embedding":
        mask = next(
            (v != 0 for k, v in results.items() if "mask" in k.lower() and v.shape == x.shape),
            None,
        )
        return x[mask] if mask is not None else x.reshape(-1)
    if layer.kind == "conv1x1":
        return layer.rows(x, rng)
    return tokens(x, token_mask(results, x.shape))


def gather(model: ir.Model, layers: list[Layer], calib: str) -> list[Stats]:
    """Every layer's statistics from one pass over the calibration data."""
    stats = [Stats(layer) for layer in layers]
    rng = np.random.default_rng(SEED)
    names = list(dict.fromkeys(layer.source.name for layer in layers))
    for results in run(model, names, calib):
        for layer, s in zip(layers, stats):
            if not s.per_run:
                s.per_run = layer.rows_per_run(results[layer.source.name].shape)
            s.add(rows_of(layer, results, rng))
    return stats


def float_outputs(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs if v.dtype in (ir.DataType.FLOAT, None)]


def outputs(model: ir.Model, calib: str) -> list[dict[str, np.ndarray]]:
    """The float outputs of ``model`` (and the feeds) on the calibration data, batch by batch."""
    return list(run(model, float_outputs(model), calib))


def fidelity(
    model: ir.Model, reference: list[dict[str, np.ndarray]], calib: str
) -> tuple[float, float]:
    """How far ``model``'s float outputs moved from ``reference`` on the calibration data: the
    error (see ``_error``, averaged over outputs) and the run's check cosine (per sample, the
    least over outputs)."""
    names = float_outputs(model)
    got = list(run(model, names, calib))
    errors, cosines = [], []
    for name in names:
        ref = [r[name] for r in reference]
        new = [g[name] for g in got]
        errors.append(_error(ref, new, reference))
        a = np.concatenate([x.reshape(len(x), -1) for x in ref]).astype(np.float64)
        b = np.concatenate([x.reshape(len(x), -1) for x in new]).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, np.sum(a * b, 1) / np.maximum(norms, 1e-300), 1.0)
        cosines.append(float(np.mean(cos)))
    return float(np.mean(errors)), float(min(cosines))


def _error(ref: list[np.ndarray], new: list[np.ndarray], feeds: list[dict]) -> float:
    """One output's error. Token outputs [batch, seq, D] (an attention mask among the feeds): the
    squared change over the reference's energy, padding left out. Others: per channel (axis 1 of
    [N, C, ...]; an output of rank < 3 as one channel) the mean squared change over the channel's
    variance, averaged over channels, so that a detector's class scores count as much as its box
    coordinates, which a cosine over the whole output hides."""
    masks = [token_mask(f, r.shape) for f, r in zip(feeds, ref)]
    if all(m is not None for m in masks):
        r = np.concatenate([tokens(x, m) for x, m in zip(ref, masks)]).astype(np.float64)
        g = np.concatenate([tokens(x, m) for x, m in zip(new, masks)]).astype(np.float64)
        return float(np.sum(np.square(g - r)) / max(float(np.sum(np.square(r))), 1e-30))
    r = np.concatenate(ref).astype(np.float64)
    g = np.concatenate(new).astype(np.float64)
    if r.ndim < 3:
        r, g = r.reshape(len(r), 1, -1), g.reshape(len(g), 1, -1)
    axes = (0, *range(2, r.ndim))
    variance = r.var(axis=axes) + 1e-12 * (1 + np.abs(r).mean())
    return float(np.mean(np.square(g - r).mean(axis=axes) / variance))
