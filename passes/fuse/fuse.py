"""Fusions: named rewrites that remove work, each with the opsets where it applies.

``fuse(skip=gelu;layernorm)`` leaves rules out, ``fuse(only=conv_bn)`` keeps only some (``|`` also
separates names); ``onnxopt passes fuse`` lists them. ``target=ort`` lets rules emit onnxruntime's
contrib ops; the default output is standard ONNX. Every rule keeps the outputs equal up to float
rounding (weights are refolded in float64) and leaves a pattern alone when another reader needs an
intermediate value. ``Fuse().explain(model)`` tells, node by node, which rule would fire and why
each other candidate does not.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.passbase import Option, OptPass, Outcome
from onnxopt.passes._common import infer_shapes, is_standard, lift_constants
from onnxopt.passes.fuse.rule import Context, Rule
from onnxopt.passes.fuse.rules import RULES
from onnxopt.passes.fuse.rules.activation import count_swish

MAX_SWEEPS = 8
TARGETS = ("onnx", "ort")
TENSOR = ir.AttributeType.TENSOR


class Explanation(NamedTuple):
    """One candidate rule at one node: whether it would fire, and why not."""

    node: str  # the node's name, or <its first output's name> where it has none
    op_type: str
    rule: str
    fires: bool
    reason: str  # "fires", or why the rule does not fire there


class Fuse(OptPass):
    name = "fuse"
    summary = (
        "Named fusions: BatchNorm and per-channel affine into Conv/Gemm/MatMul, MatMul+Add to Gemm, "
        "Pad and Transpose into Conv/pools/Gemm, Clip and HardSwish, LayerNorm, GELU, shape chains; "
        "`onnxopt passes fuse` lists the rules."
    )
    options = (
        Option("skip", str, (), "rules to leave out (| also separates)", many=True),
        Option("only", str, (), "apply only these rules (| also separates)", many=True),
        Option(
            "target",
            str,
            "onnx",
            "onnx (standard ops only) or ort (onnxruntime contrib ops allowed)",
            choices=TARGETS,
        ),
    )
    fixed_point = True

    def __init__(self, **values):
        target = values.get("target", "onnx")
        if str(target).strip() not in TARGETS:  # before the option's own check, to say it plainly
            raise UsageError(f"pass fuse: target must be onnx or ort, got {target!r}")
        super().__init__(**values)
        known = [r.name for r in RULES]
        for option in ("skip", "only"):
            names = _names(getattr(self, option))
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UsageError(
                    f"pass fuse: {option} names unknown rules {', '.join(sorted(unknown))} "
                    f"(rules: {', '.join(sorted(known))})"
                )
            setattr(self, option, names)

    @classmethod
    def details(cls) -> list[str]:
        lines = ["rules, in the order they are tried on a node:"]
        for r in RULES:
            where = f"opset {r.min_opset}+" + (", target=ort" if r.target == "ort" else "")
            lines.append(f"  {r.name:<18} {r.summary} ({where})")
        return lines

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        return {"x * Sigmoid(x) (SiLU/swish: no fused op at this opset)": count_swish(model)}

    def left_out(self, r: Rule, ctx: Context) -> str | None:
        """Why this pass does not try ``r`` on a model of ``ctx`` at all, or None where it does."""
        if r.name in self.skip:
            return "left out by skip"
        if self.only and r.name not in self.only:
            return "not among only"
        return r.unavailable(ctx)

    def rules(self, ctx: Context) -> dict[str, list[Rule]]:
        """The rules this pass tries, by the op type they anchor on, in RULES order."""
        chosen: dict[str, list[Rule]] = {}
        for r in RULES:
            if self.left_out(r, ctx) is None:
                for op in r.ops:
                    chosen.setdefault(op, []).append(r)
        return chosen

    def call(self, model: ir.Model) -> Outcome:
        ctx = _context(model, self.target)
        by_op = self.rules(ctx)
        modified = lift_constants(model)
        for _ in range(MAX_SWEEPS):
            infer_shapes(model)
            if not _sweep(model, by_op, ctx):
                break
            modified = True
        _import_domains(model)
        notes = [
            f"rule {r.name} {reason}: not applied"
            for r in RULES
            if r.name in self.only and (reason := r.unavailable(ctx))
        ]
        return Outcome(model, modified, notes=notes)

    def explain(self, model: ir.Model, *, fused: bool = False) -> list[Explanation]:
        """Every candidate rule at every node a rule anchors on, in the order the pass tries them:
        the first that matches fires (the rest are not tried there), each other says why not.

        ``model`` stays as it is: the matches run on a copy, with constants lifted and shapes
        inferred as the pass does. ``fused``: explain the copy as this pass leaves it, to see why
        what is left did not fuse. The rows are the state before any rewrite otherwise: a rule
        may fire later on a pattern another rule exposes.
        """
        copy = _copy(model)
        if fused:
            self.call(copy)
        lift_constants(copy)
        infer_shapes(copy)
        ctx = _context(copy, self.target)
        rows = []
        for graph in list(copy.graphs()):
            for node in graph:
                if not is_standard(node):
                    continue
                label = node.name or f"<{node.outputs[0].name if node.outputs else ''}>"
                winner = None
                for r in RULES:
                    if node.op_type not in r.ops:
                        continue
                    if winner is not None:
                        reason = f"not tried: {winner} fires first"
                    elif (reason := self.left_out(r, ctx)) is None:
                        found = r.match(node, ctx)
                        if found:
                            winner, reason = r.name, "fires"
                        else:
                            reason = found.reason
                    rows.append(Explanation(label, node.op_type, r.name, winner == r.name, reason))
        return rows


def _context(model: ir.Model, target: str) -> Context:
    return Context(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)), target)


def _copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` to change freely. It shares ``model``'s tensors, but for those of
    Constant nodes, which it wraps: lifted into initializers they would take new names."""
    if not hasattr(model, "clone"):  # onnx-ir before 0.1.14
        return ir.serde.deserialize_model(ir.serde.serialize_model(model))
    copy = model.clone()
    for owner in (copy.graph, *copy.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(owner):
            attr = node.attributes.get("value")
            if node.op_type == "Constant" and isinstance(attr, ir.Attr) and attr.type == TENSOR:
                t = attr.value
                wrapped = ir.LazyTensor(lambda t=t: t, t.dtype, t.shape, name=t.name)
                node.attributes["value"] = ir.AttrTensor("value", wrapped)
    return copy


def _import_domains(model: ir.Model) -> None:
    """Contrib ops a rule emitted need their domain among the model's opset imports."""
    for graph in list(model.graphs()):
        for node in graph:
            if not is_standard(node):
                model.opset_imports.setdefault(node.domain, 1)


def _names(spec) -> list[str]:
    """Rule names from a list option, each item perhaps holding several separated by | or ,."""
    items = [spec] if isinstance(spec, str) else list(spec)
    return [
        n.strip() for item in items for n in str(item).replace(",", "|").split("|") if n.strip()
    ]


def _sweep(model: ir.Model, by_op: dict[str, list[Rule]], ctx: Context) -> bool:
    changed = False
    for graph in list(model.graphs()):
        for node in list(graph):
            if node.graph is not graph or not is_standard(node):
                continue
            for r in by_op.get(node.op_type, ()):
                if r.apply(node, ctx):
                    changed = True
                    break
    return changed
