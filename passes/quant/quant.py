"""Quantization to int8: ``quant(mode=dynamic)`` (int8 weights, activations quantized at run time;
see ``_quant_dynamic``) and ``quant(mode=static, calib=...)`` (QDQ with calibrated ranges; see
``_quant_static``). Conv stays float in dynamic mode (ConvInteger is slow on CPU). ``quant(bits=4)``
is weight-only 4-bit blocks for MatMul weights and embedding tables (see ``_quant_int4``). Weights
held in Constant nodes are lifted first; already-quantized models are refused.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Option, OptPass

from onnxopt.passes._calibrate import first_batch
from onnxopt.passes._common import graphs_of, infer_shapes, lift_constants, remove_unused, unique_names
from onnxopt.passes.quant.dynamic import dynamic_matmuls, dynamic_quantizer
from onnxopt.passes.wquant.wquant import quantize_int4
from onnxopt.passes.quant.layers import layers as quant_layers
from onnxopt.passes.quant.search import EVAL_ROWS, keep_float_for_accuracy, keep_float_for_speed
from onnxopt.passes.quant.smooth import smooth_inputs
from onnxopt.passes.quant.static import static_matmuls, static_quantizer
from onnxopt.passes.quant.tune import latencies, tuning_feeds

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                 "GatherBlockQuantized", "QGemm", "QAttention"}
MODES = ("dynamic", "static")
METHODS = ("minmax", "percentile", "entropy")
OP_TYPES = ("MatMul", "Gemm", "Gather")
NOTE_SCOPES = 12  # scopes kept in float that the run's note names
MIN_GAIN = 1.05  # tune=latency keeps int8 only when it is at least this much faster than float
ALGOS = ("auto", "rtn", "hqq", "gptq")
FORMATS = ("ort", "qdq")
# 4-bit weights move raw outputs on the check's generated inputs much more than on real data (MiniLM:
# hidden-state cosine 0.94 on a [1, 1] input, 0.85 on [1, 64] of random tokens, for sentence embeddings
# at 0.956): the default budget of bits=4 only catches a broken model.
INT4_MIN_COSINE = 0.8
INT4_OPTIONS = ("block", "symmetric", "algo", "format", "accuracy_level", "keep_8bit")


class Quantize(OptPass):
    name = "quant"
    summary = "int8 quantization: dynamic (int8 weights per output channel, activations at run time) or static QDQ with calibrated ranges."
    exact = False
    options = (
        Option("mode", str, "dynamic", "dynamic (int8 weights, activations quantized at run time) or static (QDQ, ranges from calib)"),
        Option("per_channel", bool, True, "one weight scale per output channel (else one per tensor)"),
        Option("op_types", str, "MatMul|Gemm|Gather", "dynamic: op types to quantize, separated by |"),
        Option("exclude", str, "", "node names or regexes to keep in float, separated by |"),
        Option("reduce_range", bool, False, "7-bit weights, for CPUs without VNNI whose int8 kernels saturate"),
        Option("calib", str, "", "calibration data (.npz or folder, as validate's --inputs; random only to try): static ranges, dynamic outlier channels"),
        Option("outliers", float, 4.0, "with calib: channels whose range exceeds this many times the median channel's stay float (0: off)"),
        Option("max_outliers", int, 8, "at most this many float channels per quantized input"),
        Option("method", str, "percentile", "static: how calibration sets ranges: minmax, percentile or entropy"),
        Option("percentile", float, 99.99, "static, method=percentile: the percentile of each tail kept"),
        Option("activation_type", str, "uint8", "static: uint8 or int8 activations"),
        Option("symmetric_activations", bool, False, "static: activation ranges symmetric about 0 (zero point 0 or 128)"),
        Option("smooth", float, 0.0, "with calib: SmoothQuant alpha in (0, 1] moving activation outliers of MatMul inputs into the weights (0: off)"),
        Option("bias_correction", bool, False, "static: shift Conv/Gemm biases by the mean error the int8 weights add on calibration data"),
        Option("tune", str, "latency", "latency: profile int8 against float in onnxruntime, keep int8 only in scopes and models it makes faster; off: int8 wherever it fits"),
        Option("min_cosine", float, 0.99, "fidelity budget: the least output cosine the check accepts (bits=4: 0.8 unless given); with calib, the costliest layers stay float to hold it there"),
        Option("bits", int, 8, "8, or 4: weight-only 4-bit blocks for MatMul weights and embedding tables (for size and memory; mode, tune and smooth do not apply)"),
        Option("block", int, 32, "bits=4: weights per block along K (along the embedding dim for tables), each with its own scale; a power of two, at least 16"),
        Option("symmetric", bool, False, "bits=4: false: a 4-bit zero point per block (on MiniLM cos 0.973 vs 0.964 symmetric, +0.36 MB); true: symmetric about 0, no zero points, each block's largest-magnitude weight on code -8"),
        Option("algo", str, "auto", "bits=4: rtn (round to nearest), hqq (data-free fit of each block's scale and zero point), gptq (needs calib; embedding tables, with no input to weigh by, use hqq), or auto: gptq when calib is given, else rtn"),
        Option("format", str, "ort", "bits=4: ort (onnxruntime's MatMulNBits and GatherBlockQuantized) or qdq (blocked DequantizeLinear of int4 weights, standard ONNX at opset 21)"),
        Option("accuracy_level", int, 0, "bits=4, format=ort: MatMulNBits' least precision of its input: 0 as given, 1 fp32, 2 fp16, 3 bf16, 4 int8. 0 because on an AVX2 CPU without VNNI 4 was no faster at batch 1 and 10% slower at batch 32 on MiniLM, for the same accuracy; 8-bit layers (keep_8bit) take 4 at 0, their fast kernel on CPU; try 4 on CPUs with VNNI or ARM dot products"),
        Option("keep_8bit", str, "auto", "bits=4: MatMul/Gather node names or regexes, separated by |, to keep at 8 bits (weight-only) instead; auto: with calib, the layers whose 4 bits cost the outputs most per byte, within 1.5% more weight bytes (without calib: none)"),
    )

    def __init__(self, **values):
        super().__init__(**values)
        self._given = set(values)
        self._check_bits()
        if self.mode not in MODES:
            raise UsageError(f"pass quant: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        unknown = set(_split(self.op_types)) - set(OP_TYPES)
        if unknown:
            raise UsageError(f"pass quant: op_types names {', '.join(sorted(unknown))}; it takes {', '.join(OP_TYPES)}")
        try:
            self._exclude = [re.compile(p) for p in _split(self.exclude)]
        except re.error as e:
            raise UsageError(f"pass quant: exclude has a bad regex: {e}") from None
        if self.method not in METHODS:
            raise UsageError(f"pass quant: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise UsageError(f"pass quant: activation_type must be uint8 or int8, got {self.activation_type!r}")
        if not 50 < self.percentile <= 100:
            raise UsageError(f"pass quant: percentile must be in (50, 100], got {self.percentile}")
        if self.mode == "static" and not self.calib:
            raise UsageError("pass quant: mode=static needs calibration data: calib=PATH (.npz or folder), or calib=random")
        if self.tune not in ("off", "latency"):
            raise UsageError(f"pass quant: tune must be off or latency, got {self.tune!r}")
        if not 0 < self.min_cosine <= 1:
            raise UsageError(f"pass quant: min_cosine must be in (0, 1], got {self.min_cosine}")
        if not 0 <= self.smooth <= 1:
            raise UsageError(f"pass quant: smooth must be in [0, 1], got {self.smooth}")
        if self.smooth and not self.calib:
            raise UsageError("pass quant: smooth needs calib=PATH: SmoothQuant scales come from the activation ranges")
        if self.bias_correction and self.mode != "static":
            raise UsageError("pass quant: bias_correction needs mode=static")

    def _check_bits(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"pass quant: bits must be 4 or 8, got {self.bits}")
        given = [o for o in INT4_OPTIONS if o in self._given]
        if self.bits == 8 and given:
            raise UsageError(f"pass quant: {', '.join(given)} apply to bits=4 only")
        if self.block < 16 or self.block & (self.block - 1):
            raise UsageError(f"pass quant: block must be a power of two of at least 16, got {self.block}")
        if self.algo not in ALGOS:
            raise UsageError(f"pass quant: algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.format not in FORMATS:
            raise UsageError(f"pass quant: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.accuracy_level <= 4:
            raise UsageError(f"pass quant: accuracy_level must be 0 to 4, got {self.accuracy_level}")
        if self.keep_8bit.strip() == "auto" and "keep_8bit" in self._given and not self.calib:
            raise UsageError("pass quant: keep_8bit=auto needs calib=PATH: layers are ranked by output error on calibration samples")
        try:
            self._keep_8bit = [] if self.keep_8bit.strip() == "auto" else [re.compile(p) for p in _split(self.keep_8bit)]
        except re.error as e:
            raise UsageError(f"pass quant: keep_8bit has a bad regex: {e}") from None
        if self.bits != 4:
            return
        if self.mode == "static":
            raise UsageError("pass quant: bits=4 is weight-only: mode=static does not apply (leave mode at dynamic)")
        if self.smooth:
            raise UsageError("pass quant: smooth moves outliers out of int8 activations; bits=4 keeps activations float")
        if self.algo == "gptq" and not self.calib:
            raise UsageError("pass quant: algo=gptq needs calib=PATH: it weighs each weight's error by its inputs on the calibration data")

    def notes(self) -> list[str]:
        if self.bits == 4:
            return self._int4_notes()
        notes = []
        if getattr(self, "idle", False) and self.mode == "dynamic":
            notes.append(f"nothing to quantize: no {self.op_types} with a constant float weight outside exclude; "
                         "Conv stays float in dynamic mode: try mode=static,calib=PATH")
        elif getattr(self, "idle", False):
            notes.append("nothing to quantize: no node onnxruntime runs in int8 outside exclude (or the opset is below 10)")
        if getattr(self, "kept_float", None):
            notes.append(f"kept {_listed(self.kept_float)} in float to hold min_cosine={self.min_cosine:g} on the calibration samples")
        if getattr(self, "slow_float", None):
            notes.append(f"kept {_listed(self.slow_float)} in float: their int8 kernels were slower in onnxruntime's profile")
        if getattr(self, "tune_shapes", None):
            notes.append(self.tune_shapes)
        if getattr(self, "timed", None):
            fp, q = self.timed
            verdict = "kept int8" if fp / q >= MIN_GAIN else \
                f"int8 cannot speed up this model on this CPU (by {MIN_GAIN:g}x or more): kept the float model"
            notes.append(f"tune=latency: int8 p50 {q:.3f} ms vs float {fp:.3f} ms ({fp / q:.2f}x): {verdict}")
        return notes

    def _int4_notes(self) -> list[str]:
        notes = []
        if getattr(self, "idle", False):
            notes.append(f"nothing to quantize: no {'|'.join(t for t in _split(self.op_types) if t != 'Gemm')} "
                         "with a constant float32 weight outside exclude")
        if "tune" in self._given:
            notes.append("tune does not apply to bits=4 (int4 is for size and memory): skipped")
        if getattr(self, "kept_8bit", None):
            notes.append(f"kept {_listed(self.kept_8bit, 'nodes')} at 8 bits (keep_8bit)")
        return notes

    def fidelity(self) -> float:
        if self.bits == 4 and "min_cosine" not in self._given:
            return INT4_MIN_COSINE
        return self.min_cosine

    def layers(self, model: ir.Model) -> list[dict]:
        return quant_layers(model, self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _refuse_quantized(model)
        self.kept_float, self.slow_float, self.profile, self.timed, self.idle = [], [], [], None, False
        self.tune_shapes = None
        lift_constants(model)
        infer_shapes(model)  # both modes check the element types of the activations they quantize
        if self.bits == 4:
            modified = quantize_int4(model, self)
            self.idle = not modified
            return ir.passes.PassResult(model, modified)
        original = model.clone()  # what a float verdict of tune=latency hands back (shares the tensors)
        smoothed = self._smooth(model)
        planned = (static_quantizer if self.mode == "static" else dynamic_quantizer)(model, self)
        if planned is None:
            self.idle = True
            return ir.passes.PassResult(model, smoothed)
        quantize, scopes, timed = planned
        float_model = model.clone()
        kept = self._keep_for_accuracy(float_model, scopes, quantize)
        slow: set[str] = set()
        if self.tune == "latency":
            feeds, self.tune_shapes = tuning_feeds(float_model, self.calib, self.example_shapes)
            slow, self.profile = keep_float_for_speed(float_model, timed, quantize, kept, feeds)
        self.kept_float, self.slow_float = sorted(kept), sorted(slow)
        modified = quantize(model, kept | slow) or smoothed
        remove_unused(model)  # the float weights the int8 ones replace
        unique_names(model)
        if self.tune == "latency":
            modified = self._keep_if_faster(model, modified, original, float_model, quantize, kept, feeds)
        return ir.passes.PassResult(model, modified)

    def _keep_for_accuracy(self, float_model: ir.Model, scopes: list[str], quantize) -> set[str]:
        """Without calibration data there is nothing to measure the budget on: the run's check enforces it."""
        if not self.calib:
            return set()
        feeds = first_batch(float_model, self.calib, EVAL_ROWS)
        return keep_float_for_accuracy(float_model, scopes, quantize, feeds, self.min_cosine)

    def _keep_if_faster(self, model: ir.Model, placed: bool, original: ir.Model, float_model: ir.Model, quantize,
                        kept: set[str], feeds) -> bool:
        """Time the input model, the placed int8 one and (when the profile moved scopes back to float)
        int8 everywhere the budget allows, side by side; ``model`` becomes the fastest."""
        candidates = {"float": original}
        if placed:
            candidates["placed"] = model
        if self.slow_float:
            candidates["int8"] = float_model.clone()
            quantize(candidates["int8"], kept)
            remove_unused(candidates["int8"])
        if len(candidates) == 1:
            return False
        p50 = dict(zip(candidates, latencies(list(candidates.values()), feeds)))
        p50["float"] /= MIN_GAIN  # a gain within timing noise is not worth int8's error
        best = min(p50, key=p50.get)
        p50["float"] *= MIN_GAIN
        self.timed = (p50["float"], min(t for name, t in p50.items() if name != "float"))
        if best == "float":  # int8 is not faster here: hand back the input model
            model.graph = original.graph
            return False
        if best == "int8":  # the profile's placement lost to int8 everywhere when timed whole
            model.graph = candidates["int8"].graph
            self.slow_float = []
        return True

    def _smooth(self, model: ir.Model) -> bool:
        """SmoothQuant on the inputs of the MatMuls about to be quantized, before anything is calibrated."""
        if not self.smooth:
            return False
        nodes = (static_matmuls if self.mode == "static" else dynamic_matmuls)(model, self)
        return smooth_inputs(model, nodes, self.smooth, self.calib) > 0

    def excluded(self, node: ir.Node) -> bool:
        return any(p.fullmatch(node.name or "") for p in self._exclude)

    @property
    def int4_algo(self) -> str:
        """The 4-bit algorithm this run uses: ``algo``, auto resolved by whether calib is given."""
        return ("gptq" if self.calib else "rtn") if self.algo == "auto" else self.algo

    @property
    def auto_8bit(self) -> bool:
        """Whether keep_8bit=auto ranks the layers: it needs calibration data (the default does nothing without)."""
        return self.keep_8bit.strip() == "auto" and bool(self.calib)

    def keeps_8bit(self, node: ir.Node) -> bool:
        return any(p.fullmatch(node.name or "") for p in self._keep_8bit)


def _listed(names: list[str], noun: str = "scopes") -> str:
    more = f" and {len(names) - NOTE_SCOPES} more" if len(names) > NOTE_SCOPES else ""
    return f"{len(names)} {noun} ({', '.join(names[:NOTE_SCOPES])}{more})"


def _split(spec: str) -> list[str]:
    return [s.strip() for s in spec.split("|") if s.strip()]


def _refuse_quantized(model: ir.Model) -> None:
    found = sorted({n.op_type for g in graphs_of(model) for n in g if n.op_type in QUANTIZED_OPS})
    if found:
        raise UsageError(f"pass quant: the model is already quantized ({', '.join(found)}); quantize the float model instead")


