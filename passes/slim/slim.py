"""slim: remove whole structural units and rebuild what follows them by least squares.

Units (``units``, ``heads``, ``channels``): FFN neurons (an up-projection, an elementwise
activation, a down-projection; gated FFNs and plain MatMul chains too), attention heads (``heads``
share of each layer's), and Conv output channels in dependency groups (see ``conv``).

FFNs and heads: each layer keeps the same share of its units (``ratio`` go, rounded to a multiple
of ``multiple``; ``allocate=sensitivity`` shares the cut by measured cost instead). With calib,
units go one at a time, each time the one whose removal adds the least output error with the rest
refit (``fit.eliminate``, Optimal Brain Surgeon on whole rows), and the projection after them is
refit by least squares (``fit.refit`` with a prior: with its bias, so the mean shift of the dropped units
is absorbed; damped towards the kept rows' original weights, not towards zero). Measured on
MiniLM-L6, FFNs cut by 0.25 (sentence cosine / held-out / top-5): FLAP's score and a refit damped
towards zero (1e-3) 0.9739 / 0.9666 / 0.823; obs with it 0.9767 / 0.9702 / 0.833; obs with the
refit damped towards the weights (0.1) 0.9822 / 0.9785 / 0.845 (see RIDGE).

Activations: with ``sequential`` (the default) layers are slimmed one after another in graph order,
and each layer's statistics come from the model slimmed so far (its own activations, which already
carry the earlier layers' errors); the refit reproduces that layer's full-width output on those same
activations (L passes over the calibration data for L layers). Without it, one pass over the
original model gives every layer's statistics. Fitting to the original model's layer output instead
(to undo the earlier layers' errors too) measured worse on MiniLM-L6 at width 1024 (sentence cosine
0.9588 vs 0.9623, top-5 0.773 vs 0.794; non-sequential 0.9622 / 0.788), and again with the refit
damped towards the weights at 0.25 (0.9717 vs 0.9741): with 2770 calibration tokens for 1025
coefficients per output it overfits. Weighing each token by 1/std of the residual stream its
output joins (what the LayerNorm after it divides by) measured a hair better and was left out:
ratio 0.25 0.9826 / 0.9787 / 0.850 vs 0.9822 / 0.9785 / 0.845; 0.3 0.9769 / 0.9719 / 0.822 vs
0.9763 / 0.9716 / 0.821. Conv readers see far more rows per unknown, and there the
original's output is the better target (see ``conv``). Without calib the pass is data-free:
weight magnitudes, no refit.

Allocation (``allocate``): ``auto`` (the default) is uniform for FFNs and heads, sensitivity for
Conv channels. With ``sensitivity`` for FFNs (needs calib), ``ratio`` is the share of all FFN MACs
removed, taken ``multiple`` neurons at a time from the layer whose cost grows least per MAC (a
global priority queue, ``fit.allocate_by_cost``). A layer's cost at a width is its refit's residual
on the calibration tokens of the original model, from the Gram matrices alone (8 probe widths,
interpolated), over the energy of the residual stream its output joins; times a per-layer factor
measured end to end once (halve that layer alone, refit, the outputs' relative error over the local
residual: one calibration pass per layer; it ranges 2-12x on MiniLM-L6, the first layer highest).
Measured on MiniLM-L6 with FLAP's score (sensitivity vs uniform, cos_mean / top-5): ratio 0.2
0.9813 / 0.838 vs 0.9804 / 0.846; ratio 0.25 0.9739 / 0.820 vs 0.9739 / 0.823: MiniLM's FFNs are
about equally sensitive, so uniform stays the FFN default.

Attention heads (``heads``): ranked and removed like FFN neurons, a head's dh context channels as
one group (the out-projection's input plays the FFN hidden activation's part); the out-projection
is refit the same way, in the same graph-ordered sequence as the FFNs. How many go from each layer
is measured (``allocate`` auto or sensitivity, with calib): each layer alone loses a third of its
heads on a copy, and the ``heads`` share of all heads goes where the outputs move least, a layer's
cost growing as the square of the heads it loses (``allocate_heads``). On MiniLM-L6 (12 heads x
32) the last layer is ten times as sensitive as the others (a third of its heads alone: sentence
cosine 0.9556; layers 0-4: 0.9960-0.9979). FFNs at 0.25 with heads at 0.17 (12 of 72): uniform
0.9637 / 0.9555 / 0.792 (cos_mean / cos_ho / top-5), measured 0.9722 / 0.9667 / 0.797; FFNs at 0.2
with heads at 0.12, measured: 0.9849 / 0.9819 / 0.843 at 1.192x against FFNs at 0.25 alone
0.9822 / 0.9785 / 0.845 at 1.162x in the same run.
"""

from __future__ import annotations

import collections
import math
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import compare
from onnxopt.errors import UsageError
from onnxopt.passbase import Column, Option, OptPass, Outcome
from onnxopt.passes._calibrate import calibration_batches, run_values, token_mask, tokens
from onnxopt.passes._common import (
    add_initializer,
    constant,
    fresh_name,
    infer_shapes,
    lift_constants,
    regexes,
    remove_unused,
)
from onnxopt.passes.slim import channels, conv, fit, heads
from onnxopt.passes.slim.heads import Attention
from onnxopt.passes.slim.units import Ffn, find

AUTO = "auto"
SCORES = (AUTO, "obs", "flap", "wanda", "magnitude")
REFITS = (AUTO, "lsq", "bias", "none")
ALLOCATIONS = (AUTO, "uniform", "sensitivity")
DEFAULT_MIN_COSINE = 0.95
MAX_RATIO = 0.9
# YOLOv8n (yardstick yolo.py, one run, 80 rounds): channels 0.15 1.167x, detF1 0.963, score_snr
# 13.06 dB; 0.2 1.247x, 0.951, 11.32 dB; 0.25 1.326x, 0.889, 8.38 dB.
CHANNELS = 0.2
# MiniLM-L6 (yardstick minilm.py, one run; cos_mean / cos_ho / top-5): FFNs 0.25 alone 1.162x,
# 0.9822 / 0.9785 / 0.845; FFNs 0.2 with 6 of 72 heads (allocated by sensitivity) 1.192x, 0.9849 /
# 0.9819 / 0.843; FFNs 0.15 with 12 heads 1.186x, 0.9814 / 0.9776 / 0.825.
RATIO = 0.2
HEADS = 0.08  # rounds to one head in twelve per layer: 6 of MiniLM's 72 go
SHARES = ("ratio", "heads", "channels")  # what the min_cosine search scales together
BUDGET_STEPS = 6  # bisection steps of the min_cosine search (the first at ratio's default)
# Measured on MiniLM-L6, FFNs cut by 0.25 (obs, sequential; sentence cosine / held-out / top-5):
# damped towards zero 1e-3 0.9767 / 0.9702 / 0.833; towards the original weights 1e-2 0.9804 /
# 0.9752 / 0.836, 3e-2 0.9819 / 0.9775 / 0.843, 0.1 0.9822 / 0.9785 / 0.845, 0.3 0.9805 / 0.9774
# / 0.836, 1.0 0.9766 / 0.9741 / 0.820.
RIDGE = 0.1
FOLDS = 1  # calibration folds for the sensitivity residual (1: in-sample)


class Slim(OptPass):
    name = "slim"
    summary = (
        "structured pruning: remove FFN neurons, attention heads and Conv output channels (with "
        "what is coupled to them) by calibration importance, and refit what reads them by least "
        "squares; for speed"
    )
    exact = False
    options = (
        Option(
            "calib",
            str,
            "",
            "calibration data (.npz or folder, as validate's --inputs; random only to try): for "
            "scores and the refit. Without it the pass is data-free (weight magnitudes, no refit)",
        ),
        Option(
            "ratio",
            float,
            RATIO,
            "fraction of each FFN's neurons removed (before rounding to multiple)",
            low=0,
            high=MAX_RATIO,
        ),
        Option(
            "allocate",
            str,
            AUTO,
            "how the cut is shared: uniform (every layer loses ratio of its units), sensitivity "
            "(ratio of the MACs goes where the measured error grows least: FFNs by their refit "
            "residual, Conv channel blocks by the output error with that block alone cut; needs "
            "calib, else uniform; heads: as many heads go, from the layers where the outputs "
            "move least); auto: uniform for FFNs, sensitivity for heads and Conv channels",
            choices=ALLOCATIONS,
        ),
        Option(
            "heads",
            float,
            HEADS,
            "share of the attention heads removed (Q, K, V columns and out-projection rows, head "
            "by head; the out-projection refit like a down-projection): each layer's share with "
            "allocate=uniform, else as many in all from the layers where the outputs move least; "
            "0: heads stay",
            low=0,
            high=0.9,
        ),
        Option(
            "channels",
            float,
            CHANNELS,
            "Conv output channels: the share of the Conv blocks' MACs removed, taken where the "
            "measured output error grows least (allocate=uniform: that share of each block's "
            "channels); 0: Convs stay",
            low=0,
            high=MAX_RATIO,
        ),
        Option(
            "multiple",
            int,
            16,
            "the kept width of a layer is rounded to a multiple of this (kernels like it)",
            low=1,
        ),
        Option(
            "score",
            str,
            AUTO,
            "which units go: obs (FFN neurons and heads: removed one at a time, each time the one "
            "whose removal, the rest refit, adds the least output error on the calibration data: "
            "Optimal Brain Surgeon on whole rows; Conv channels: flap), flap (variance of the "
            "activation times ||W2 row||²), wanda (mean |activation| times ||W2 row||), magnitude "
            "(data-free: ||W1 column||·||W2 row||); auto: obs with calib, magnitude without",
            choices=SCORES,
        ),
        Option(
            "refit",
            str,
            AUTO,
            "the down-projection after removal: lsq (least squares to the full layer's output, "
            "bias included, damped towards the kept rows' weights), bias (drop rows, move their "
            "mean into the bias: FLAP), none (drop rows); auto: lsq with calib, none without",
            choices=REFITS,
        ),
        Option(
            "ridge",
            float,
            RIDGE,
            "lsq damping towards the original weights, relative to the mean diagonal of the kept "
            "activations' Gram matrix",
            low=0,
        ),
        Option(
            "sequential",
            bool,
            True,
            "fit each layer on the activations of the model slimmed so far (one calibration pass "
            "per layer); false: all layers from one pass over the original model",
        ),
        Option(
            "exclude",
            str,
            [],
            "up-projection MatMul names or regexes (full match) whose FFN stays whole",
            many=True,
        ),
        Option(
            "min_cosine",
            float,
            DEFAULT_MIN_COSINE,
            "fidelity budget: the least output cosine the check accepts; given without ratio "
            "(and with calib), the pass searches the largest ratio that holds it on the "
            "calibration data",
            low=0,
            high=1,
        ),
    )
    columns = (
        Column("layer", "layer"),
        Column("kind", "kind"),
        Column("units_before", "units before", "d"),
        Column("units_after", "units after", "d"),
        Column("macs_before", "MACs/token before", ",d"),
        Column("macs_after", "MACs/token after", ",d"),
    )

    def __init__(self, **values: Any):
        super().__init__(**values)
        where = f"pass {self.name}"
        if not self.calib:
            for option, allowed in (("score", ("magnitude",)), ("refit", ("none",))):
                if option in self.given and getattr(self, option) not in (AUTO, *allowed):
                    raise UsageError(
                        f"{where}: {option}={getattr(self, option)} needs calib=PATH (activations "
                        "on calibration samples)"
                    )
        self._exclude = regexes(self.exclude, "exclude", where)

    @property
    def score_method(self) -> str:
        if self.score != AUTO:
            return self.score
        return "obs" if self.calib else "magnitude"

    @property
    def ranking(self) -> str:
        """The per-unit score where one is needed up front (allocation, Conv channels): obs
        ranks by removing, so flap stands in for it."""
        return "flap" if self.score_method == "obs" else self.score_method

    @property
    def refit_method(self) -> str:
        if self.refit != AUTO:
            return self.refit
        return "lsq" if self.calib else "none"

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        ffns, refused = find(model.graph)
        found = collections.Counter(f"{f.kind} units" for f in ffns)
        if refused:
            found["ffn-like chains refused"] = len(refused)
        attentions, refused = heads.find(model.graph)
        if attentions:
            found["attention layers (heads)"] = len(attentions)
        if refused:
            found["attention-like blocks refused"] = len(refused)
        if any(n.op_type == "Conv" for n in model.graph):
            copy = model.clone()  # inspect: as is
            lift_constants(copy)
            infer_shapes(copy)
            blocks = channels.analyse(copy.graph).blocks()
        else:
            blocks = []
        if blocks:
            found["Conv channel blocks"] = len(blocks)
        return dict(found)

    def call(self, model: ir.Model) -> Outcome:
        if "min_cosine" in self.given and not self.given & set(SHARES) and self.calib:
            return self._within_budget(model)
        return self._cut(model)

    def _within_budget(self, model: ir.Model) -> Outcome:
        """Slim with the shares (``SHARES``) scaled by the largest factor whose outputs hold
        ``min_cosine`` on the calibration data as the run's check measures it: bisected over
        BUDGET_STEPS slims of copies (the first at the defaults), then applied to ``model``."""
        reference = ir.serde.serialize_model(model).SerializeToString()
        samples = list(calibration_batches(model, self.calib, "slim"))
        given = {name: getattr(self, name) for name in self.given}
        shares = {k: getattr(self, k) for k in SHARES if getattr(self, k) > 0}
        if not shares:
            return self._cut(model)

        def scaled(f: float) -> Slim:
            return type(self)(**{**given, **{k: min(MAX_RATIO, v * f) for k, v in shares.items()}})

        low, high, best, tried = 0.0, MAX_RATIO / max(shares.values()), None, []
        scale = 1.0
        for _ in range(BUDGET_STEPS):
            copy = ir.serde.deserialize_model(onnx.load_from_string(reference))
            candidate = ir.serde.serialize_model(scaled(scale)._cut(copy).model)
            results = compare.compare_models(reference, candidate.SerializeToString(), samples)
            cosine = min(r.cosine for r in results)
            tried.append(f"x{scale:.3g}: {cosine:.5f}")
            if cosine >= self.min_cosine:
                low, best = scale, (scale, cosine)
            else:
                high = scale
            scale = (low + high) / 2
        note = (
            f"budget: min_cosine {self.min_cosine:g} on the calibration data; the shares ("
            + ", ".join(f"{k} {v:g}" for k, v in shares.items())
            + ") scaled: cosine "
            + ", ".join(tried)
        )
        if best is None:
            notes = [f"nothing slimmed: no scale tried holds the budget ({note})"]
            return Outcome(model, False, notes, [], self.min_cosine)
        scale, cosine = best
        outcome = scaled(scale)._cut(model)
        kept = ", ".join(f"{k} {min(MAX_RATIO, v * scale):.3g}" for k, v in shares.items())
        outcome.notes.insert(1, f"{note}; kept x{scale:.3g}: {kept} (cosine {cosine:.5f})")
        return outcome

    def _cut(self, model: ir.Model) -> Outcome:
        lift_constants(model)
        infer_shapes(model)
        ffns, refused = find(model.graph)
        notes = [f"left alone: {reason}" for reason in refused]
        excluded = [f for f in ffns if any(p.fullmatch(f.name) for p in self._exclude)]
        ffns = [f for f in ffns if f not in excluded]
        if excluded:
            notes.append(f"excluded: {', '.join(f.name for f in excluded)}")
        widths = self._allocate(model, ffns, notes)
        targets = [(f, k) for f, k in zip(ffns, widths) if k < f.width]
        whole = [f.name for f, k in zip(ffns, widths) if k >= f.width]
        if whole and self.ratio > 0:
            notes.append(
                f"{len(whole)} FFN(s) keep their width after rounding to {self.multiple}: "
                + ", ".join(whole)
            )
        head_targets = self._heads(model, ffns, notes)
        if head_targets:
            order = {node: i for i, node in enumerate(model.graph)}
            targets = sorted(targets + head_targets, key=lambda t: order.get(t[0].down, 0))
        blocks = channels.analyse(model.graph).blocks() if self.channels > 0 else []
        if not targets and not blocks:
            notes.insert(0, f"nothing to slim: {len(ffns)} FFN(s) found, none narrowed")
            return Outcome(model, False, notes, [], self.min_cosine)
        if not self.calib:
            message = (
                "WARNING: slim without calib is data-free: neurons ranked by weight magnitude "
                "alone and the down-projection is not refit; expect a large accuracy loss. Pass "
                "calib=PATH with real samples"
            )
            warnings.warn(f"pass slim: {message}", stacklevel=2)
            notes.append(message)
        rows = self._slim(model, targets, notes) if targets else []
        conv_rows = self._channels(model, notes) if blocks else []
        if not rows and not conv_rows:
            notes.insert(0, "nothing to slim: every layer keeps its width after rounding")
            return Outcome(model, False, notes, [], self.min_cosine)
        rows += conv_rows
        remove_unused(model)
        ffn_targets = [(f, k) for f, k in targets if isinstance(f, Ffn)]
        kinds = collections.Counter(f.kind for f, _ in ffn_targets)
        removed = sum(f.width - k for f, k in ffn_targets)
        total = sum(f.width for f, _ in ffn_targets)
        summary = []
        if ffn_targets:
            summary.append(
                f"removed {removed} of {total} neurons in {len(ffn_targets)} layer(s) ("
                + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
                + ")"
            )
        if head_targets:
            removed = sum(a.heads - k for a, k in head_targets)
            total = sum(a.heads for a, _ in head_targets)
            summary.append(
                f"removed {removed} of {total} attention heads in {len(head_targets)} layer(s)"
            )
        if conv_rows:
            removed = sum(r["units_before"] - r["units_after"] for r in conv_rows)
            total = sum(r["units_before"] for r in conv_rows)
            summary.append(
                f"removed {removed} of {total} Conv channels in {len(conv_rows)} block(s)"
            )
        notes.insert(0, "; ".join(summary))
        return Outcome(model, True, notes, rows, self.min_cosine)

    def _channels(self, model: ir.Model, notes: list[str]) -> list[dict]:
        """Conv output channels, block by block (see ``conv``)."""
        plan = conv.Plan(
            self.channels,
            self.multiple,
            self.calib,
            self.ranking,
            self.refit_method,
            self.ridge if "ridge" in self.given else conv.RIDGE,
            tuple(self._exclude),
        )
        allocate = "sensitivity" if self.allocate in ("auto", "sensitivity") else "uniform"
        rows, blocks, note = conv.slim_channels(model, plan, allocate)
        if note:
            notes.append(note)
        if len(rows) < len(blocks):
            why = (
                "where cutting costs the most output error per MAC"
                if note
                else f"after rounding to {self.multiple}"
            )
            notes.append(
                f"{len(blocks) - len(rows)} of {len(blocks)} Conv channel block(s) keep their "
                f"width ({why})"
            )
        return rows

    def _allocate(self, model: ir.Model, ffns: list[Ffn], notes: list[str]) -> list[int]:
        """The width each FFN keeps: the same share everywhere, or by measured sensitivity."""
        uniform = fit.allocate([f.width for f in ffns], self.ratio, self.multiple)
        if self.allocate != "sensitivity" or self.ratio <= 0 or len(ffns) < 2:
            return uniform
        if not self.calib:
            notes.append("allocate: sensitivity needs calib; every layer loses the same share")
            return uniform
        all_stats, _ = gather(model, ffns, self.calib, folds=FOLDS, stream=True)
        costs, unit_macs, scores = [], [], []
        for ffn, folds in zip(ffns, all_stats):
            stats = fit.Stats(ffn.width, folds[0].cross.shape[1])
            for fold in folds:
                stats.merge(fold)
            w1s = [constant(up.weight) for up in ffn.ups]
            w2 = constant(ffn.down.inputs[1])
            score = fit.scores(self.ranking, w1s, w2, stats)
            scores.append((score, stats))
            costs.append(fit.sensitivity(folds, score, self.ridge, self.multiple))
            unit_macs.append(sum(w.shape[0] for w in w1s) + w2.shape[1])
        scale = self._end_to_end(model, ffns, scores)
        costs = [{k: c * f for k, c in curve.items()} for curve, f in zip(costs, scale)]
        widths = fit.allocate_by_cost(costs, unit_macs, self.ratio)
        notes.append(
            f"allocate: sensitivity: {self.ratio:g} of the FFN MACs go where the cost grows least "
            "(the refit residual against the residual stream on the calibration tokens of the "
            "original model, times the layer's measured end-to-end factor); width kept, cost, "
            "factor: "
            + ", ".join(
                f"{f.name} {k}/{f.width} ({c[k]:.2g}, x{s:.3g})"
                for f, k, c, s in zip(ffns, widths, costs, scale)
            )
        )
        return widths

    def _end_to_end(self, model: ir.Model, ffns: list[Ffn], scores: list) -> list[float]:
        """Per layer, how much the model's outputs move (relative squared error on the calibration
        data) when that layer alone is halved and refit, over its local residual at that width:
        the factor by which its local cost reaches the outputs (errors of early layers grow on the
        way). One calibration pass per layer, on copies of the model."""
        reference = self._reference(model)
        if reference is None:
            return [1.0] * len(ffns)
        factors = []
        for ffn, (score, stats) in zip(ffns, scores):
            kept = fit.kept_width(ffn.width, 0.5, self.multiple)
            keep = fit.choose(score, kept)
            local = fit.residual([stats], keep, self.ridge)
            copy = model.clone()
            twin = [f for f in find(copy.graph)[0] if f.name == ffn.name]
            if kept >= ffn.width or local < 1e-9 or len(twin) != 1:
                factors.append(1.0)
                continue
            w2, b2 = fit.refit(stats, keep, self.ridge, constant(ffn.down.inputs[1])[keep])
            rewrite(twin[0], keep, w2.astype(np.float32), b2.astype(np.float32))
            factors.append(self._moved(copy, reference) / local)
        return factors

    def _reference(self, model: ir.Model) -> list[dict] | None:
        """The float outputs of ``model`` on the calibration data, batch by batch (None if none)."""
        return conv.run_outputs(model, self.calib) if conv.float_outputs(model) else None

    def _moved(self, copy: ir.Model, reference: list[dict]) -> float:
        """How far ``copy``'s outputs moved from ``reference``: squared error over energy, on the
        calibration data, padding tokens left out."""
        outs = [v for v in copy.graph.outputs if v.name in reference[0]]
        moved = energy = 0.0
        for ref, got in zip(reference, run_values(copy, outs, self.calib, who="slim")):
            for name, r in ref.items():
                mask = token_mask(got, r.shape)
                r = tokens(r, mask).astype(np.float64)
                moved += float(np.sum(np.square(tokens(got[name], mask) - r)))
                energy += float(np.sum(np.square(r)))
        return moved / max(energy, 1e-30)

    def _head_costs(self, model: ir.Model, targets: list[tuple[Attention, int]]) -> list[float]:
        """Per attention, how far the outputs move when a third of its heads alone go (obs, refit),
        measured end to end on a copy: one calibration pass per layer."""
        reference = self._reference(model)
        costs = []
        for att, _ in targets:
            probe = max(1, att.heads - max(1, att.heads // 3))
            copy = model.clone()
            twin = [a for a in heads.find(copy.graph)[0] if a.name == att.name]
            if reference is None or len(twin) != 1 or probe >= att.heads:
                costs.append(0.0)
                continue
            [stats], _ = gather(copy, twin, self.calib)
            self._apply_heads(twin[0], probe, stats, self.score_method, self.refit_method)
            costs.append(self._moved(copy, reference) / (att.heads - probe) ** 2)
        return costs

    def _heads(self, model: ir.Model, ffns: list[Ffn], notes: list[str]) -> list:
        """The attentions to narrow and the heads each keeps (none when ``heads`` is 0)."""
        if self.heads <= 0:
            return []
        found, refused = heads.find(model.graph)
        notes += [f"left alone (attention): {reason}" for reason in refused]
        taken = {n for f in ffns for n in f.nodes()}
        targets = []
        for att in found:
            if taken & set(att.all_nodes()):
                notes.append(f"left alone (attention): {att.name}: overlaps an FFN")
            elif any(p.fullmatch(att.name) for p in self._exclude):
                notes.append(f"excluded: {att.name}")
            else:
                kept = max(1, att.heads - int(math.floor(att.heads * self.heads + 0.5)))
                targets.append((att, kept))
        if self.calib and self.allocate != "uniform" and len(targets) > 1:
            costs = self._head_costs(model, targets)
            targets = [(a, k) for (a, _), k in zip(targets, allocate_heads(targets, costs))]
            notes.append(
                "allocate: sensitivity (heads): the same number of heads go, from the layers "
                "where the outputs move least (each measured with a third of its heads gone); "
                "heads kept: " + ", ".join(f"{a.name} {k}/{a.heads}" for a, k in targets)
            )
        targets = [(a, k) for a, k in targets if k < a.heads]
        if not targets:
            notes.append(f"heads: {len(found)} attention(s) found, none narrowed")
        return targets

    def _slim(self, model: ir.Model, targets: list[tuple[Ffn, int]], notes: list[str]) -> list:
        method, refit = self.score_method, self.refit_method
        rows = []
        if not self.calib:
            for ffn, kept in targets:
                rows.append(self._apply(ffn, kept, None, method, refit))
            return rows
        seen, masked = 0, False
        if self.sequential:
            for ffn, kept in targets:
                [stats], masked = gather(model, [ffn], self.calib)
                rows.append(self._apply(ffn, kept, stats, method, refit))
                seen = stats.count
        else:
            all_stats, masked = gather(model, [f for f, _ in targets], self.calib)
            for (ffn, kept), stats in zip(targets, all_stats):
                rows.append(self._apply(ffn, kept, stats, method, refit))
            seen = all_stats[0].count
        source = (
            "the slimmed model's own activations, layer by layer"
            if self.sequential
            else "the original model's activations"
        )
        fitted = f"refit: {refit}" + (f" (ridge {self.ridge:g})" if refit == "lsq" else "")
        notes.append(
            f"calibration: {self.calib}, {seen} tokens"
            + (" (padding masked out by the attention mask)" if masked else "")
            + f"; score: {method}; {fitted}; statistics from {source}"
        )
        return rows

    def _apply(self, ffn: Ffn, kept: int, stats: fit.Stats | None, method: str, refit: str) -> dict:
        if isinstance(ffn, Attention):
            return self._apply_heads(ffn, kept, stats, method, refit)
        w1s = [constant(up.weight) for up in ffn.ups]
        w2 = constant(ffn.down.inputs[1])
        b2_value = ffn.down_bias_value
        b2 = np.zeros(w2.shape[1], np.float32) if b2_value is None else constant(b2_value)
        if method == "obs":
            keep = fit.eliminate(stats, kept, self.ridge)
        else:
            keep = fit.choose(fit.scores(method, w1s, w2, stats), kept)
        output = ffn.output.name  # before a bias Add takes it over
        if refit == "lsq":
            new_w2, new_b2 = fit.refit(stats, keep, self.ridge, w2[keep])
        else:
            new_w2, new_b2 = fit.drop(w2, b2.reshape(-1), keep, stats, refit == "bias")
        rewrite(ffn, keep, new_w2.astype(np.float32), new_b2.astype(np.float32))
        k_in = sum(w.shape[0] for w in w1s)
        n_out = w2.shape[1]
        return {
            "layer": ffn.name,
            "kind": ffn.kind,
            "units_before": ffn.width,
            "units_after": kept,
            "macs_before": (k_in + n_out) * ffn.width,
            "macs_after": (k_in + n_out) * kept,
            "output": output,
        }

    def _apply_heads(
        self, att: Attention, kept: int, stats: fit.Stats | None, method: str, refit: str
    ) -> dict:
        """Keep the ``kept`` best heads of ``att`` by the summed scores of their context channels
        (flap: variance times ||Wo row||²; magnitude: ||Wv column||·||Wo row||), refit Wo."""
        wo = constant(att.down.inputs[1])
        bias = att.down_bias_value
        bo = np.zeros(wo.shape[1], np.float32) if bias is None else constant(bias)
        if method == "obs":
            keep_heads = fit.eliminate(stats, kept, self.ridge, att.head_dim)
        else:
            score = fit.scores(method, [constant(att.v.weight)], wo, stats)
            keep_heads = fit.choose(heads.head_scores(score, att.head_dim), kept)
        keep = heads.channels(keep_heads, att.head_dim)
        output = att.output.name
        k_in = constant(att.q.weight).shape[0]
        if refit == "lsq":
            new_wo, new_bo = fit.refit(stats, keep, self.ridge, wo[keep])
        else:
            new_wo, new_bo = fit.drop(wo, bo.reshape(-1), keep, stats, refit == "bias")
        heads.rewrite(att, keep_heads, new_wo.astype(np.float32), new_bo.astype(np.float32))
        return {
            "layer": att.name,
            "kind": att.kind,
            "units_before": att.heads,
            "units_after": kept,
            "macs_before": _attention_macs(att, k_in, wo.shape[1], att.heads),
            "macs_after": _attention_macs(att, k_in, wo.shape[1], kept),
            "output": output,
        }


def allocate_heads(targets: list[tuple[Attention, int]], costs: list[float]) -> list[int]:
    """Heads kept per attention: as many go in all as the uniform shares, one at a time from the
    layer where the next one costs least, each layer's cost growing as the square of the heads it
    has lost (``costs``: per layer, the measured cost over that square)."""
    gone = [0] * len(targets)
    most = [a.heads - max(1, int(math.ceil(a.heads * (1 - MAX_RATIO)))) for a, _ in targets]
    for _ in range(sum(a.heads - k for a, k in targets)):
        rise = [
            c * ((g + 1) ** 2 - g**2) if g < m else math.inf for c, g, m in zip(costs, gone, most)
        ]
        best = int(np.argmin(rise))
        if math.isinf(rise[best]):
            break
        gone[best] += 1
    return [a.heads - g for (a, _), g in zip(targets, gone)]


def _attention_macs(att: Attention, k_in: int, n_out: int, nh: int) -> int:
    """MACs per token of the projections (Q, K, V and out) with ``nh`` heads; the score and
    context MatMuls add 2·nh·dh per token per key on top (sequence-dependent, left out)."""
    d = nh * att.head_dim
    return 3 * k_in * d + d * n_out


def _stream(ffn: Ffn) -> ir.Value | None:
    """The residual sum ``x + ffn(x)`` when the FFN's output goes into one Add, else None."""
    out = ffn.output
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        return uses[0].node.outputs[0]
    return None


def gather(
    model: ir.Model,
    ffns: list[Ffn],
    calib: str,
    folds: int = 0,
    stream: bool = False,
) -> tuple[list, bool]:
    """The calibration statistics of ``ffns`` (FFNs of ``model``, still whole): their activations
    and outputs, one run per batch; and whether padding tokens were masked out. With ``folds``,
    each FFN gets that many Stats, batches dealt to them in turn."""
    parts = max(folds, 1)
    stats = [
        [fit.Stats(f.width, constant(f.down.inputs[1]).shape[1]) for _ in range(parts)]
        for f in ffns
    ]
    values = [f.hidden for f in ffns] + [f.output for f in ffns]
    streams = [_stream(f) if stream else None for f in ffns]
    values += [v for v in streams if v is not None]
    masked = False
    for batch, results in enumerate(run_values(model, values, calib, who="slim")):
        for ffn, ffn_stats, z in zip(ffns, stats, streams):
            s = ffn_stats[batch % parts]
            h = results[ffn.hidden.name]
            mask = token_mask(results, h.shape)
            masked = masked or mask is not None
            s.add(tokens(h, mask), tokens(results[ffn.output.name], mask))
            if z is not None and z.name in results:
                zt = tokens(results[z.name], mask).astype(np.float64)
                s.stream += float(np.sum(np.square(zt - zt.mean(-1, keepdims=True))))
    return (stats if folds else [s[0] for s in stats]), masked


def rewrite(ffn: Ffn, keep: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
    """Keep neurons ``keep`` of ``ffn``: columns of every W1 and up bias; the down-projection
    becomes ``w2`` [|keep|, N] and its bias ``b2`` (an Add is inserted where it had none)."""
    graph = ffn.down.graph
    kept = len(keep)

    def replace(node: ir.Node, value: ir.Value, array: np.ndarray) -> None:
        new = add_initializer(
            graph, np.ascontiguousarray(array), fresh_name(graph, value.name, "slim")
        )
        for i, v in enumerate(node.inputs):
            if v is value:
                node.replace_input_with(i, new)

    for up in ffn.ups:
        replace(up.matmul, up.weight, constant(up.weight)[:, keep])
        if up.bias is not None:
            bias = up.bias_value
            b = constant(bias)
            replace(up.bias, bias, b.reshape(-1)[keep].reshape(*b.shape[:-1], kept))
    replace(ffn.down, ffn.down.inputs[1], w2)
    if ffn.down_bias is not None:
        bias = ffn.down_bias_value
        replace(ffn.down_bias, bias, b2.reshape(constant(bias).shape))
    else:
        _insert_bias(ffn.down, b2)
    for value in ffn.inner_values():
        if value.shape is not None and len(value.shape):
            value.shape = ir.Shape([*value.shape[:-1], kept])


def _insert_bias(down: ir.Node, b2: np.ndarray) -> None:
    """An Add of ``b2`` after ``down`` that takes over its output (name, readers, graph output)."""
    graph = down.graph
    old = down.outputs[0]
    name = old.name
    readers = list(old.uses())
    bias = add_initializer(graph, b2, fresh_name(graph, name, "slim_bias"))
    old.name = f"{name}.slim_nobias"
    new = ir.Value(name=name, type=old.type, shape=old.shape)
    add = ir.node("Add", [old, bias], outputs=[new])
    graph.insert_after(down, add)
    for use in readers:
        use.node.replace_input_with(use.idx, new)
    for i, output in enumerate(graph.outputs):
        if output is old:
            graph.outputs[i] = new
