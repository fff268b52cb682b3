"""The base class of every onnxopt pass: onnx-ir's in-place pass plus a name, a summary and declared
options, and the result a pass returns.

A pass class is both faces of the same object: ``Fold(size_limit=10)`` in Python and
``fold(size_limit=10)`` on the command line build the same thing, checked by the same declarations.
A pass returns what it found (an ``Outcome``: notes, per-layer rows in the columns it declares, the
fidelity budget of a lossy pass) instead of keeping it on itself; what a run knows that a pass may
need (the user's input shapes and samples) comes from ``run_context()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from onnxopt.errors import UsageError

LIST_SEPARATOR = ";"  # between the items of a list option on the command line: not regex syntax


@dataclasses.dataclass(frozen=True)
class Option:
    """A declared option: its type and default, and what values it takes.

    ``choices`` lists the allowed values; ``low``/``high`` bound a number (inclusive); ``many``
    makes it a list (a Python list, or items separated by ``;`` on the command line, a value in
    quotes when it holds a comma or a parenthesis); ``only_with`` names other options' values it
    applies with, e.g. ``{"mode": ("static",)}``: setting it otherwise is a usage error.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    many: bool = False
    only_with: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    def convert(self, value: Any, pass_name: str) -> Any:
        """A Python value or a CLI string as the option's type, checked against its declaration."""
        if self.many:
            items = value.split(LIST_SEPARATOR) if isinstance(value, str) else list(value)
            return [self._one(item, pass_name) for item in items if str(item).strip()]
        return self._one(value, pass_name)

    def _one(self, value: Any, pass_name: str) -> Any:
        converted = self._typed(value, pass_name)
        where = f"pass {pass_name}: option {self.name}"
        if self.choices and converted not in self.choices:
            choices = ", ".join(map(str, self.choices))
            raise UsageError(f"{where} takes one of {choices}, got {value!r}")
        if (
            self.low is not None
            and converted < self.low
            or self.high is not None
            and converted > self.high
        ):
            raise UsageError(f"{where} must be within {self.bounds()}, got {value!r}")
        return converted

    def _typed(self, value: Any, pass_name: str) -> Any:
        if isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            return value.strip() if isinstance(value, str) else value
        text = str(value).strip()
        try:
            if self.type is bool:
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.type is int:
                return int(text.replace("_", ""))
            if self.type is float:
                return float(text)
            if self.type is str:
                return text
        except ValueError:
            pass
        raise UsageError(
            f"pass {pass_name}: option {self.name} takes {self.type.__name__}, got {value!r}"
        )

    def bounds(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        return f"[{low}, {'inf' if self.high is None else f'{self.high:g}'}]"

    def describe(self) -> str:
        """One line for ``onnxopt passes NAME``: type, default, allowed values, constraints, help."""
        kind = (
            f"list of {self.type.__name__} (separated by {LIST_SEPARATOR})"
            if self.many
            else self.type.__name__
        )
        parts = [f"{self.name}: {kind} = {self.default!r}"]
        if self.choices:
            parts.append("one of " + "|".join(map(str, self.choices)))
        if self.low is not None or self.high is not None:
            parts.append(f"in {self.bounds()}")
        if self.only_with:
            parts.append(
                "only with "
                + ", ".join(f"{k}={'|'.join(map(str, v))}" for k, v in self.only_with.items())
            )
        return f"{'  '.join(parts)}  {self.help}"


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of a pass's per-layer report rows: the row key, its header, and a format spec for
    the value (or a function that renders the whole row, for cells made of several keys)."""

    key: str
    header: str
    format: str | Callable[[dict], str] = ""


@dataclasses.dataclass
class Outcome(ir.passes.PassResult):
    """What a pass did and found. ``rows`` hold one dict per layer keyed by the pass's ``columns``
    (a row's ``output`` names the value the layer computes, for the per-layer SQNR of reports);
    ``fidelity`` is a lossy pass's budget: the least output cosine the check must hold."""

    notes: list[str] = dataclasses.field(default_factory=list)
    rows: list[dict] = dataclasses.field(default_factory=list)
    fidelity: float | None = None


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the run knows that passes which run the model may use: the user's input shapes (whole
    shapes by input name) and real samples (a list of feeds), when given."""

    shapes: Mapping[str, list[int]] = dataclasses.field(default_factory=dict)
    samples: tuple = ()


_CONTEXT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "onnxopt_run_context", default=None
)


def run_context() -> RunContext:
    """The context of the run in progress (empty outside one)."""
    return _CONTEXT.get() or RunContext()


@contextlib.contextmanager
def using(context: RunContext) -> Iterator[RunContext]:
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)


_REGISTRY: dict[str, type[OptPass]] = {}


class OptPass(ir.passes.InPlacePass):
    """An onnxopt pass.

    Subclasses set ``name``, ``summary`` and ``options`` (and ``columns`` when they report layers),
    and implement ``call(model)``, returning an ``Outcome``. ``exact`` passes must keep outputs
    numerically equal; ``fixed_point`` passes are run together in rounds until none of them
    changes the model.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    columns: ClassVar[tuple[Column, ...]] = ()
    exact: ClassVar[bool] = True
    fixed_point: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def __init__(self, **values: Any):
        super().__init__()
        known = {o.name: o for o in self.options}
        for key in values:
            if key not in known:
                choices = ", ".join(known) or "none"
                raise UsageError(f"pass {self.name}: unknown option {key!r} (options: {choices})")
        self.given = frozenset(
            values
        )  # the options the user set, for options whose default depends on others
        for option in self.options:
            value = values.get(option.name, option.default)
            given = option.name in values or option.many  # a list default is copied, never shared
            setattr(self, option.name, option.convert(value, self.name) if given else value)
        for name in self.given:
            for other, allowed in known[name].only_with.items():
                if getattr(self, other) not in allowed:
                    wanted = "|".join(map(str, allowed))
                    raise UsageError(f"pass {self.name}: {name} applies only with {other}={wanted}")

    @classmethod
    def details(cls) -> list[str]:
        """Extra lines for ``onnxopt passes NAME`` (the rules of a pass made of rules, say)."""
        return []

    def explain(self, model: ir.Model) -> list[tuple] | None:
        """For a pass made of rules, why each rule fires or not at each node (named tuples, shown
        by ``onnxopt inspect MODEL --explain NAME``), leaving ``model`` as it is; None when the pass
        has nothing to explain."""
        return None

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        """Patterns this pass recognises in ``model`` but leaves as they are, with their counts (for ``inspect``)."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in self.options}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.settings().items() if v != self._default(k)}
        args = ",".join(f"{k}={_shown(v)}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name

    def _default(self, key: str) -> Any:
        option = next(o for o in self.options if o.name == key)
        return option.convert(option.default, self.name) if option.many else option.default


def _shown(value: Any) -> str:
    text = LIST_SEPARATOR.join(map(str, value)) if isinstance(value, list) else str(value)
    return repr(text) if any(c in text for c in ",()") else text


def registry() -> dict[str, type[OptPass]]:
    """Every registered pass by name; importing onnxopt.passes registers the library."""
    import onnxopt.passes  # noqa: F401

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[OptPass]:
    passes = registry()
    if name not in passes:
        raise UsageError(f"unknown pass {name!r} (passes: {', '.join(passes)})")
    return passes[name]


def _split_top(text: str, what: str) -> list[str]:
    """``text`` split at commas outside parentheses and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text + ","):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"bad {what} {text!r}: unbalanced ')'")
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise UsageError(f"bad {what} {text!r}: unbalanced '('")
    if quote:
        raise UsageError(f"bad {what} {text!r}: unclosed quote")
    return [item for item in items if item]


def parse_pass_list(spec: str) -> list[OptPass]:
    """Parse ``'fold(size_limit=1024),prune'`` into pass objects."""
    passes = [parse_pass(item) for item in _split_top(spec, "pass list")]
    if not passes:
        raise UsageError("no passes given")
    return passes


def parse_pass(item: str) -> OptPass:
    """``name(key=value,...)``; a value in quotes may hold commas and parentheses (a path, a regex)."""
    name, _, rest = item.partition("(")
    name = name.strip()
    values = {}
    if rest:
        if not rest.endswith(")"):
            raise UsageError(f"bad pass {item!r}: expected name(key=value,...)")
        for pair in _split_top(rest[:-1], f"pass {name}"):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"bad option {pair!r} in pass {name}: expected key=value")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key.strip()] = value
    return get_pass(name)(**values)


def as_pass(item: str | OptPass) -> OptPass:
    if isinstance(item, OptPass):
        return item
    if isinstance(item, str):
        return parse_pass(item)
    raise TypeError(f"expected a pass name or an OptPass, got {type(item).__name__}")
