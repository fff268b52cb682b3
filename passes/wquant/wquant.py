"""quant(bits=4): weight-only 4-bit blocks for MatMul weights and embedding tables.

Each MatMul whose B is a constant float32 [K, N] (or [1, ..., 1, K, N]) and each Gather on a
constant float32 table [V, D] along axis 0 gets 4-bit codes in blocks of ``block`` along K (along D
for a table), one scale (and, asymmetric, one 4-bit zero point) per block, from ``algo``:

- format=ort: com.microsoft MatMulNBits and GatherBlockQuantized (onnxruntime only);
- format=qdq: a blocked DequantizeLinear of an int4/uint4 initializer feeding the original node,
  standard ONNX at opset 21 (the model's opset is raised first, the conversion checked).

Weights are read and replaced one at a time, so memory holds one float weight beside the output.
Nodes matching ``keep_8bit`` stay weight-only at 8 bits: symmetric blocks (MatMulNBits with bits=8,
or an int8 blocked DequantizeLinear; see ``block_8bit``) and int8 tables (Gather, then DequantizeLinear).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes.wquant import algos as _int4_algos
from onnxopt.passes._common import add_initializer, constant, fresh_name, graphs_of, is_standard, rank, remove_unused, unique_names
from onnxopt.passes.wquant.algos import Blocks, block_8bit, rtn_8bit
from onnxopt.passes.wquant.mixed import auto_8bit, weight_of
from onnxopt.passes.wquant.gather import gather_block_quantized, gather_then_dequantize, table_initializers
from onnxopt.passes.wquant.pack import nbits_layout, qdq_layout
from onnxopt.passes._opset import raise_opset
from onnxopt.passes.quant.dynamic import _replace, quantize_gather

MS_DOMAIN = "com.microsoft"
QDQ_OPSET = 21  # DequantizeLinear with block_size and int4/uint4 inputs
CHUNK = 1 << 20  # weights per call of the algorithm
GPTQ_DAMP = 0.1  # of the Hessian's mean diagonal, added to it
# 8-bit MatMulNBits at accuracy level 0 ran 2.5x slower than at 4 on onnxruntime 1.32's CPU provider (MiniLM
# value projection, batch 1 x 64: 670 vs 263 us; fp32 MatMul 200 us), for sentence cosine 0.9921 vs 0.9917:
# 8-bit layers take level 4 unless accuracy_level asks for one
INT8_ACCURACY_LEVEL = 4


def quantize_int4(model: ir.Model, options) -> bool:
    """Rewrite the model's MatMul weights and embedding tables to 4 bits (8 where ``keep_8bit`` says);
    ``options.int4_layers`` gets, per quantized output name, what the report shows. False when idle."""
    options.int4_layers, options.kept_8bit = {}, []
    if not any(_target(n, options) for g in graphs_of(model) for n in g):
        return False
    if options.format == "qdq":
        raise_opset(model, QDQ_OPSET, options.example_shapes, "format=qdq")
    targets = [n for g in graphs_of(model) for n in g if _target(n, options)]
    hessians = _hessians(model, targets, options.calib) if options.int4_algo == "gptq" else {}
    done: dict[tuple, tuple] = {}  # a weight read by several nodes is quantized once per graph and width
    auto = auto_8bit(model, targets, options, _int4_one) if options.auto_8bit else set()
    for node in targets:
        if node in auto or options.keeps_8bit(node):
            options.kept_8bit.append(node.name or node.outputs[0].name)
            _8bit(node, options, done)
        elif node.op_type == "Gather":
            _gather(node, options, done)
        else:
            _matmul(node, options, hessians.get(node.inputs[0].name), done)
    if options.format == "ort":
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    remove_unused(model)
    unique_names(model)
    return True


def _int4_one(node: ir.Node, options) -> None:
    """``node`` alone to 4 bits (for keep_8bit=auto's trials)."""
    if node.op_type == "Gather":
        _gather(node, options, {})
    else:
        _matmul(node, options, None, {})


def _target(node: ir.Node, options) -> bool:
    """Whether the pass rewrites ``node``: a MatMul or embedding Gather with a constant float32 weight."""
    wanted = options.op_types.split("|")
    if options.excluded(node) or not is_standard(node, "MatMul", "Gather") or node.op_type not in wanted:
        return False
    w = constant(weight_of(node))
    if w is None or w.dtype != np.float32 or w.ndim < 2 or any(d != 1 for d in w.shape[:-2]):
        return False
    if node.op_type == "Gather":  # packed rows hold two codes per byte: the width must be even
        return w.ndim == 2 and w.shape[1] % 2 == 0 and node.attributes.get_int("axis", 0) == 0 and rank(node.inputs[1]) is not None
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
        part = algorithm(w[:, j:j + cols])
        squared += float(np.sum(np.square(part.dequantize() - w[:, j:j + cols]), dtype=np.float64))
        parts.append(part)
    blocks = Blocks(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")), k, parts[0].bits)
    return blocks, squared / w.size


def _algorithm(w: np.ndarray, options, hessian: np.ndarray | None) -> Blocks:
    if options.int4_algo == "gptq":
        if hessian is None:  # an embedding table: no input to weigh the error by
            return _int4_algos.hqq(w, options.block, options.symmetric)
        # act_order, a shrunk range per block and damp 0.1 measured best on MiniLM (with keep_8bit=auto:
        # top5 0.9004 at damp 0.1, 0.8988 at 0.01, 0.898 at 0.003)
        return _int4_algos.gptq(w, options.block, options.symmetric, hessian, damp=GPTQ_DAMP, act_order=True,
                                factors=_int4_algos.RANGE_FACTORS)
    return getattr(_int4_algos, options.int4_algo)(w, options.block, options.symmetric)


def _release(value: ir.Value) -> None:
    """Unmap a weight read from external data once it is quantized."""
    if isinstance(value.const_value, ir.ExternalTensor):
        value.const_value.release()


def _matmul(node: ir.Node, options, hessian: np.ndarray | None, done: dict, bits: int = 4) -> None:
    b = node.inputs[1]
    shape = tuple(b.const_value.shape)
    key = (node.graph, b, bits)
    if key not in done:
        if bits == 8:
            blocks, mse = _blocks(constant(b).reshape(shape[-2:]), lambda w: rtn_8bit(w, block_8bit(shape[-2])))
        else:
            blocks, mse = _blocks(constant(b).reshape(shape[-2:]), lambda w: _algorithm(w, options, hessian))
        _release(b)
        done[key] = _quantized_weight(node, blocks, options, shape), _layer(blocks, mse)
    quantized, layer = done[key]
    _report(options, node, layer)
    if options.format == "qdq":
        node.replace_input_with(1, quantized)
        return
    _replace(node, _matmul_nbits(node, *quantized, k=shape[-2], n=shape[-1], options=options, nd=len(shape),
                                 bits=layer["bits"], block=layer["block"]))


def _quantized_weight(node: ir.Node, blocks: Blocks, options, shape: tuple[int, ...]):
    """format=ort: the MatMulNBits initializers (B, scales, zero points or None); qdq: the output of a
    blocked DequantizeLinear of the 4-bit weight (as B's shape: leading ones kept), inserted before ``node``."""
    graph = node.graph
    base = node.name or node.outputs[0].name or "matmul"
    if options.format == "ort":
        packed, scales, zeros = nbits_layout(blocks)
        return (add_initializer(graph, packed, fresh_name(graph, base, "weight_int4")),
                add_initializer(graph, scales, fresh_name(graph, base, "weight_scale")),
                None if zeros is None else add_initializer(graph, zeros, fresh_name(graph, base, "weight_zero_point")))
    values, signed, scale, zero = qdq_layout(blocks)
    lead = (1,) * (len(shape) - 2)
    dtype = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4, (8, True): ir.DataType.INT8}[blocks.bits, signed]
    inputs = [_initializer(graph, values.reshape(lead + values.shape), dtype, fresh_name(graph, base, f"weight_{dtype.name.lower()}")),
              add_initializer(graph, scale.reshape(lead + scale.shape), fresh_name(graph, base, "weight_scale"))]
    if zero is not None:
        inputs.append(_initializer(graph, zero.reshape(lead + zero.shape), ir.DataType.UINT4, fresh_name(graph, base, "weight_zero_point")))
    dq = ir.node("DequantizeLinear", inputs, {"axis": len(shape) - 2, "block_size": blocks.q.shape[-1]}, name=f"{base}.dequantize_weight")
    out = dq.outputs[0]
    out.name, out.type, out.shape = f"{base}.weight", ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
    graph.insert_before(node, dq)
    return out


def _initializer(graph: ir.Graph, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Value:
    tensor = ir.Tensor(array, dtype=dtype)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _matmul_nbits(node: ir.Node, packed, scales, zeros, *, k: int, n: int, options, nd: int, bits: int,
                  block: int) -> list[ir.Node]:
    base = node.name or node.outputs[0].name or "matmul"
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block}
    level = options.accuracy_level or (INT8_ACCURACY_LEVEL if bits == 8 else 0)
    if level:  # left out at 0, as onnxruntime's quantizer does: other providers may not know it
        attributes["accuracy_level"] = level
    x = node.inputs[0]
    inputs = [x, packed, scales] + ([zeros] if zeros is not None else [])
    new = [ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{base}.int{bits}")]
    missing = nd - rank(x)
    if missing > 0:  # B's leading ones would have prefixed the output's shape with ones
        axes = add_initializer(node.graph, np.arange(missing, dtype=np.int64), fresh_name(node.graph, base, "leading_axes"))
        new.append(ir.node("Unsqueeze", [new[0].outputs[0], axes], name=f"{base}.leading_ones"))
    return new


def _gather(node: ir.Node, options, done: dict) -> None:
    key = (node.graph, node.inputs[0])
    if key not in done:
        blocks, mse = _blocks(constant(node.inputs[0]).T, lambda w: _algorithm(w, options, None))
        _release(node.inputs[0])
        done[key] = table_initializers(node, blocks), _layer(blocks, mse)
    table, layer = done[key]
    _report(options, node, layer)
    if options.format == "ort":
        gather_block_quantized(node, table, options.block)
    else:
        width = node.inputs[0].const_value.shape[1]
        gather_then_dequantize(node, table, options.block, width, rank(node.inputs[1]))


def _layer(blocks: Blocks, mse: float) -> dict:
    """What the report shows for a layer whose weight became ``blocks`` with this mean squared error."""
    return {
        "weight": f"{'int' if blocks.symmetric else 'uint'}{blocks.bits}", "bits": blocks.bits,
        "block": blocks.q.shape[-1], "weight_mse": mse,
        "weight_scale_min": float(blocks.scale.min()), "weight_scale_max": float(blocks.scale.max()),
        "weight_scale_count": int(blocks.scale.size)}


def _report(options, node: ir.Node, layer: dict) -> None:
    """Keyed by the output's name, which the rewritten layer keeps (the report matches it to the input model's)."""
    output = node.outputs[0].name
    options.int4_layers[output] = {"layer": node.name or output, "op": node.op_type, **layer}


def _8bit(node: ir.Node, options, done: dict) -> None:
    if node.op_type == "Gather":
        quantize_gather(node, options)
    else:
        _matmul(node, options, None, done, bits=8)


def _hessians(model: ir.Model, nodes: list[ir.Node], calib: str) -> dict[str, np.ndarray]:
    """X^T X of each MatMul input over the calibration data, by name (GPTQ weighs weight errors by it)."""
    from onnxopt.passes.wquant.calib import input_hessians  # imported here: only gptq needs calibration statistics

    return input_hessians(model, [n for n in nodes if n.op_type == "MatMul" and n.graph is model.graph], calib)[0]
