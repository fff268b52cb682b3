"""wquant (``quant(bits=4)``): weight-only low-bit blocks for MatMul weights and embedding tables.

Each MatMul whose B is a constant float32 [K, N] (or [1, ..., 1, K, N]) and each Gather on a
constant float32 table [V, D] along axis 0 gets 4-bit codes in blocks of ``block`` along K (along D
for a table), one scale (and, asymmetric, one 4-bit zero point) per block, from ``algo``:

- format=ort: com.microsoft MatMulNBits and GatherBlockQuantized (onnxruntime only);
- format=qdq: a blocked DequantizeLinear of an int4/uint4 initializer feeding the original node,
  standard ONNX at opset 21 (the model's opset is raised first, the conversion checked).

Weights are read and replaced one at a time, so memory holds one float weight beside the output.
Nodes matching ``keep_8bit`` (and every target with bits=8) stay weight-only at 8 bits: symmetric
blocks (MatMulNBits with bits=8, or an int8 blocked DequantizeLinear; see ``block_8bit``) and int8
tables (Gather, then DequantizeLinear). Activations stay float.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Column, Option, OptPass, Outcome, run_context
from onnxopt.passes._common import (
    MS_DOMAIN,
    add_initializer,
    constant,
    fresh_name,
    infer_shapes,
    is_standard,
    lift_constants,
    rank,
    regexes,
    remove_unused,
    unique_names,
)
from onnxopt.passes._opset import raise_opset
from onnxopt.passes.quant.dynamic import _replace, quantize_gather
from onnxopt.passes.quant.layers import LIST, layers, scale_range
from onnxopt.passes.quant.quant import listed, refuse_quantized, skipped_notes
from onnxopt.passes.wquant import algos as _int4_algos
from onnxopt.passes.wquant.algos import Blocks, block_8bit, on_grid, rtn_8bit
from onnxopt.passes.wquant.gather import (
    gather_block_quantized,
    gather_then_dequantize,
    shared_block_quantized,
    table_initializers,
)
from onnxopt.passes.wquant.grid import extended_input, with_offsets
from onnxopt.passes.wquant.level import measured_level, set_level
from onnxopt.passes.wquant.mixed import auto_8bit, weight_of
from onnxopt.passes.wquant.pack import nbits_layout, qdq_layout

QDQ_OPSET = 21  # DequantizeLinear with block_size and int4/uint4 inputs
CHUNK = 1 << 20  # weights per call of the algorithm
GPTQ_DAMP = 0.1  # of the Hessian's mean diagonal, added to it
# 8-bit MatMulNBits at accuracy level 0 ran 2.5x slower than at 4 on onnxruntime 1.32's CPU provider (MiniLM
# value projection, batch 1 x 64: 670 vs 263 us; fp32 MatMul 200 us), for sentence cosine 0.9921 vs 0.9917:
# 8-bit layers take level 4 unless accuracy_level asks for one
INT8_ACCURACY_LEVEL = 4
ALGOS = ("auto", "rtn", "hqq", "gptq")
FORMATS = ("ort", "qdq")
OP_TYPES = ("MatMul", "Gather")
AUTO = "auto"  # keep_8bit's one value that is not a name
# 4-bit weights move raw outputs on the check's generated inputs much more than on real data (MiniLM:
# hidden-state cosine 0.94 on a [1, 1] input, 0.85 on [1, 64] of random tokens, for sentence embeddings
# at 0.956): the default budget of bits=4 only catches a broken model.
INT4_MIN_COSINE = 0.8
INT8_MIN_COSINE = 0.99  # bits=8 unless min_cosine is given, as quant's int8
FOUR = {"bits": (4,)}


class WeightQuantize(OptPass):
    name = "wquant"
    summary = (
        "weight-only low-bit quantization: MatMul weights and embedding tables in 4-bit blocks "
        "(8 where keep_8bit says, or everywhere with bits=8), activations stay float; for size and "
        "memory. quant(bits=4,...) is this pass."
    )
    exact = False
    options = (
        Option(
            "bits",
            int,
            4,
            "4: blocks of 4-bit codes from algo; 8: every layer as keep_8bit keeps it (symmetric "
            "8-bit blocks, int8 tables)",
            choices=(4, 8),
        ),
        Option(
            "block",
            int,
            32,
            "weights per block along K (along the embedding dim for tables), each with its own "
            "scale; a power of two",
            low=16,
            only_with=FOUR,
        ),
        Option(
            "symmetric",
            bool,
            False,
            "false: a 4-bit zero point per block (on MiniLM cos 0.973 vs 0.964 symmetric, +0.36 MB); "
            "true: symmetric about 0, no zero points, each block's largest-magnitude weight on code -8",
            only_with=FOUR,
        ),
        Option(
            "algo",
            str,
            AUTO,
            "rtn (round to nearest), hqq (data-free fit of each block's scale and zero point), gptq "
            "(needs calib; embedding tables, with no input to weigh by, use hqq), or auto: gptq "
            "when calib is given, else rtn",
            choices=ALGOS,
            only_with=FOUR,
        ),
        Option(
            "format",
            str,
            "ort",
            "ort (onnxruntime's MatMulNBits and GatherBlockQuantized) or qdq (blocked "
            "DequantizeLinear of int4 weights, standard ONNX at opset 21)",
            choices=FORMATS,
        ),
        Option(
            "accuracy_level",
            str,
            AUTO,
            "MatMulNBits' least precision of its input: 0 as given, 1 fp32, 2 fp16, 3 bf16, 4 int8; "
            "auto: 4 when the model runs at least 10% faster at it on this CPU, timed on 128 rows "
            "and, for a decoder with a cache, on one (SmolLM2-135M's decode step: 0.36-0.54x the time at "
            "4 on AVX2 without VNNI; MiniLM at batch 32 ran 12% slower at 4). 8-bit layers "
            "(keep_8bit) take 4 unless a level is given: their fast kernel on CPU",
            choices=(AUTO, "0", "1", "2", "3", "4"),
            only_with={"format": ("ort",)},
        ),
        Option(
            "grid",
            bool,
            True,
            "a weight already on a 4-bit grid (dequantized from a 4-bit checkpoint such as GGUF "
            "Q4_1) keeps its codes and steps exactly; the part of each block's offset an integer "
            "zero point cannot hold becomes 4-bit rows of the same MatMulNBits, its input joined "
            "with its block sums (SmolLM2-135M: perplexity +36% -> +10.6% data-free, 88.4 -> 92.4 MB)",
            only_with={"bits": (4,), "format": ("ort",)},
        ),
        Option(
            "keep_8bit",
            str,
            [AUTO],
            "MatMul/Gather node names or regexes (full match) to keep at 8 bits (weight-only) "
            "instead; or auto alone: with calib, the layers whose 4 bits cost the outputs most per "
            "byte, within 1.5% more weight bytes (without calib: none)",
            many=True,
            only_with=FOUR,
        ),
        Option(
            "calib",
            str,
            "",
            "calibration data (.npz or folder, as validate's --inputs; random only to try): "
            "for algo=gptq and keep_8bit=auto",
            only_with=FOUR,
        ),
        Option(
            "exclude",
            str,
            [],
            "node names or regexes (full match) to keep in float",
            many=True,
        ),
        Option(
            "op_types",
            str,
            list(OP_TYPES),
            "op types to quantize: MatMul weights, embedding tables (Gather)",
            choices=OP_TYPES,
            many=True,
        ),
        Option(
            "per_channel",
            bool,
            True,
            "8-bit tables (keep_8bit, bits=8): one scale per embedding dim (else one per table)",
        ),
        Option(
            "min_cosine",
            float,
            INT4_MIN_COSINE,
            f"fidelity budget: the least output cosine the check accepts, above 0 ({INT8_MIN_COSINE:g} "
            "with bits=8 unless given). 4-bit weights move outputs on generated inputs much more than "
            "on real data: the default only catches a broken model",
            low=0,
            high=1,
        ),
    )
    columns = (
        Column("layer", "layer"),
        Column("op", "op"),
        Column("weight", "weight"),
        Column("activation", "activation"),
        Column("block", "block", "d"),
        Column("weight_mse", "weight MSE", ".3g"),
        Column("weight_scale_min", "weight scale", scale_range),
    )
    skipped: tuple[str, ...] = ()  # int8 options quant(bits=4, ...) was given, for its note

    def __init__(self, **values: Any):
        super().__init__(**values)
        where = f"pass {self.name}"
        if self.block & (self.block - 1):
            raise UsageError(
                f"{where}: block must be a power of two of at least 16, got {self.block}"
            )
        if self.min_cosine <= 0:
            raise UsageError(f"{where}: min_cosine must be in (0, 1], got {self.min_cosine}")
        if AUTO in self.keep_8bit and len(self.keep_8bit) > 1:
            raise UsageError(f"{where}: keep_8bit=auto stands alone, not among names")
        if self.keep_8bit == [AUTO] and "keep_8bit" in self.given and not self.calib:
            raise UsageError(
                f"{where}: keep_8bit=auto needs calib=PATH: layers are ranked by output error on "
                "calibration samples"
            )
        if self.algo == "gptq" and not self.calib:
            raise UsageError(
                f"{where}: algo=gptq needs calib=PATH: it weighs each weight's error by its inputs "
                "on the calibration data"
            )
        self._exclude = regexes(self.exclude, "exclude", where)
        self._keep_8bit = (
            [] if self.keep_8bit == [AUTO] else regexes(self.keep_8bit, "keep_8bit", where)
        )

    def skipping(self, skipped: list[str]) -> WeightQuantize:
        """This pass as ``quant(bits=4, ...)`` built it, given the int8 options in ``skipped``."""
        self.skipped = tuple(skipped)
        return self

    def call(self, model: ir.Model) -> Outcome:
        refuse_quantized(model, self.name)
        lift_constants(model)
        infer_shapes(model)  # the targets' activations must be known to be float
        shapes = run_context().shapes
        result = quantize_int4(model, self, shapes)
        notes = self._notes(result)
        if result.modified and self.format == "ort" and self.accuracy_level == AUTO:
            level, note = measured_level(model, shapes)
            set_level(model, level)
            notes += [note] if note else []
        rows = layers(model, lambda node: _why_float(node, self), result.layers)
        return Outcome(model, result.modified, notes, rows, self.budget)

    def _notes(self, result: Quantized) -> list[str]:
        notes = []
        if not result.modified:
            notes.append(
                f"nothing to quantize: no {'|'.join(self.op_types)} with a constant float32 weight "
                "outside exclude"
            )
        notes += skipped_notes(list(self.skipped))
        grids = sum(1 for layer in result.layers.values() if layer.get("grid"))
        if grids:
            notes.append(
                f"{grids} weights were already on a 4-bit grid (dequantized from a 4-bit checkpoint): "
                "their codes and steps are kept exactly, block offsets restored in 4 bits (grid=true)"
            )
        if result.kept_8bit:
            notes.append(f"kept {_listed(result.kept_8bit)} at 8 bits (keep_8bit)")
        return notes

    @property
    def budget(self) -> float:
        """The fidelity budget: min_cosine, whose default depends on bits."""
        if self.bits == 8 and "min_cosine" not in self.given:
            return INT8_MIN_COSINE
        return self.min_cosine

    @property
    def level(self) -> int:
        """accuracy_level as a number; 0 for auto until the pass has timed it."""
        return 0 if self.accuracy_level == AUTO else int(self.accuracy_level)

    @property
    def int4_algo(self) -> str:
        """The 4-bit algorithm this run uses: ``algo``, auto resolved by whether calib is given."""
        return ("gptq" if self.calib else "rtn") if self.algo == AUTO else self.algo

    @property
    def auto_8bit(self) -> bool:
        """Whether keep_8bit=auto ranks the layers: it needs calibration data (the default does nothing without)."""
        return self.bits == 4 and self.keep_8bit == [AUTO] and bool(self.calib)

    def excluded(self, node: ir.Node) -> bool:
        return any(p.fullmatch(node.name or "") for p in self._exclude)

    def keeps_8bit(self, node: ir.Node) -> bool:
        return self.bits == 8 or any(p.fullmatch(node.name or "") for p in self._keep_8bit)


@dataclasses.dataclass
class Quantized:
    """What ``quantize_int4`` did: whether it changed the model, what the report shows per
    rewritten layer (by the output name the layer keeps), and the nodes kept at 8 bits by keep_8bit."""

    modified: bool = False
    layers: dict[str, dict] = dataclasses.field(default_factory=dict)
    kept_8bit: list[str] = dataclasses.field(default_factory=list)


def quantize_int4(model: ir.Model, options: WeightQuantize, shapes=None) -> Quantized:
    """Rewrite the model's MatMul weights and embedding tables to 4 bits (8 where ``keep_8bit`` says,
    or all with bits=8) as the ``options`` of a WeightQuantize say; ``shapes`` are the user's input
    shapes, for the check of an opset raise (format=qdq)."""
    result = Quantized()
    tied = _untranspose_weights(model, options)
    if options.format != "ort":  # a blocked DequantizeLinear's layout is not the lookup's: apart
        tied = {}
    if not any(_target(n, options) for g in model.graphs() for n in g):
        return result
    if options.format == "qdq":
        raise_opset(model, QDQ_OPSET, dict(shapes or {}), "format=qdq")
    # MatMuls first: a tied head's blocks are then there for its table's lookup to share
    targets = sorted(
        (n for g in model.graphs() for n in g if _target(n, options)),
        key=lambda n: n.op_type == "Gather",
    )
    algo = options.int4_algo
    hessians, exact = {}, set()
    if options.bits == 4 and (algo == "gptq" or options.auto_8bit):
        # layers kept exactly by grid need no statistics and cost nothing at 4 bits
        exact = {n for n in targets if _grid_blocks(n, options, tied.get(n.inputs[1])) is not None}
        measured = [n for n in targets if n not in exact]
        hessians = _hessians(model, measured, options.calib) if measured else {}
    # a weight read by several nodes is quantized once per graph and width
    done: dict[tuple, tuple] = {}
    auto = auto_8bit(targets, options, hessians, exact) if options.auto_8bit else set()
    for node in targets:
        if node in auto or options.keeps_8bit(node):
            if options.bits == 4:
                result.kept_8bit.append(node.name or node.outputs[0].name)
            _8bit(node, options, done, result.layers)
        elif node.op_type == "Gather":
            _gather(node, options, algo, done, result.layers)
        else:
            _matmul(
                node,
                options,
                algo,
                hessians.get(node.inputs[0].name),
                done,
                result.layers,
                source=tied.get(node.inputs[1]),
            )
    if options.format == "ort":
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    remove_unused(model)
    unique_names(model)
    result.modified = True
    return result


def _untranspose_weights(model: ir.Model, options) -> dict[ir.Value, ir.Value]:
    """MatMul(x, Transpose(C)) with C a constant [N, K] reads C as its weight [K, N]: a decoder's
    head tied to its embedding table (SmolLM2's [49152, 576], 113 MB, stayed fp32 behind its
    Transpose). The MatMul then reads C's transpose as a constant of its own (a view of C's data
    until it is quantized). Returns each such weight's C: with format=ort the head's 4-bit blocks
    are then also the table's, stored once (see ``_gather``)."""
    tied = _gemms_as_matmuls(model, options)
    for graph in model.graphs():
        for node in list(graph):
            if not is_standard(node, "MatMul") or options.excluded(node):
                continue
            t = node.inputs[1].producer() if node.inputs[1] is not None else None
            if t is None or not is_standard(t, "Transpose") or t.graph is not graph:
                continue
            c = constant(t.inputs[0])
            perm = t.attributes.get_ints("perm", [1, 0])
            if c is None or c.dtype != np.float32 or c.ndim != 2 or list(perm) != [1, 0]:
                continue
            base = t.inputs[0].name or "weight"
            weight = add_initializer(graph, c.T, fresh_name(graph, base, "transposed"))
            node.replace_input_with(1, weight)
            if not _target(node, options):  # left as it was: no float copy of the table
                node.replace_input_with(1, t.outputs[0])
                graph.initializers.pop(weight.name)
            else:
                tied[weight] = t.inputs[0]
    return tied


def _gemms_as_matmuls(model: ir.Model, options) -> dict[ir.Value, ir.Value]:
    """Gemm(x, B, C) with a constant float32 B (alpha and beta 1, x not transposed) becomes MatMul(x,
    W) + C, W being B or, with transB=1 (a head exported as a Linear), a view of B's transpose, so the
    pass quantizes it as any MatMul; left as it was when the MatMul is not a target. Returns each
    transposed W's B, which a lookup of the same table then shares (see ``_untranspose_weights``)."""
    tied = {}
    for graph in model.graphs():
        for gemm in list(graph):
            a = gemm.attributes
            if (
                not is_standard(gemm, "Gemm")
                or options.excluded(gemm)
                or a.get_int("transA", 0)
                or a.get_float("alpha", 1.0) != 1.0
                or a.get_float("beta", 1.0) != 1.0
            ):
                continue
            b = constant(gemm.inputs[1])
            if b is None or b.dtype != np.float32 or b.ndim != 2:
                continue
            transposed = bool(a.get_int("transB", 0))
            weight = add_initializer(
                graph,
                b.T if transposed else b,
                fresh_name(graph, gemm.inputs[1].name, "transposed" if transposed else "matmul"),
            )
            matmul = ir.node("MatMul", [gemm.inputs[0], weight], name=gemm.name)
            if not _target(matmul, options):
                graph.initializers.pop(weight.name)
                continue
            new = [matmul]
            if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
                new.append(
                    ir.node("Add", [matmul.outputs[0], gemm.inputs[2]], name=f"{gemm.name}.bias")
                )
            source = gemm.inputs[1]
            matmul.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            matmul.outputs[0].shape = gemm.outputs[0].shape
            _replace(gemm, new)
            if transposed:
                tied[weight] = source
    return tied


def _target(node: ir.Node, options) -> bool:
    """Whether the pass rewrites ``node``: a MatMul or embedding Gather with a constant float32 weight."""
    if (
        options.excluded(node)
        or not is_standard(node, "MatMul", "Gather")
        or node.op_type not in options.op_types
    ):
        return False
    w = constant(weight_of(node))
    if w is None or w.dtype != np.float32 or w.ndim < 2 or any(d != 1 for d in w.shape[:-2]):
        return False
    if (
        node.op_type == "Gather"
    ):  # packed 4-bit rows hold two codes per byte: the width must be even
        return (
            w.ndim == 2
            and (w.shape[1] % 2 == 0 or options.bits == 8)
            and node.attributes.get_int("axis", 0) == 0
            and rank(node.inputs[1]) is not None
        )
    x = node.inputs[0]
    if x is None or x.dtype != ir.DataType.FLOAT:
        return False
    return options.format == "qdq" or (rank(x) or 0) >= 2  # MatMulNBits needs A as [..., M, K]


def _blocks(w: np.ndarray, algorithm) -> tuple[Blocks, float]:
    """``w`` [K, N] as the Blocks ``algorithm(columns)`` makes, and the mean squared error of the weights
    they stand for. Columns are quantized independently, ``CHUNK`` weights at a time, so the algorithms'
    float temporaries stay small beside a large table (whose columns, as ``table.T``, are its rows: read
    in order)."""
    k, n = w.shape
    cols = max(1, CHUNK // k)
    parts, squared = [], 0.0
    for j in range(0, n, cols):
        part = algorithm(w[:, j : j + cols])
        squared += float(
            np.sum(np.square(part.dequantize() - w[:, j : j + cols]), dtype=np.float64)
        )
        parts.append(part)
    blocks = Blocks(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")),
        k,
        parts[0].bits,
    )
    return blocks, squared / w.size


def _algorithm(w: np.ndarray, options, algo: str, hessian: np.ndarray | None) -> Blocks:
    if algo == "gptq":
        if hessian is None:  # an embedding table: no input to weigh the error by
            return _int4_algos.hqq(w, options.block, options.symmetric)
        # act_order, a shrunk range per block and damp 0.1 measured best on MiniLM (with keep_8bit=auto:
        # top5 0.9004 at damp 0.1, 0.8988 at 0.01, 0.898 at 0.003)
        return _int4_algos.gptq(
            w,
            options.block,
            options.symmetric,
            hessian,
            damp=GPTQ_DAMP,
            act_order=True,
            factors=_int4_algos.RANGE_FACTORS,
        )
    return getattr(_int4_algos, algo)(w, options.block, options.symmetric)


def _release(value: ir.Value) -> None:
    """Unmap a weight read from external data once it is quantized."""
    if isinstance(value.const_value, ir.ExternalTensor):
        try:
            value.const_value.release()
        except BufferError:  # a view of it is still to be quantized (a tied head's transpose)
            pass


def _matmul(
    node: ir.Node,
    options,
    algo: str | None,
    hessian: np.ndarray | None,
    done: dict,
    found: dict,
    bits: int = 4,
    source: ir.Value | None = None,
) -> None:
    """``node``'s B as ``bits``-bit blocks (``algo``'s at 4 bits), its report row into ``found``.
    ``source``: the table whose transpose B is (a tied head); its lookup will share these blocks."""
    b = node.inputs[1]
    shape = tuple(b.const_value.shape)
    key = (node.graph, source or b, bits)
    grid = _grid_blocks(node, options, source) if key not in done and bits == 4 else None
    if grid is not None:
        blocks = with_offsets(*grid)
        _release(b)
        done[key] = (
            _quantized_weight(node, blocks, options, shape),
            {**_layer(blocks, 0.0), "grid": True},
        )
    if key not in done:
        if bits == 8:
            blocks, mse = _blocks(
                constant(b).reshape(shape[-2:]), lambda w: rtn_8bit(w, block_8bit(shape[-2]))
            )
        else:
            blocks, mse = _blocks(
                constant(b).reshape(shape[-2:]), lambda w: _algorithm(w, options, algo, hessian)
            )
        _release(b)
        done[key] = _quantized_weight(node, blocks, options, shape), _layer(blocks, mse)
        if source is not None and bits == 4:
            done[key, "zero"] = None if blocks.symmetric else blocks.zero
    quantized, layer = done[key]
    _report(found, node, layer)
    if options.format == "qdq":
        node.replace_input_with(1, quantized)
        return
    new, x = [], node.inputs[0]
    if layer.get("grid"):  # the input with its block sums: see grid.py
        new, x = extended_input(node, shape[-2], layer["block"], done)
    new += _matmul_nbits(
        node,
        *quantized,
        k=shape[-2] + (shape[-2] // layer["block"] if layer.get("grid") else 0),
        n=shape[-1],
        options=options,
        nd=len(shape),
        bits=layer["bits"],
        block=layer["block"],
        x=x,
    )
    _replace(node, new)


def _grid_blocks(node: ir.Node, options, source: ir.Value | None):
    """``algos.on_grid`` of a MatMul's 2-D weight when grid applies to it (format=ort, not a tied
    head), else None."""
    if not (
        options.grid and options.format == "ort" and node.op_type == "MatMul" and source is None
    ):
        return None
    w = constant(node.inputs[1])
    return on_grid(w, options.block) if w is not None and w.ndim == 2 else None


def _quantized_weight(node: ir.Node, blocks: Blocks, options, shape: tuple[int, ...]):
    """format=ort: the MatMulNBits initializers (B, scales, zero points or None); qdq: the output of a
    blocked DequantizeLinear of the 4-bit weight (as B's shape: leading ones kept), inserted before ``node``."""
    graph = node.graph
    base = node.name or node.outputs[0].name or "matmul"
    if options.format == "ort":
        packed, scales, zeros = nbits_layout(blocks)
        return (
            add_initializer(graph, packed, fresh_name(graph, base, "weight_int4")),
            add_initializer(graph, scales, fresh_name(graph, base, "weight_scale")),
            None
            if zeros is None
            else add_initializer(graph, zeros, fresh_name(graph, base, "weight_zero_point")),
        )
    values, signed, scale, zero = qdq_layout(blocks)
    lead = (1,) * (len(shape) - 2)
    dtype = {
        (4, True): ir.DataType.INT4,
        (4, False): ir.DataType.UINT4,
        (8, True): ir.DataType.INT8,
    }[blocks.bits, signed]
    inputs = [
        _initializer(
            graph,
            values.reshape(lead + values.shape),
            dtype,
            fresh_name(graph, base, f"weight_{dtype.name.lower()}"),
        ),
        add_initializer(
            graph, scale.reshape(lead + scale.shape), fresh_name(graph, base, "weight_scale")
        ),
    ]
    if zero is not None:
        inputs.append(
            _initializer(
                graph,
                zero.reshape(lead + zero.shape),
                ir.DataType.UINT4,
                fresh_name(graph, base, "weight_zero_point"),
            )
        )
    dq = ir.node(
        "DequantizeLinear",
        inputs,
        {"axis": len(shape) - 2, "block_size": blocks.q.shape[-1]},
        name=f"{base}.dequantize_weight",
    )
    out = dq.outputs[0]
    out.name, out.type, out.shape = (
        f"{base}.weight",
        ir.TensorType(ir.DataType.FLOAT),
        ir.Shape(shape),
    )
    graph.insert_before(node, dq)
    return out


def _initializer(graph: ir.Graph, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Value:
    tensor = ir.Tensor(array, dtype=dtype)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _matmul_nbits(
    node: ir.Node,
    packed,
    scales,
    zeros,
    *,
    k: int,
    n: int,
    options,
    nd: int,
    bits: int,
    block: int,
    x: ir.Value,
) -> list[ir.Node]:
    base = node.name or node.outputs[0].name or "matmul"
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
    level = options.level or (INT8_ACCURACY_LEVEL if bits == 8 else 0)
    if level:  # left out at 0 (and for auto to set), as onnxruntime's quantizer does: other providers may not know it
        attributes["accuracy_level"] = level
    inputs = [x, packed, scales] + ([zeros] if zeros is not None else [])
    new = [ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{base}.int{bits}")]
    missing = nd - rank(x)
    if missing > 0:  # B's leading ones would have prefixed the output's shape with ones
        axes = add_initializer(
            node.graph,
            np.arange(missing, dtype=np.int64),
            fresh_name(node.graph, base, "leading_axes"),
        )
        new.append(ir.node("Unsqueeze", [new[0].outputs[0], axes], name=f"{base}.leading_ones"))
    return new


def _gather(node: ir.Node, options, algo: str, done: dict, found: dict) -> None:
    key = (node.graph, node.inputs[0], 4)
    if (key, "zero") in done and node.inputs[0].const_value.shape[1] % options.block == 0:
        (packed, scales, _), layer = done[key]
        _report(found, node, layer)
        shared_block_quantized(node, packed, scales, done[key, "zero"], options.block)
        return
    if key not in done:
        blocks, mse = _blocks(
            constant(node.inputs[0]).T, lambda w: _algorithm(w, options, algo, None)
        )
        _release(node.inputs[0])
        done[key] = table_initializers(node, blocks), _layer(blocks, mse)
    table, layer = done[key]
    _report(found, node, layer)
    if options.format == "ort":
        gather_block_quantized(node, table, options.block)
    else:
        width = node.inputs[0].const_value.shape[1]
        gather_then_dequantize(node, table, options.block, width, rank(node.inputs[1]))


def _layer(blocks: Blocks, mse: float) -> dict:
    """What the report shows for a layer whose weight became ``blocks`` with this mean squared error."""
    return {
        "weight": f"{'int' if blocks.symmetric else 'uint'}{blocks.bits}",
        "bits": blocks.bits,
        "block": blocks.q.shape[-1],
        "weight_mse": mse,
        "weight_scale_min": float(blocks.scale.min()),
        "weight_scale_max": float(blocks.scale.max()),
        "weight_scale_count": int(blocks.scale.size),
    }


def _report(found: dict, node: ir.Node, layer: dict) -> None:
    """Keyed by the output's name, which the rewritten layer keeps (the report matches it to the input model's)."""
    output = node.outputs[0].name
    found[output] = {"layer": node.name or output, "op": node.op_type, **layer}


def _8bit(node: ir.Node, options, done: dict, found: dict) -> None:
    """Weight-only 8 bits: an int8 table (its row comes from the graph), or symmetric 8-bit blocks."""
    if node.op_type == "Gather":
        quantize_gather(node, options.per_channel)
    else:
        _matmul(node, options, None, None, done, found, bits=8)


def _hessians(model: ir.Model, nodes: list[ir.Node], calib: str) -> dict[str, np.ndarray]:
    """X^T X of each MatMul input over the calibration data, by name (GPTQ weighs weight errors by it)."""
    # imported here: only gptq needs calibration statistics
    from onnxopt.passes.wquant.calib import input_hessians

    return input_hessians(
        model, [n for n in nodes if n.op_type == "MatMul" and n.graph is model.graph], calib
    )[0]


def _why_float(node: ir.Node, options: WeightQuantize) -> str | None:
    """Why a Conv, MatMul or Gemm stayed float (the report's rows)."""
    if options.excluded(node):
        return f"matches exclude={LIST.join(options.exclude)}"
    if node.op_type == "Gemm":
        return "a Gemm is quantized only with a constant float32 B, alpha = beta = 1 and transA = 0"
    if node.op_type != "MatMul":
        return f"{node.op_type} is not quantized weight-only: MatMul weights and tables are"
    if node.op_type not in options.op_types:
        return f"not in op_types={LIST.join(options.op_types)}"
    if len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return "its weight is not a constant"
    if constant(node.inputs[1]).dtype != np.float32:
        return "its weight is not float32"
    if node.inputs[0] is None or node.inputs[0].dtype != ir.DataType.FLOAT:
        return "its input is not known to be float32"
    if not _target(node, options):
        return (
            "its weight is not [K, N] (leading ones allowed), or its input has rank 1 (format=ort)"
        )
    return None


def _listed(names: list[str]) -> str:
    return listed(names, "nodes")
