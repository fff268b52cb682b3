"""The rule base of the fuse pass: a leaf module (it imports no rule), so rule families import it
without a cycle. A rule is a named rewrite anchored on nodes of some op types, with the opsets and
the target where it applies; ``rules/__init__.py`` orders every rule in one explicit tuple."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class Context:
    opset: int
    target: str


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    ops: tuple[str, ...]
    summary: str
    apply: Callable[[ir.Node, Context], bool]
    min_opset: int = 1
    target: str = "onnx"

    def applies(self, ctx: Context) -> bool:
        return ctx.opset >= self.min_opset and (self.target == "onnx" or self.target == ctx.target)


def rule(name: str, ops: tuple[str, ...], summary: str, *, min_opset: int = 1, target: str = "onnx"):
    """Make a rewrite anchored on nodes of ``ops`` into a Rule; it returns whether it changed the graph."""

    def make(fn: Callable[[ir.Node, Context], bool]) -> Rule:
        return Rule(name, ops, summary, fn, min_opset, target)

    return make
