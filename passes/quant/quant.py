"""Quantization to int8: ``quant(mode=dynamic)`` (int8 weights, activations quantized at run time;
see ``dynamic``) and ``quant(mode=static, calib=...)`` (QDQ with calibrated ranges; see ``static``).
Conv stays float in dynamic mode (ConvInteger is slow on CPU). Weights held in Constant nodes are
lifted first; already-quantized models are refused.

``quant(bits=4, ...)`` is another pass, ``wquant`` (weight-only low-bit blocks, activations stay
float): ``Quantize(bits=4, ...)`` builds a ``WeightQuantize`` with the same options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Column, Option, OptPass, Outcome, run_context
from onnxopt.passes._calibrate import first_batch
from onnxopt.passes._common import (
    infer_shapes,
    lift_constants,
    regexes,
    remove_unused,
    unique_names,
)
from onnxopt.passes.quant.dynamic import dynamic_matmuls, dynamic_quantizer
from onnxopt.passes.quant.layers import Int8Reasons, layers, scale_range
from onnxopt.passes.quant.search import EVAL_ROWS, keep_float_for_accuracy, keep_float_for_speed
from onnxopt.passes.quant.smooth import smooth_inputs
from onnxopt.passes.quant.static import static_matmuls, static_quantizer
from onnxopt.passes.quant.tune import STAT, latencies, tuning_feeds

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "GatherBlockQuantized",
    "QGemm",
    "QAttention",
}
MODES = ("dynamic", "static")
METHODS = ("minmax", "percentile", "entropy")
# A percentile clips what is rare, and a detector's confident class scores are: YOLOv8n (yolo_calib,
# defaults otherwise; one yardstick run) with percentile 99.99 needed 23 scopes float to hold the
# budget and ran 1.221x (detF1 0.9506, score_snr 12.9 dB); with minmax 7 scopes, 1.365x, detF1 0.963,
# 15.64 dB (onnxruntime's static QDQ in the same run: 1.321x, 0.8889, 0.86 dB).
DEFAULT_METHOD = "minmax"
OP_TYPES = ("MatMul", "Gemm", "Gather")
TUNES = ("latency", "off")
ACTIVATION_TYPES = ("uint8", "int8")
NOTE_SCOPES = 12  # scopes kept in float that the run's note names
MIN_GAIN = 1.05  # tune=latency keeps int8 only when it is at least this much faster than float
STATIC = {"mode": ("static",)}
DYNAMIC = {"mode": ("dynamic",)}
# what quant(bits=4, ...) does with the int8 options that wquant does not have: refuses these values
# (as before the split), notes that the rest do not apply
WEIGHT_ONLY_REFUSED = {
    "mode": (
        lambda mode: mode == "static",
        "bits=4 is weight-only: mode=static does not apply (leave mode at dynamic)",
    ),
    "smooth": (
        lambda alpha: bool(alpha),
        "smooth moves outliers out of int8 activations; bits=4 keeps activations float",
    ),
}
TUNE_SKIPPED = "tune does not apply to bits=4 (int4 is for size and memory): skipped"


class Quantize(OptPass):
    name = "quant"
    summary = (
        "int8 quantization: dynamic (int8 weights per output channel, activations at run time) "
        "or static QDQ with calibrated ranges."
    )
    exact = False
    options = (
        Option(
            "mode",
            str,
            "dynamic",
            "dynamic (int8 weights, activations quantized at run time) or static (QDQ, ranges from calib)",
            choices=MODES,
        ),
        Option(
            "per_channel", bool, True, "one weight scale per output channel (else one per tensor)"
        ),
        Option(
            "op_types",
            str,
            list(OP_TYPES),
            "op types to quantize",
            choices=OP_TYPES,
            many=True,
            only_with=DYNAMIC,
        ),
        Option(
            "exclude", str, [], "node names or regexes (full match) to keep in float", many=True
        ),
        Option(
            "reduce_range",
            bool,
            False,
            "7-bit weights, for CPUs without VNNI whose int8 kernels saturate",
        ),
        Option(
            "calib",
            str,
            "",
            "calibration data (.npz or folder, as validate's --inputs; random only to try): "
            "static ranges, dynamic outlier channels",
        ),
        Option(
            "outliers",
            float,
            4.0,
            "with calib: channels whose range exceeds this many times the median channel's stay "
            "float (0: off)",
            low=0,
            only_with=DYNAMIC,
        ),
        Option(
            "max_outliers",
            int,
            8,
            "at most this many float channels per quantized input",
            low=0,
            only_with=DYNAMIC,
        ),
        Option(
            "method",
            str,
            DEFAULT_METHOD,
            "how calibration sets ranges",
            choices=METHODS,
            only_with=STATIC,
        ),
        Option(
            "percentile",
            float,
            99.99,
            "the percentile of each tail kept, above 50",
            low=50,
            high=100,
            only_with={**STATIC, "method": ("percentile",)},
        ),
        Option(
            "activation_type",
            str,
            "uint8",
            "activation integers",
            choices=ACTIVATION_TYPES,
            only_with=STATIC,
        ),
        Option(
            "symmetric_activations",
            bool,
            False,
            "activation ranges symmetric about 0 (zero point 0 or 128)",
            only_with=STATIC,
        ),
        Option(
            "smooth",
            float,
            0.0,
            "with calib: SmoothQuant alpha in (0, 1] moving activation outliers of MatMul inputs "
            "into the weights (0: off)",
            low=0,
            high=1,
        ),
        Option(
            "bias_correction",
            bool,
            False,
            "shift Conv/Gemm biases by the mean error the int8 weights add on calibration data",
            only_with=STATIC,
        ),
        Option(
            "tune",
            str,
            "latency",
            "latency: profile int8 against float in onnxruntime, keep int8 only in scopes and "
            "models it makes faster; off: int8 wherever it fits",
            choices=TUNES,
        ),
        Option(
            "min_cosine",
            float,
            0.99,
            "fidelity budget: the least output cosine the check accepts, above 0; with calib, the "
            "costliest layers stay float to hold it there",
            low=0,
            high=1,
        ),
        Option(
            "bits",
            int,
            8,
            "8; 4 makes this the wquant pass (weight-only 4-bit blocks for MatMul weights and "
            "embedding tables, for size and memory): quant(bits=4,...) is wquant(...) with the same "
            "options (see onnxopt passes wquant)",
            choices=(4, 8),
        ),
    )
    columns = (
        Column("layer", "layer"),
        Column("op", "op"),
        Column("weight", "weight"),
        Column("activation", "activation"),
        Column("weight_scale_min", "weight scale", scale_range),
        Column("float_us", "float µs", ".0f"),
        Column("int8_us", "int8 µs", ".0f"),
    )

    def __new__(cls, **values: Any):
        """``Quantize(bits=4, ...)``, like ``quant(bits=4,...)`` on the command line, is the wquant pass."""
        if cls is Quantize:
            bits = _option("bits").convert(values["bits"], cls.name) if "bits" in values else 8
            if bits != 8:
                return weight_only(values)
            if any(k not in {o.name for o in Quantize.options} for k in values):
                _refuse_weight_only_options(values)
        return super().__new__(cls)

    def __init__(self, **values: Any):
        super().__init__(**values)
        self._exclude = regexes(self.exclude, "exclude", "pass quant")
        if self.percentile <= 50:
            raise UsageError(f"pass quant: percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "static" and not self.calib:
            raise UsageError(
                "pass quant: mode=static needs calibration data: calib=PATH (.npz or folder), "
                "or calib=random"
            )
        if self.min_cosine <= 0:
            raise UsageError(f"pass quant: min_cosine must be in (0, 1], got {self.min_cosine}")
        if self.smooth and not self.calib:
            raise UsageError(
                "pass quant: smooth needs calib=PATH: SmoothQuant scales come from the activation ranges"
            )

    def call(self, model: ir.Model) -> Outcome:
        refuse_quantized(model, self.name)
        lift_constants(model)
        infer_shapes(model)  # both modes check the element types of the activations they quantize
        found = _Found()
        # what a float verdict of tune=latency hands back (shares the tensors)
        original = model.clone()
        smoothed = self._smooth(model)
        planned = (static_quantizer if self.mode == "static" else dynamic_quantizer)(model, self)
        if planned is None:
            found.idle = True
            return self._outcome(model, smoothed, found)
        quantize, scopes, timed = planned
        float_model = model.clone()
        kept = self._keep_for_accuracy(float_model, scopes, quantize)
        slow: set[str] = set()
        if self.tune == "latency":
            feeds, found.tune_shapes = tuning_feeds(float_model, self.calib, run_context().shapes)
            slow, found.profile = keep_float_for_speed(float_model, timed, quantize, kept, feeds)
        found.kept_float, found.slow_float = sorted(kept), sorted(slow)
        modified = quantize(model, kept | slow) or smoothed
        remove_unused(model)  # the float weights the int8 ones replace
        unique_names(model)
        if self.tune == "latency":
            modified = self._keep_if_faster(
                model, modified, original, float_model, quantize, kept, feeds, found
            )
        return self._outcome(model, modified, found)

    def _outcome(self, model: ir.Model, modified: bool, found: _Found) -> Outcome:
        reasons = Int8Reasons(
            self.mode,
            self.op_types,
            self.exclude,
            self.excluded,
            self.min_cosine,
            found.kept_float,
            found.slow_float,
            found.timed,
        )
        rows = layers(model, reasons, profile=found.profile)
        return Outcome(model, modified, self._notes(found), rows, self.min_cosine)

    def _notes(self, found: _Found) -> list[str]:
        notes = []
        if found.idle and self.mode == "dynamic":
            notes.append(
                f"nothing to quantize: no {'|'.join(self.op_types)} with a constant float weight "
                "outside exclude; Conv stays float in dynamic mode: try mode=static,calib=PATH"
            )
        elif found.idle:
            notes.append(
                "nothing to quantize: no node onnxruntime runs in int8 outside exclude "
                "(or the opset is below 10)"
            )
        if found.kept_float:
            notes.append(
                f"kept {listed(found.kept_float)} in float to hold min_cosine={self.min_cosine:g} "
                "on the calibration samples"
            )
        if found.slow_float:
            notes.append(
                f"kept {listed(found.slow_float)} in float: their int8 kernels were slower in "
                "onnxruntime's profile"
            )
        if found.tune_shapes:
            notes.append(found.tune_shapes)
        if found.timed:
            fp, q = found.timed
            verdict = (
                "kept int8"
                if fp / q >= MIN_GAIN
                else f"int8 cannot speed up this model on this CPU (by {MIN_GAIN:g}x or more): "
                "kept the float model"
            )
            notes.append(
                f"tune=latency: int8 {STAT} {q:.3f} ms vs float {fp:.3f} ms ({fp / q:.2f}x): "
                f"{verdict}"
            )
        return notes

    def _keep_for_accuracy(self, float_model: ir.Model, scopes: list[str], quantize) -> set[str]:
        """Without calibration data there is nothing to measure the budget on: the run's check enforces it."""
        if not self.calib:
            return set()
        feeds = first_batch(float_model, self.calib, EVAL_ROWS)
        return keep_float_for_accuracy(float_model, scopes, quantize, feeds, self.min_cosine)

    def _keep_if_faster(
        self,
        model: ir.Model,
        placed: bool,
        original: ir.Model,
        float_model: ir.Model,
        quantize,
        kept: set[str],
        feeds,
        found: _Found,
    ) -> bool:
        """Time the input model, the placed int8 one and (when the profile moved scopes back to float)
        int8 everywhere the budget allows, side by side; ``model`` becomes the fastest, ``found``
        gets the timings (and loses the slow scopes when int8 everywhere won)."""
        candidates = {"float": original}
        if placed:
            candidates["placed"] = model
        if found.slow_float:
            candidates["int8"] = float_model.clone()
            quantize(candidates["int8"], kept)
            remove_unused(candidates["int8"])
        if len(candidates) == 1:
            return False

        def unsure(times: list[float]) -> bool:  # then a second timing must agree
            int8 = sorted(times[1:])
            return times[0] <= MIN_GAIN * int8[0] or (
                len(int8) > 1 and int8[1] < MIN_GAIN * int8[0]
            )

        ms = dict(zip(candidates, latencies(list(candidates.values()), feeds, unsure)))
        ms["float"] /= MIN_GAIN  # a gain within timing noise is not worth int8's error
        best = min(ms, key=ms.get)
        ms["float"] *= MIN_GAIN
        found.timed = (ms["float"], min(t for name, t in ms.items() if name != "float"))
        if best == "float":  # int8 is not faster here: hand back the input model
            model.graph = original.graph
            return False
        if best == "int8":  # the profile's placement lost to int8 everywhere when timed whole
            model.graph = candidates["int8"].graph
            found.slow_float = []
        return True

    def _smooth(self, model: ir.Model) -> bool:
        """SmoothQuant on the inputs of the MatMuls about to be quantized, before anything is calibrated."""
        if not self.smooth:
            return False
        nodes = (static_matmuls if self.mode == "static" else dynamic_matmuls)(model, self)
        return smooth_inputs(model, nodes, self.smooth, self.calib) > 0

    def excluded(self, node: ir.Node) -> bool:
        return any(p.fullmatch(node.name or "") for p in self._exclude)


@dataclasses.dataclass
class _Found:
    """What one int8 run decided and measured, for its notes and rows."""

    idle: bool = False
    kept_float: list[str] = dataclasses.field(default_factory=list)  # scopes, for accuracy
    slow_float: list[str] = dataclasses.field(default_factory=list)  # scopes, for speed
    profile: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)
    timed: tuple[float, float] | None = None  # whole-model ms (tune.STAT): float, fastest int8
    tune_shapes: str | None = None  # the note on the shapes tune=latency timed


def _option(name: str) -> Option:
    return next(o for o in Quantize.options if o.name == name)


def _refuse_weight_only_options(values: dict[str, Any]) -> None:
    """Options of the wquant pass given to quant without bits=4 (the pass would call them unknown)."""
    from onnxopt.passes.wquant.wquant import WeightQuantize  # quant(bits=4) is wquant's alias

    ours = {o.name for o in Quantize.options}
    theirs = {o.name for o in WeightQuantize.options}
    given = [k for k in values if k not in ours and k in theirs]
    if given:
        raise UsageError(
            f"pass quant: {', '.join(given)} apply to bits=4 only (quant(bits=4,...) is wquant)"
        )


def weight_only(values: dict[str, Any]) -> OptPass:
    """The wquant pass that ``quant(bits=4, ...)`` stands for. Its own options pass through; of the
    int8 ones, mode=static and smooth are refused, the rest checked and skipped with a note."""
    from onnxopt.passes.wquant.wquant import WeightQuantize  # imported here: wquant imports quant's

    theirs = {o.name for o in WeightQuantize.options}
    ours = {o.name: o for o in Quantize.options}
    passed, skipped = {}, []
    for key, value in values.items():
        if key in theirs:
            passed[key] = value
            continue
        if key not in ours:
            raise UsageError(
                f"pass quant: unknown option {key!r} (with bits=4, options: {', '.join(sorted(theirs))})"
            )
        converted = ours[key].convert(value, Quantize.name)
        refused = WEIGHT_ONLY_REFUSED.get(key)
        if refused and refused[0](converted):
            raise UsageError(f"pass quant: {refused[1]}")
        if key != "mode" and not (key == "smooth" and not converted):
            skipped.append(key)
    if "op_types" in passed:  # Gemm is an int8 op type that wquant leaves alone
        items = ours["op_types"].convert(passed["op_types"], Quantize.name)
        passed["op_types"] = [t for t in items if t != "Gemm"]
    return WeightQuantize(**passed).skipping(skipped)


def skipped_notes(skipped: list[str]) -> list[str]:
    """The note of quant(bits=4, ...) on the int8 options it was given and does not use."""
    notes = [TUNE_SKIPPED] if "tune" in skipped else []
    rest = [k for k in skipped if k != "tune"]
    if rest:
        verb = "does" if len(rest) == 1 else "do"
        notes.append(
            f"{', '.join(rest)} {verb} not apply to bits=4 (weight-only: activations stay float): "
            "skipped"
        )
    return notes


def listed(names: list[str], noun: str = "scopes") -> str:
    more = f" and {len(names) - NOTE_SCOPES} more" if len(names) > NOTE_SCOPES else ""
    return f"{len(names)} {noun} ({', '.join(names[:NOTE_SCOPES])}{more})"


def refuse_quantized(model: ir.Model, pass_name: str) -> None:
    found = sorted({n.op_type for g in model.graphs() for n in g if n.op_type in QUANTIZED_OPS})
    if found:
        raise UsageError(
            f"pass {pass_name}: the model is already quantized ({', '.join(found)}); "
            "quantize the float model instead"
        )
