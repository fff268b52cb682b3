"""The base class of every onnxopt pass: onnx-ir's in-place pass plus a name, a summary and typed options.

A pass class is both faces of the same object: ``Fold(size_limit=10)`` in Python and
``fold(size_limit=10)`` on the command line build the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from onnxopt.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str

    def convert(self, value: Any, pass_name: str) -> Any:
        """Convert a Python value or a CLI string to the option's type."""
        if isinstance(value, self.type) and not (self.type is int and isinstance(value, bool)):
            return value
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
        raise UsageError(f"pass {pass_name}: option {self.name} takes {self.type.__name__}, got {value!r}")


_REGISTRY: dict[str, type[OptPass]] = {}


class OptPass(ir.passes.InPlacePass):
    """An onnxopt pass.

    Subclasses set ``name``, ``summary`` and ``options``, and implement ``call(model)``.
    ``exact`` passes must keep outputs numerically equal; ``fixed_point`` passes are run
    together in rounds until none of them changes the model.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    exact: ClassVar[bool] = True
    fixed_point: ClassVar[bool] = False
    # Input shapes the user gave for example inputs (the CLI's --shape), for passes that run the model.
    example_shapes: dict[str, list[int]] = {}

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
        for option in self.options:
            value = values.get(option.name, option.default)
            setattr(self, option.name, option.convert(value, self.name) if option.name in values else value)

    @classmethod
    def details(cls) -> list[str]:
        """Extra lines for ``onnxopt passes NAME`` (the rules of a pass made of rules, say)."""
        return []

    def notes(self) -> list[str]:
        """What the last run decided that a user should know (shown after the run, kept in the report)."""
        return []

    def fidelity(self) -> float | None:
        """For a lossy pass, the least output cosine its result may have against its input."""
        return None

    def layers(self, model: ir.Model) -> list[dict]:
        """Per-layer description of what the last run did to ``model`` (the pass's output), for reports:
        one JSON-ready dict per layer. A row's ``output`` names the value the layer computes; where the
        input model has a value of that name, ``onnxopt run --report`` adds the row's ``sqnr_db``."""
        return []

    @classmethod
    def findings(cls, model: ir.Model) -> dict[str, int]:
        """Patterns this pass recognises in ``model`` but leaves as they are, with their counts (for ``inspect``)."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in self.options}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.settings().items() if v != self._default(k)}
        args = ",".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name

    def _default(self, key: str) -> Any:
        return next(o.default for o in self.options if o.name == key)


def registry() -> dict[str, type[OptPass]]:
    """Every registered pass by name; importing onnxopt.passes registers the library."""
    import onnxopt.passes  # noqa: F401

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[OptPass]:
    passes = registry()
    if name not in passes:
        raise UsageError(f"unknown pass {name!r} (passes: {', '.join(passes)})")
    return passes[name]


def parse_pass_list(spec: str) -> list[OptPass]:
    """Parse ``'fold(size_limit=1024),prune'`` into pass objects."""
    passes, depth, start = [], 0, 0
    for i, ch in enumerate(spec + ","):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"bad pass list {spec!r}: unbalanced ')'")
        elif ch == "," and depth == 0:
            item = spec[start:i].strip()
            start = i + 1
            if item:
                passes.append(parse_pass(item))
    if depth:
        raise UsageError(f"bad pass list {spec!r}: unbalanced '('")
    if not passes:
        raise UsageError("no passes given")
    return passes


def parse_pass(item: str) -> OptPass:
    name, _, rest = item.partition("(")
    name = name.strip()
    values = {}
    if rest:
        if not rest.endswith(")"):
            raise UsageError(f"bad pass {item!r}: expected name(key=value,...)")
        for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"bad option {pair!r} in pass {name}: expected key=value")
            values[key.strip()] = value.strip()
    return get_pass(name)(**values)


def as_pass(item: str | OptPass) -> OptPass:
    if isinstance(item, OptPass):
        return item
    if isinstance(item, str):
        return parse_pass(item)
    raise TypeError(f"expected a pass name or an OptPass, got {type(item).__name__}")
