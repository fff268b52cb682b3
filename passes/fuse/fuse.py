"""Fusions: named rewrites that remove work, each with the opsets where it applies.

``fuse(skip=gelu|layernorm)`` leaves rules out, ``fuse(only=conv_bn)`` keeps only some; ``onnxopt
passes fuse`` lists them. ``target=ort`` lets rules emit onnxruntime's contrib ops; the default output
is standard ONNX. Every rule keeps the outputs equal up to float rounding (weights are refolded in
float64) and leaves a pattern alone when another reader needs an intermediate value.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Option, OptPass

from onnxopt.passes._common import graphs_of, infer_shapes, is_standard, lift_constants
from onnxopt.passes.fuse.rule import Context, Rule
from onnxopt.passes.fuse.rules import RULES
from onnxopt.passes.fuse.rules.activation import count_swish

MAX_SWEEPS = 8


class Fuse(OptPass):
    name = "fuse"
    summary = ("Named fusions: BatchNorm and per-channel affine into Conv/Gemm/MatMul, MatMul+Add to Gemm, Pad and Transpose "
               "into Conv/pools/Gemm, Clip and HardSwish, LayerNorm, GELU, shape chains; `onnxopt passes fuse` lists the rules.")
    options = (
        Option("skip", str, "", "rules to leave out, separated by |"),
        Option("only", str, "", "apply only these rules, separated by |"),
        Option("target", str, "onnx", "onnx (standard ops only) or ort (onnxruntime contrib ops allowed)"),
    )
    fixed_point = True

    def __init__(self, **values):
        super().__init__(**values)
        known = {r.name for r in RULES}
        for option in ("skip", "only"):
            unknown = set(_names(getattr(self, option))) - known
            if unknown:
                raise UsageError(f"pass fuse: {option} names unknown rules {', '.join(sorted(unknown))} "
                                 f"(rules: {', '.join(sorted(known))})")
        if self.target not in ("onnx", "ort"):
            raise UsageError(f"pass fuse: target must be onnx or ort, got {self.target!r}")

    @classmethod
    def details(cls) -> list[str]:
        lines = ["rules:"]
        for r in RULES:
            where = f"opset {r.min_opset}+" + (", target=ort" if r.target == "ort" else "")
            lines.append(f"  {r.name:<18} {r.summary} ({where})")
        return lines

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        return {"x * Sigmoid(x) (SiLU/swish: no fused op at this opset)": count_swish(model)}

    def rules(self, ctx: Context) -> dict[str, list[Rule]]:
        skip, only = set(_names(self.skip)), set(_names(self.only))
        chosen: dict[str, list[Rule]] = {}
        for r in RULES:
            if r.name in skip or (only and r.name not in only) or not r.applies(ctx):
                continue
            for op in r.ops:
                chosen.setdefault(op, []).append(r)
        return chosen

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = Context(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)), self.target)
        by_op = self.rules(ctx)
        modified = lift_constants(model)
        for _ in range(MAX_SWEEPS):
            infer_shapes(model)
            if not _sweep(model, by_op, ctx):
                break
            modified = True
        _import_domains(model)
        return ir.passes.PassResult(model, modified)


def _import_domains(model: ir.Model) -> None:
    """Contrib ops a rule emitted need their domain among the model's opset imports."""
    for graph in graphs_of(model):
        for node in graph:
            if not is_standard(node):
                model.opset_imports.setdefault(node.domain, 1)


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.replace(",", "|").split("|") if n.strip()]


def _sweep(model: ir.Model, by_op: dict[str, list[Rule]], ctx: Context) -> bool:
    changed = False
    for graph in graphs_of(model):
        for node in list(graph):
            if node.graph is not graph or not is_standard(node):
                continue
            for r in by_op.get(node.op_type, ()):
                if r.apply(node, ctx):
                    changed = True
                    break
    return changed
