"""Input shapes that run: the one resolver behind every command and pass that runs a model on
generated inputs (the check of ``run``, ``validate``, ``bench``, ``check``, ``calib=random``,
``tune=latency``).

Exported models declare dynamic dims in many ways: a symbolic name (``batch``, ``height``), a
``dim_value`` of -1 or 0 (Paddle), or no value at all. Setting them all to 1 runs most models, but
not a detector whose Resize/Concat need a multiple of 32, a recogniser that needs height 48, or an
audio model whose reflect Pad needs two samples. So the resolver tries candidate sizes in one
onnxruntime session (a failed run costs milliseconds) and keeps the first that runs:

1. the user's ``--shape`` for whole inputs (they always win, and bind the symbolic names they fill),
   ``--batch`` for batch dims, hints the model carries (an ``imgsz``-style metadata entry), 0 for a
   decoder's cache length (a dim named ``past...``: an empty cache, the prefill, of at least
   ``PREFILL`` tokens), and ``prefer`` (1, or a size worth timing) for every other dynamic dim;
2. one unit at a time at each size, the others as in 1: the spatial dims (named height/width, or the
   last two of an image input) are one unit, every other dim its own; sizes by closeness to ``prefer``;
3. every free dim at one size;
4. each spatial dim alone.

Dims that share a symbolic name always get one value.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import time

import onnx_ir as ir

from onnxopt.errors import OnnxoptError, UsageError, one_line

SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 128, 224, 256, 320, 512, 640)
# A decoder with a cache is checked on a prefill of this many tokens, not one: position 0 alone (the
# attention sink) moves late layers' values far more than real text does (SmolLM2-135M with 4-bit
# weights: worst value-cache cosine 0.66 on one token, 0.87 on 16; logits 0.973 and 0.967).
PREFILL = 16
BUDGET_S = 10.0  # seconds of trial runs before giving up (a failed run usually takes milliseconds)
_SPATIAL = re.compile(
    r"^(h|w|height|width|img_?h|img_?w|image_?height|image_?width)$", re.IGNORECASE
)
_SIZE_KEYS = (
    "imgsz",
    "image_size",
    "img_size",
    "input_size",
)  # metadata_props that hold an image size
# A decoder's cache length (optimum's past_sequence_length, past_seq_len, ...): 0 first, an empty cache,
# the prefill. Random past keys and values are nothing the model ever sees (SmolLM2-135M's logits from
# 4-bit weights: cosine 0.28 to fp32 with a random 1-token cache, against 0.9 on the prefill).
_PAST = re.compile(r"^past", re.IGNORECASE)
_UNNAMED = ("", "?")  # Paddle writes '?' for every unknown dim: they are not one shared dim


def is_dynamic(dim) -> bool:
    """A dim without a usable size: symbolic, unknown, or declared as -1 / 0."""
    return not isinstance(dim, int) or dim <= 0


@dataclasses.dataclass(frozen=True)
class _Dim:
    key: str  # dims with the same key get the same size
    batch: bool
    spatial: bool
    past: bool = False


@dataclasses.dataclass
class Choice:
    """The shape of every input, the sizes chosen for dims nobody gave, and how they were found."""

    shapes: dict[str, list[int]]
    chosen: dict[str, int] = dataclasses.field(default_factory=dict)  # dim label -> size
    searched: bool = False  # the first guess did not run and a search found these
    first_error: str = ""
    tried: int = 0

    def note(self, what: str = "input shapes") -> str | None:
        """One line for the user when some dims were not given: what was chosen and how to pin it."""
        if not self.chosen:
            return None
        by_size: dict[int, list[str]] = {}
        for label, size in self.chosen.items():
            by_size.setdefault(size, []).append(label)
        sizes = "; ".join(f"{', '.join(labels)} set to {size}" for size, labels in by_size.items())
        pinned = " ".join(
            f"--shape {name}={','.join(map(str, dims))}" for name, dims in self.shapes.items()
        )
        found = (
            f" (found in {self.tried} tries; the first guess failed: {self.first_error})"
            if self.searched
            else ""
        )
        return f"{what}: {sizes}{found}; pin them with {pinned}"


def resolve(
    model: ir.Model,
    given: dict[str, list[int]] | None = None,
    batch: int | None = None,
    *,
    prefer: int = 1,
    prefill: int = PREFILL,
    source: str | os.PathLike | None = None,
    budget_s: float = BUDGET_S,
) -> Choice:
    """Shapes for every input of ``model`` that run in onnxruntime.

    ``given`` holds the user's whole shapes by input name; ``batch`` the size of batch dims;
    ``prefill`` the least size of a decoder's sequence dims, when it has a cache (a ``past`` dim);
    ``source`` the model's file, when there is one (no temporary copy is written then). Raises a
    UsageError naming the ``--shape``/``--inputs`` to give when nothing tried runs in ``budget_s``.
    """
    given = dict(given or {})
    values = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    for v in values:
        if v.name not in given and v.shape is None:
            raise UsageError(
                f"input {v.name} has no shape in the model: give one with --shape {v.name}=DIMS "
                "or real samples with --inputs data.npz"
            )
    dims = {v.name: _classify(v) for v in values if v.name not in given}
    bound = _bound_by_given(values, given)
    if any(d and d.past for axes in dims.values() for d in axes):
        prefer = max(prefer, prefill)
    start = _start(model, dims, bound, batch, prefer)
    free = [
        k
        for k in dict.fromkeys(d.key for ds in dims.values() for d in ds if d)
        if k not in bound
        and not any(d.batch for ds in dims.values() for d in ds if d and d.key == k)
    ]

    def chosen(sizes: dict[str, int]) -> dict[str, int]:
        keys = dict.fromkeys(
            d.key for axes in dims.values() for d in axes if d and not (d.batch and batch)
        )
        return {k: sizes[k] for k in keys if k not in bound}

    def build(sizes: dict[str, int]) -> dict[str, list[int]]:
        return {
            v.name: given[v.name] if v.name in given else _shape(v, dims[v.name], sizes)
            for v in values
        }

    if not free:  # nothing to search: batch dims take --batch (or 1)
        return Choice(build(start), chosen(start))
    runner = _Runner(model, source)
    error = runner.error(build(start))
    if error is None:
        return Choice(build(start), chosen(start))
    deadline = time.perf_counter() + budget_s
    tried = 1
    for sizes in _candidates(start, free, _spatial_keys(dims, free), prefer):
        if time.perf_counter() > deadline:
            break
        tried += 1
        if runner.error(build(sizes)) is None:
            return Choice(
                build(sizes), chosen(sizes), searched=True, first_error=error, tried=tried
            )
    raise UsageError(_nothing_runs(values, dims, tried, error))


def has_cache(model: ir.Model) -> bool:
    """Whether the model is a decoder with a cache: an input with a dim named ``past...``."""
    return any(
        d and d.past for v in model.graph.inputs if v.shape is not None for d in _classify(v)
    )


def _classify(value: ir.Value) -> list[_Dim | None]:
    """Per axis: None for a fixed dim, else which size it shares and what kind of dim it is."""
    shape = list(value.shape)
    image = len(shape) == 4
    out: list[_Dim | None] = []
    for axis, d in enumerate(shape):
        if not is_dynamic(d):
            out.append(None)
            continue
        name = getattr(d, "value", None)
        key = name if isinstance(name, str) and name not in _UNNAMED else f"{value.name}[{axis}]"
        spatial = bool(_SPATIAL.match(name)) if isinstance(name, str) else False
        spatial = spatial or (image and axis in (2, 3) and _channels_first(shape))
        past = isinstance(name, str) and bool(_PAST.match(name))
        out.append(_Dim(key, batch=axis == 0 and len(shape) >= 2, spatial=spatial, past=past))
    return out


def _channels_first(shape: list) -> bool:
    return isinstance(shape[1], int) and 0 < shape[1] <= 4


def _bound_by_given(values: list[ir.Value], given: dict[str, list[int]]) -> dict[str, int]:
    """Sizes that the user's whole shapes give to symbolic names (shared with other inputs)."""
    bound: dict[str, int] = {}
    for v in values:
        if v.name in given and v.shape is not None and len(v.shape) == len(given[v.name]):
            for d, size in zip(v.shape, given[v.name]):
                name = getattr(d, "value", None)
                if isinstance(name, str) and name not in _UNNAMED:
                    bound[name] = size
    return bound


def _start(
    model: ir.Model, dims: dict[str, list], bound: dict[str, int], batch: int | None, prefer: int
) -> dict[str, int]:
    hint = _image_size_hint(model)
    start = dict(bound)
    for axes in dims.values():
        spatial = [d for d in axes if d and d.spatial]
        for d in axes:
            if d is None or d.key in start:
                continue
            if d.batch:
                start[d.key] = batch or 1
            elif d.past:
                start[d.key] = 0
            elif d.spatial and hint and len(spatial) == 2:
                start[d.key] = hint[spatial.index(d)]
            else:
                start[d.key] = prefer
    return start


def _image_size_hint(model: ir.Model) -> tuple[int, int] | None:
    """(height, width) from metadata such as Ultralytics' ``imgsz: [320, 320]``."""
    for key in _SIZE_KEYS:
        text = model.metadata_props.get(key)
        if not text:
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        sizes = (
            [value]
            if isinstance(value, int)
            else list(value)
            if isinstance(value, (list, tuple))
            else []
        )
        sizes = [s for s in sizes if isinstance(s, int) and s > 0][-2:]
        if sizes:
            return (sizes[0], sizes[-1])
    return None


def _spatial_keys(dims: dict[str, list], free: list[str]) -> list[str]:
    keys = {d.key for axes in dims.values() for d in axes if d and d.spatial}
    return [k for k in free if k in keys]


def _candidates(start: dict[str, int], free: list[str], spatial: list[str], prefer: int):
    """Size assignments to try after ``start``, in the order of the module docstring, each once."""
    order = sorted(SIZES, key=lambda s: (abs(math.log(s / prefer)), s))
    units = (
        [spatial, *([k] for k in free if k not in spatial)]
        if len(spatial) > 1
        else [[k] for k in free]
    )
    seen = {tuple(sorted(start.items()))}
    for keys in [*units, free, *([k] for k in spatial if len(spatial) > 1)]:
        for s in order:
            sizes = {**start, **dict.fromkeys(keys, s)}
            key = tuple(sorted(sizes.items()))
            if key not in seen:
                seen.add(key)
                yield sizes


def _shape(value: ir.Value, axes: list[_Dim | None], sizes: dict[str, int]) -> list[int]:
    return [d if a is None else sizes[a.key] for d, a in zip(value.shape, axes)]


class _Runner:
    """One onnxruntime session of the model, run on generated inputs of each candidate shape."""

    def __init__(self, model: ir.Model, source):
        from onnxopt import compare, runtime

        self.model = model
        try:
            self.session = (
                runtime.session(source) if source is not None else compare.model_session(model)
            )
        except OnnxoptError:
            raise
        except Exception as e:  # onnxruntime's own errors
            raise UsageError(f"the model does not load in onnxruntime ({one_line(e)})") from None

    def error(self, shapes: dict[str, list[int]]) -> str | None:
        from onnxopt import inputs

        feeds, _ = inputs.generate(self.model, shapes)
        try:
            self.session.run(None, feeds)
        except Exception as e:  # onnxruntime's own errors: these shapes do not fit the model
            return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(e, 200))[:160]
        return None


def _nothing_runs(values: list[ir.Value], dims: dict[str, list], tried: int, error: str) -> str:
    def placeholder(d, a: _Dim | None) -> str:
        if a is None:
            return str(d)
        name = getattr(d, "value", None)
        return "N" if a.batch else name if isinstance(name, str) and name not in _UNNAMED else "?"

    wanted = " ".join(
        f"--shape {v.name}={','.join(placeholder(d, a) for d, a in zip(v.shape, dims[v.name]))}"
        for v in values
        if any(dims.get(v.name, ()))
    )
    return (
        f"the model runs on none of the {tried} input shapes tried for its dynamic dims (first error: {error}); "
        f"give them: {wanted}, or real samples with --inputs data.npz"
    )
