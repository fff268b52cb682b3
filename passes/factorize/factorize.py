"""factorize: split constant weights into two low-rank factors where it pays, by the error it
costs on calibration data.

A layer ``x · W`` (MatMul, Gemm, 1x1 Conv; with ``embeddings``, Gather tables) becomes
``(x · A) · B``, A [K, r], B [r, N]. The truncation minimises the error on calibration
activations, ||X W - X A B||: ``method=whiten`` (SVD-LLM: the SVD of Lᵀ W, L L^T = X^T X), or
``asvd`` (ASVD's activation scaling) or ``plain`` (the weight's own SVD: data-free, the only
choice without calib).

Where the rank goes (``allocate``): a layer's own error is a poor guide. MiniLM-L6's FFN
down-projections keep 98 % of their output energy at rank 1-95 (a few outlier channels of the
residual stream dominate it), yet cutting one of them that far moves the model's outputs 70-140
times more than a query projection at the same local error. So with ``sensitivity`` (the default)
each layer is truncated alone on a copy, to the rank where its local error is ``PROBE_ERROR``,
and the outputs' relative squared error on the calibration data over that local error becomes
the layer's factor: the predicted output error is the sum of factor times local error. Measured on
MiniLM-L6 (whitened, no refit; one run of benchmarks/factorize_table.py, cos_mean / cos_ho /
top-5): 10 % of the encoder's MatMul parameters, by local error 0.96686 / 0.96368 / 0.808, by
sensitivity 0.98492 / 0.98348 / 0.816; 20 %: 0.91301 / 0.90699 / 0.665 against 0.96186 / 0.95837 /
0.739. At equal allocation, whitening beats ASVD's scaling and plain SVD (10 %: 0.95819 and
0.95277).

Ranks are multiples of ``multiple`` below ``margin`` times the break-even rank K·N/(K+N), and only
those measured faster in onnxruntime than the full product at the row count of a calibration run
(``latency``). ``ratio`` sets the share of the layers' parameters removed; without it the pass
takes the most it can while the outputs on the calibration data keep ``min_cosine`` with a margin
for unseen data (predicted, then checked; see ``_within_budget``), and applies it only when the
measured layer times predict at least ``MIN_GAIN`` of a run's time saved: on MiniLM-L6, YOLOv8n and
PP-OCRv4 nothing pays by that measure, and the model comes back unchanged with a note saying so.

``refit`` (the default with calib): after the truncation, layer by layer in graph order, B is refit
by least squares so that the layer reproduces the original model's output on the factorized
model's own activations (A kept; damped towards the truncation's B by ``ridge``). MiniLM-L6 at
10 %: 0.98592 / 0.9837 / 0.824 against 0.98492 / 0.98348 / 0.816 without; 20 %: 0.96583 / 0.96048 /
0.749 against 0.96186 / 0.95837 / 0.739. A full reduced-rank regression (A refit too) measured the
same within noise in a prototype and was left out.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Column, Option, OptPass, Outcome
from onnxopt.passes._calibrate import calibration_batches, token_mask, tokens
from onnxopt.passes._common import infer_shapes, lift_constants, regexes, remove_unused
from onnxopt.passes.factorize import latency, lowrank, stats
from onnxopt.passes.factorize.allocate import allocate
from onnxopt.passes.factorize.layers import KINDS, Layer, find

MARGIN = 0.9  # a rank saves at least 10 % of the layer's parameters
PROBE_ERROR = 0.02  # local relative error at which each layer's end-to-end factor is measured
# Unseen tokens' weight in an embedding table's truncation, in counts: a token the calibration data
# never holds still gets a tenth of the weight of one seen once.
EMBED_PRIOR = 0.1
RIDGE = 0.01
DEFAULT_MIN_COSINE = 0.99
BUDGET_STEPS = 7  # tries of the error budget (see _within_budget)
MIN_SIZE = 1024  # weights smaller than this are left whole
# The budget's search holds this share of the allowed loss (1 - min_cosine) on the calibration data:
# PP-OCRv4 rec held 0.9913 on its calibration images and 0.9820 on held-out ones.
HELD_OUT_MARGIN = 0.5
# In the budget's search, a factorization predicted to save less of a run's time than this is not
# applied: a gain within this machine's noise bought with accuracy. YOLOv8n's budget ranks were
# predicted to save 3.0 % and measured 1.02x (yardstick) at detF1 0.926 and score_snr 14.3 dB;
# PP-OCRv4 rec's 3.4 %, measured 1.021x (onnxopt bench); MiniLM-L6's 1.7 %.
MIN_GAIN = 0.05
DATA_FREE_ROWS = 256  # rows timed without calibration data


class Factorize(OptPass):
    name = "factorize"
    summary = (
        "low-rank weights: split MatMul/Gemm/1x1 Conv weights (and, with embeddings, Gather "
        "tables) into two factors by calibration-whitened SVD, ranks placed by measured "
        "end-to-end sensitivity, only where onnxruntime runs the pair faster"
    )
    exact = False
    options = (
        Option(
            "calib",
            str,
            "",
            "calibration data (.npz or folder, as validate's --inputs; random only to try): for "
            "the whitening, the sensitivities, the refit and the budget. Without it: plain SVD, "
            "ratio required",
        ),
        Option(
            "ratio",
            float,
            0.0,
            "share of the factorizable layers' parameters removed; 0: as many as min_cosine "
            "allows (needs calib)",
            low=0,
            high=0.9,
        ),
        Option(
            "min_cosine",
            float,
            DEFAULT_MIN_COSINE,
            "fidelity budget: the least output cosine the check accepts, and (without ratio) "
            "what the pass holds on the calibration data",
            low=0,
            high=1,
        ),
        Option(
            "method",
            str,
            "auto",
            "the truncation: whiten (SVD of the weight whitened by the Cholesky factor of the "
            "input Gram matrix: least error on the calibration data), asvd (scaled by mean "
            "|activation|^0.5), plain (the weight's SVD, data-free); auto: whiten with calib, "
            "plain without",
            choices=("auto", *lowrank.METHODS),
        ),
        Option(
            "allocate",
            str,
            "sensitivity",
            "where the rank goes: sensitivity (each layer's error weighted by how far it moves "
            "the outputs, measured end to end on calib) or local (the layer's own error)",
            choices=("sensitivity", "local"),
        ),
        Option(
            "refit",
            bool,
            True,
            "refit B by least squares on the factorized model's own activations, layer by "
            "layer (needs calib; MatMul and Gemm)",
        ),
        Option("ridge", float, RIDGE, "refit damping towards the truncation's B", low=0),
        Option("multiple", int, 16, "ranks are multiples of this", low=1),
        Option(
            "margin",
            float,
            MARGIN,
            "a rank is at most this share of the break-even rank K·N/(K+N)",
            low=0.05,
            high=1,
        ),
        Option(
            "latency",
            bool,
            True,
            "keep only ranks whose A·B product onnxruntime runs faster than the full product "
            "(timed at the row count of a calibration run)",
        ),
        Option(
            "embeddings",
            bool,
            False,
            "also factorize Gather tables [V, D] (for size: rows weighted by token counts in "
            "calib)",
        ),
        Option(
            "exclude",
            str,
            [],
            "layer names or regexes (full match) left whole",
            many=True,
        ),
    )
    columns = (
        Column("layer", "layer"),
        Column("kind", "kind"),
        Column("rank", "rank", "d"),
        Column("full_rank", "full rank", "d"),
        Column("params_before", "params before", ",d"),
        Column("params_after", "params after", ",d"),
        Column("macs_before", "MACs/row before", ",d"),
        Column("macs_after", "MACs/row after", ",d"),
        Column("local_error", "local error", ".2e"),
        Column("time", "time vs full", ".2f"),
    )

    def __init__(self, **values: Any):
        super().__init__(**values)
        where = f"pass {self.name}"
        if not self.calib:
            if self.ratio <= 0:
                raise UsageError(
                    f"{where}: needs calib=PATH (calibration samples) or ratio=F (data-free "
                    "plain SVD)"
                )
            for option in ("method", "refit"):
                if option in self.given and getattr(self, option) not in ("auto", "plain", False):
                    raise UsageError(f"{where}: {option}={getattr(self, option)} needs calib=PATH")
        self._exclude = regexes(self.exclude, "exclude", where)

    @property
    def truncation(self) -> str:
        if self.method != "auto":
            return self.method
        return "whiten" if self.calib else "plain"

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.embeddings else tuple(k for k in KINDS if k != "embedding")

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        found = collections.Counter(f"{layer.kind} layers" for layer in find(model.graph, KINDS))
        return dict(found)

    def call(self, model: ir.Model) -> Outcome:
        lift_constants(model)
        infer_shapes(model)
        notes: list[str] = []
        layers = self._layers(model, notes)
        if not layers:
            notes.insert(
                0,
                f"nothing to factorize: no MatMul, Gemm or 1x1 Conv{' or table' * self.embeddings} "
                f"with a constant weight of at least {MIN_SIZE} values that a rank below "
                f"{self.margin:g} of break-even shrinks",
            )
            return Outcome(model, False, notes, [], self.min_cosine)
        if not self.calib:
            message = (
                "WARNING: factorize without calib is data-free: plain SVD of the weights, ranks by "
                "the weights' own error; expect a large accuracy loss. Pass calib=PATH with real "
                "samples"
            )
            warnings.warn(f"pass factorize: {message}", stacklevel=2)
            notes.append(message)
            found = [None] * len(layers)
        else:
            if self.calib == "random":
                warnings.warn(
                    "pass factorize: calibrating on random inputs (calib=random): whitening, "
                    "sensitivities and the budget will not match real data; pass calib=PATH",
                    stacklevel=2,
                )
            found = stats.gather(model, layers, self.calib)
        bases = [self._basis(layer, s) for layer, s in zip(layers, found)]
        options, timed = self._options(layers, found, notes)
        factors = self._factors(model, layers, bases, notes)
        curves = [
            [(0.0, 0.0, None)]
            + [
                (layer.params - layer.factored_params(r), f * b.tail[r] / max(b.tail[0], 1e-30), r)
                for r in opts
            ]
            for layer, b, f, opts in zip(layers, bases, factors, options)
        ]
        total = sum(layer.params for layer in layers)
        if self.ratio > 0:
            ranks, saved, predicted = allocate(curves, saved=self.ratio * total)
            checked = None
        else:
            ranks, saved, predicted, checked = self._within_budget(
                model, layers, bases, curves, notes
            )
        chosen = [(layer, b, r) for layer, b, r in zip(layers, bases, ranks) if r is not None]
        if not chosen:
            notes.insert(
                0,
                "nothing factorized: no layer's rank pays within the budget "
                f"(min_cosine {self.min_cosine:g} on the calibration data)"
                if self.ratio <= 0
                else "nothing factorized: no layer has a rank that saves parameters and runs faster",
            )
            return Outcome(model, False, notes, [], self.min_cosine)
        gain = self._gain(model, chosen, timed)
        if gain is not None and self.ratio <= 0 and gain < MIN_GAIN:
            # tables are factorized for size; the timed layers only where they pay
            chosen = [item for item in chosen if item[0].name not in timed]
            why = (
                f"the ranks that hold min_cosine {self.min_cosine:g} would save {gain:.1%} of a "
                f"run's time, predicted from each layer's measured time; at least {MIN_GAIN:.0%} "
                "pays"
            )
            if not chosen:
                notes.insert(
                    0, f"nothing factorized: no factorization pays within the budget ({why})"
                )
                return Outcome(model, False, notes, [], self.min_cosine)
            notes.append(f"MatMul, Gemm and Conv layers left whole: {why}")
            saved = sum(layer.params - layer.factored_params(r) for layer, _, r in chosen)
        refit = bool(self.refit and self.calib)
        grams = {layer.name: s.gram if s else None for layer, s in zip(layers, found)}
        self._apply(model, chosen, refit, grams)
        remove_unused(model)
        rows = [self._row(layer, b, r, timed) for layer, b, r in chosen]
        summary = (
            f"factorized {len(chosen)} of {len(layers)} layer(s): {saved:,.0f} of {total:,.0f} "
            f"parameters removed ({saved / total:.1%}); truncation: {self.truncation}; ranks by "
            f"{self.allocate if self.calib else 'the weights’ own error'}"
            + (f"; B refit (ridge {self.ridge:g})" if refit else "")
            + f"; predicted output error {predicted:.3g}"
            + (f"; calibration cosine {checked:.5f}" if checked is not None else "")
            + (f"; predicted time saved {gain:.1%} of a run" if gain is not None else "")
        )
        notes.insert(0, summary)
        return Outcome(model, True, notes, rows, self.min_cosine)

    def _layers(self, model: ir.Model, notes: list[str]) -> list[Layer]:
        layers = []
        for layer in find(model.graph, self.kinds):
            k, n = layer.weight.shape
            if any(p.fullmatch(layer.name) for p in self._exclude):
                notes.append(f"excluded: {layer.name}")
            elif layer.params >= MIN_SIZE and lowrank.ranks(k, n, self.multiple, self.margin):
                layers.append(layer)
        return layers

    def _basis(self, layer: Layer, found: stats.Stats | None) -> lowrank.Basis:
        if found is None:
            return lowrank.basis(layer.weight, "plain")
        gram = found.gram + EMBED_PRIOR if found.diagonal else found.gram
        return lowrank.basis(layer.weight, self.truncation, gram, found.abs_mean)

    def _options(
        self, layers: list[Layer], found: list, notes: list[str]
    ) -> tuple[list[list[int]], dict[str, tuple[dict[int, float], float]]]:
        """The ranks each layer may take: below the margin and, with ``latency``, measured faster
        than the full product at the rows of a calibration run (embeddings: for size, not
        timed). Returns them and, per timed layer, each rank's time over the full product's."""
        by_shape: dict[tuple, tuple[dict[int, float], float]] = {}
        timed: dict[str, tuple[dict[int, float], float]] = {}
        options = []
        for layer, s in zip(layers, found):
            k, n = layer.weight.shape
            ranks = lowrank.ranks(k, n, self.multiple, self.margin)
            if self.latency and layer.kind != "embedding":
                key = (k, n, s.per_run if s is not None else DATA_FREE_ROWS)
                if key not in by_shape:
                    by_shape[key] = latency.faster_ranks(*key, ranks)
                timed[layer.name] = by_shape[key]
                ranks = [r for r in ranks if by_shape[key][0][r] <= latency.FASTER]
            options.append(ranks)
        if by_shape:
            notes.append(
                "latency (onnxruntime CPU; K x N at rows of a calibration run): "
                + "; ".join(
                    f"{k}x{n} at {m}: faster at rank <= "
                    + str(max((r for r, t in ts.items() if t <= latency.FASTER), default="none"))
                    for (k, n, m), (ts, _) in by_shape.items()
                )
            )
        return options, timed

    def _factors(
        self, model: ir.Model, layers: list[Layer], bases: list[lowrank.Basis], notes: list[str]
    ) -> list[float]:
        """Per layer, how much its local relative error moves the outputs (see the module
        docstring): one calibration pass per layer on a copy; 1 with allocate=local."""
        if self.allocate != "sensitivity" or not self.calib:
            return [1.0] * len(layers)
        reference = stats.outputs(model, self.calib)
        factors = []
        for layer, b in zip(layers, bases):
            relative = b.tail / max(b.tail[0], 1e-30)
            rank = max(1, int(np.argmax(relative <= PROBE_ERROR)))
            copy = model.clone()
            twin = find(copy.graph, self.kinds)
            twin = [t for t in twin if t.name == layer.name]
            twin[0].rewrite(*b.factors(rank))
            factors.append(
                stats.fidelity(copy, reference, self.calib)[0] / max(relative[rank], 1e-30)
            )
        low, high = int(np.argmin(factors)), int(np.argmax(factors))
        notes.append(
            f"sensitivity: each layer truncated alone to {PROBE_ERROR:g} of its output energy "
            f"moves the outputs x{factors[low]:.3g} ({layers[low].name}) to x{factors[high]:.3g} "
            f"({layers[high].name}) of that"
        )
        return factors

    def _gain(self, model: ir.Model, chosen: list, timed: dict) -> float | None:
        """The share of a whole run's time the chosen timed layers save, from their measured
        product times against the model's own on the first calibration batch (None: none timed
        or no calibration data)."""
        runs = [(layer, r) for layer, _, r in chosen if layer.name in timed]
        if not self.calib or not runs:
            return None
        saved = sum((1 - timed[x.name][0][r]) * timed[x.name][1] for x, r in runs)
        feeds = next(iter(calibration_batches(model, self.calib, stats.WHO)))
        whole = latency.model_ms(ir.serde.serialize_model(model).SerializeToString(), feeds)
        return saved / max(whole, 1e-9)

    def _within_budget(self, model, layers, bases, curves, notes):
        """The ranks that hold the budget on the calibration data, with a margin for data never
        calibrated on (``HELD_OUT_MARGIN``): the check's cosine at least c = 1 - margin·(1 -
        ``min_cosine``) and the outputs' error (``stats.fidelity``, per channel for a detector's
        outputs) at most 2(1 - c), the error at which cosine ≈ 1 - error/2 would reach c. The
        summed predicted error is capped, starting at that error, halved or doubled until the
        measurement is bracketed, then bisected (geometrically); each try truncates a copy
        without the refit, which only lowers the error. The cap that holds and saves most wins."""
        if not self.calib:
            raise UsageError("pass factorize: a min_cosine budget needs calib=PATH")
        reference = stats.outputs(model, self.calib)
        least = 1.0 - HELD_OUT_MARGIN * (1.0 - self.min_cosine)
        limit = 2.0 * (1.0 - least)
        budget, holds, fails = limit, None, None
        best, tried, seen = None, [], {}
        for _ in range(BUDGET_STEPS):
            ranks, saved, predicted = allocate(curves, budget=budget)
            key = tuple(ranks)
            if key not in seen:
                seen[key] = self._fidelity(model, layers, bases, ranks, reference)
                error, cosine = seen[key]
                tried.append(f"{saved:,.0f} parameters: error {error:.3g}, cosine {cosine:.5f}")
            error, cosine = seen[key]
            if cosine >= least and error <= limit:
                holds = budget
                if best is None or saved > best[1]:
                    best = (ranks, saved, predicted, cosine)
            else:
                fails = budget
            if holds is not None and fails is not None:
                budget = float(np.sqrt(holds * fails))
            else:
                budget = budget * 2 if fails is None else budget / 2
        notes.append(
            f"budget: min_cosine {self.min_cosine:g}, held on the calibration data with a margin for "
            f"unseen data: cosine >= {least:.4g} and output error <= {limit:.3g}; tried "
            + ", ".join(tried or ["nothing"])
        )
        return best or ([None] * len(layers), 0.0, 0.0, None)

    def _fidelity(self, model, layers, bases, ranks, reference) -> tuple[float, float]:
        """``stats.fidelity`` of a copy of ``model`` with ``ranks`` truncated."""
        if all(r is None for r in ranks):
            return 0.0, 1.0
        copy = model.clone()
        twins = {t.name: t for t in find(copy.graph, self.kinds)}
        for layer, b, r in zip(layers, bases, ranks):
            if r is not None:
                twins[layer.name].rewrite(*b.factors(r))
        return stats.fidelity(copy, reference, self.calib)

    def _apply(self, model: ir.Model, chosen: list, refit: bool, grams: dict) -> None:
        """Rewrite the chosen layers, each split by ``lowrank.equalized`` (``grams``: by layer
        name); with ``refit``, stage by stage in graph order (layers that read one value
        together), each stage's B fit on the activations of the model factorized so far to the
        original model's outputs of those layers."""

        def rewrite(layer: Layer, a: np.ndarray, b: np.ndarray) -> None:
            layer.rewrite(*lowrank.equalized(a, b, grams[layer.name]))

        if not refit:
            for layer, b, r in chosen:
                rewrite(layer, *b.factors(r))
            return
        original = model.clone()
        fitted = [item for item in chosen if item[0].kind in ("matmul", "gemm")]
        for layer, b, r in chosen:
            if layer.kind not in ("matmul", "gemm"):
                rewrite(layer, *b.factors(r))
        outs = [item[0].output.name for item in fitted]
        stages: dict[str, list] = {}
        for item in fitted:
            stages.setdefault(item[0].source.name, []).append(item)
        for source, stage in stages.items():
            gram, cross = 0.0, [0.0] * len(stage)
            targets = stats.run(original, outs, self.calib)
            for results, target in zip(stats.run(model, [source], self.calib), targets):
                x = results[source]
                mask = token_mask(results, x.shape)
                x = tokens(x, mask).astype(np.float64)
                gram = gram + x.T @ x
                for i, (layer, _, _) in enumerate(stage):
                    y = tokens(target[layer.output.name], mask).astype(np.float64)
                    cross[i] = cross[i] + x.T @ y
            for (layer, b, r), c in zip(stage, cross):
                a, b0 = b.factors(r)
                rewrite(layer, a, lowrank.refit_right(a, gram, c, self.ridge, b0))

    def _row(self, layer: Layer, b: lowrank.Basis, rank: int, timed: dict) -> dict:
        k, n = layer.weight.shape
        return {
            "layer": layer.name,
            "kind": layer.kind,
            "rank": rank,
            "full_rank": min(k, n),
            "params_before": layer.params,
            "params_after": layer.factored_params(rank),
            "macs_before": 0 if layer.kind == "embedding" else layer.params,
            "macs_after": rank * n if layer.kind == "embedding" else layer.factored_params(rank),
            "local_error": float(b.tail[rank] / max(b.tail[0], 1e-30)),
            "time": timed[layer.name][0][rank] if layer.name in timed else float("nan"),
            "output": layer.node.outputs[0].name,
        }
