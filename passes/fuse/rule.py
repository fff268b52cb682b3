"""The rule base of the fuse pass: a leaf module (it imports no rule), so rule families import it
without a cycle. A rule is a named rewrite anchored on nodes of some op types, with the opsets and
the target where it applies; ``rules/__init__.py`` orders every rule in one explicit tuple.

A rule is two functions, as in onnxscript's rewriter: ``match(node, ctx)`` looks at the graph and
changes nothing, returning a ``Match``: ``Match.fail(reason)`` says why the rule does not fire
there, ``Match.ok(**bindings)`` carries what the rewrite needs; ``rewrite(**bindings)`` then changes
the graph. ``Fuse.explain`` runs the matches alone to show why each rule fires or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from onnxopt.passes._common import is_standard, replace_nodes, single_use


@dataclasses.dataclass(frozen=True)
class Context:
    opset: int
    target: str


@dataclasses.dataclass(frozen=True)
class Match:
    """What a rule's match found at a node: the reason it does not fire (``reason`` set, the
    Match is false), or the ``bindings`` its rewrite takes as keyword arguments."""

    reason: str | None = None
    bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def ok(cls, **bindings: Any) -> Match:
        return cls(None, bindings)

    @classmethod
    def fail(cls, reason: str) -> Match:
        return cls(reason or "no match")

    def __bool__(self) -> bool:
        return self.reason is None


Matcher = Callable[[ir.Node, Context], Match]
Rewriter = Callable[..., "bool | None"]  # takes a Match's bindings; False: nothing changed


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    ops: tuple[str, ...]
    summary: str
    matcher: Matcher
    rewriter: Rewriter
    min_opset: int = 1
    target: str = "onnx"

    def unavailable(self, ctx: Context) -> str | None:
        """Why the rule cannot apply to a model of ``ctx`` at all, or None where it can."""
        if ctx.opset < self.min_opset:
            return f"needs opset {self.min_opset}+ (the model has {ctx.opset})"
        if self.target != "onnx" and self.target != ctx.target:
            return f"only with target={self.target}"
        return None

    def applies(self, ctx: Context) -> bool:
        return self.unavailable(ctx) is None

    def match(self, node: ir.Node, ctx: Context) -> Match:
        """Whether the rule fires at ``node`` (and with what) or why not; changes nothing."""
        return self.matcher(node, ctx)

    def rewrite(self, match: Match) -> bool:
        """Apply a successful ``match``; whether the graph changed."""
        return self.rewriter(**match.bindings) is not False

    def apply(self, node: ir.Node, ctx: Context) -> bool:
        """Match, then rewrite where it matched; whether the graph changed."""
        found = self.match(node, ctx)
        return bool(found) and self.rewrite(found)


def rule(
    name: str,
    ops: tuple[str, ...],
    summary: str,
    *,
    rewrite: Rewriter,
    min_opset: int = 1,
    target: str = "onnx",
):
    """Make a match function anchored on nodes of ``ops`` into a Rule that ``rewrite`` completes."""

    def make(match: Matcher) -> Rule:
        return Rule(name, ops, summary, match, rewrite, min_opset, target)

    return make


def replace_with(
    nodes: list[ir.Node],
    end: ir.Node,
    op_type: str,
    inputs: list[ir.Value | None],
    attributes: Mapping[str, Any] | None = None,
    domain: str = "",
) -> bool:
    """A rewrite: one new ``op_type`` node, named as ``end``, takes over ``end``'s output; ``nodes`` go."""
    fused = ir.node(op_type, inputs, attributes, domain=domain, name=end.name)
    return replace_nodes(nodes, end, fused)


# Reasons: what a value is, and why a pattern cannot take it over.


def _label(value: ir.Value) -> str:
    return value.name or "an unnamed value"


def _op(node: ir.Node) -> str:
    return node.op_type if is_standard(node) else f"{node.domain}:{node.op_type}"


def shared(value: ir.Value) -> str:
    """Why ``value`` is not ``single_use``: a graph output, or read by several nodes."""
    node = value.producer()
    what = _label(value) if node is None else f"the {_op(node)} output {_label(value)}"
    if value.is_graph_output():
        return f"{what} is a graph output"
    return f"{what} is read by {len(value.uses())} nodes"


def not_made_by(value: ir.Value | None, *op_types: str) -> str:
    """Why ``producer(value, *op_types)`` is None."""
    wanted = "/".join(op_types)
    if value is None:
        return f"an input is missing where a {wanted} is wanted"
    node = value.producer()
    if node is not None:
        return f"{_label(value)} is computed by {_op(node)}, not {wanted}"
    kind = "a graph input" if value.is_graph_input() else "a constant"
    if value.const_value is None and not value.is_graph_input():
        kind = "a value of an outer graph"
    return f"{_label(value)} is {kind}, not computed by {wanted}"


def not_read_by(value: ir.Value, *op_types: str) -> str:
    """Why ``only_reader(value, *op_types)`` is None."""
    if not single_use(value):
        return shared(value)
    return f"{_label(value)} is read by {_op(value.uses()[0].node)}, not {'/'.join(op_types)}"


def dtype(value: ir.Value | None) -> str:
    """``value``'s element type for a reason: ``FLOAT``, or ``of unknown type``."""
    return "of unknown type" if value is None or value.dtype is None else value.dtype.name
