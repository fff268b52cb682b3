"""Model inputs: generated (seeded, reproducible, in ranges that are safe for real models) or real data.

Real data is an ``.npz`` file or a folder of them, arrays named after the model's inputs. The first
axis holds the samples: either the model's own batch axis (an array of the input's rank) or an extra
axis in front of it (one array of the input's rank per sample). Files are read one at a time, so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import shapes as shape_resolver
from onnxopt.errors import UsageError

Feeds = dict[str, np.ndarray]


def parse_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``['input_ids=1,128']`` → ``{'input_ids': [1, 128]}``."""
    shapes = {}
    for spec in specs:
        name, eq, dims = spec.partition("=")
        try:
            if not eq or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"bad --shape {spec!r}: expected NAME=1,3,224,224") from None
    return shapes


def parse_ranges(specs: list[str] | tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """``['images=0,255', '-1,1']`` → ``{'images': (0, 255), '': (-1, 1)}``; '' is every other input."""
    ranges = {}
    for spec in specs:
        name, eq, bounds = spec.rpartition("=")
        try:
            lo, hi = (float(b) for b in bounds.split(","))
            if (eq and not name) or not lo <= hi:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"bad --range {spec!r}: expected NAME=LO,HI (or LO,HI for every input) with LO <= HI"
            ) from None
        ranges[name] = (lo, hi)
    return ranges


@dataclasses.dataclass
class InputSpec:
    """Where the inputs of validate, bench and check come from."""

    data: Path | None = None
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    batch: int | None = None
    samples: int | None = None
    seed: int = 0
    label: str = "--inputs {path}"  # how errors name the data (a pass's calib= reads it too)

    def model_inputs(self, model: ir.Model) -> list[ir.Value]:
        graph = model.graph
        values = [v for v in graph.inputs if v.name not in graph.initializers]
        known = {v.name for v in values}
        for option, names in (("--shape", self.shapes), ("--range", set(self.ranges) - {""})):
            unknown = set(names) - known
            if unknown:
                raise UsageError(
                    f"{option} names no input of the model: {', '.join(sorted(unknown))}"
                )
        return values

    def batches(self, model: ir.Model, notices: list[str], source=None) -> Iterator[Feeds]:
        """The feeds to run, one dict per run. Generated inputs take shapes that run ``model`` (whose
        file is ``source``, when there is one), noted in ``notices``."""
        if self.data is None:
            return self._generated(model, notices, source)
        return load_batches(self, model, notices)

    def _generated(self, model: ir.Model, notices: list[str], source) -> Iterator[Feeds]:
        self.model_inputs(model)  # refuse --shape/--range names the model lacks before running it
        choice = shape_resolver.resolve(model, self.shapes, self.batch, source=source)
        if note := choice.note():
            notices.append(note)
        for i in range(self.samples or 1):
            yield generate(model, choice.shapes, self.seed + i, self.ranges)[0]

    def count(self, model: ir.Model) -> int | None:
        """How many samples the batches hold (read from the array headers, not the data)."""
        if self.data is None:
            return self.samples or 1
        values = self.model_inputs(model)
        total = 0
        for path in data_files(self.data, self.label):
            with _open_npz(path, self.label) as npz:
                name = next((v.name for v in values if v.name in npz.files), None)
                if name is None:
                    return None
                total += _rows_in_header(npz, name)
        return min(total, self.samples) if self.samples else total


def _rows_in_header(npz, name: str) -> int:
    with npz.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape = read(f)[0]
    return shape[0] if shape else 1


def first_batch(spec: InputSpec, model: ir.Model, notices: list[str], source=None) -> Feeds:
    return next(iter(spec.batches(model, notices, source)))


def input_shape(
    value: ir.Value, shapes: dict[str, list[int]], notices: list[str], batch: int | None = None
) -> list[int]:
    """The shape to generate: ``shapes`` first, else the model's with a symbolic first dim set to
    ``batch`` and other symbolic dims set to 1 (noted)."""
    if value.name in shapes:
        return shapes[value.name]
    if value.shape is None:
        raise UsageError(f"input {value.name} has no shape: give one with --shape {value.name}=...")
    dynamic = [shape_resolver.is_dynamic(d) for d in value.shape]
    dims = [1 if dyn else d for d, dyn in zip(value.shape, dynamic)]
    if batch and dims and dynamic[0]:
        dims[0] = batch
    symbolic = [
        str(getattr(d, "value", None) or d if not isinstance(d, int) else d)
        for i, d in enumerate(value.shape)
        if dynamic[i] and not (batch and i == 0)
    ]
    if symbolic:
        notices.append(
            f"input {value.name}: {', '.join(symbolic)} set to 1 (shape {dims}); choose with --shape {value.name}=..."
        )
    return dims


def generate(
    model: ir.Model,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    ranges: dict[str, tuple[float, float]] | None = None,
    batch: int | None = None,
):
    """Inputs for every graph input that is not an initializer: ``(feeds, notices)``.

    Floats are drawn in [0, 1) and integers in {0, 1} unless ``ranges`` says otherwise (integers
    then in [lo, hi], inclusive); the notices say which symbolic dims were assumed.
    """
    spec = InputSpec(shapes=dict(shapes or {}), ranges=dict(ranges or {}))
    collect: list[str] = []
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in spec.model_inputs(model):
        dims = input_shape(value, spec.shapes, collect, batch)
        if value.dtype is None:
            raise UsageError(f"input {value.name} has no element type")
        lo, hi = spec.ranges.get(value.name, spec.ranges.get("", (None, None)))
        feeds[value.name] = _random(rng, value, dims, lo, hi)
    return feeds, collect


def _random(rng: np.random.Generator, value: ir.Value, dims: list[int], lo, hi) -> np.ndarray:
    dtype = value.dtype
    if dtype == ir.DataType.BOOL:
        return (
            np.zeros(dims, dtype=bool)
            if lo is None
            else rng.integers(int(lo), int(hi) + 1, size=dims).astype(bool)
        )
    if dtype.is_floating_point():
        lo, hi = (0.0, 1.0) if lo is None else (lo, hi)
        return (lo + (hi - lo) * rng.random(dims, dtype=np.float64)).astype(dtype.numpy())
    if dtype.is_integer():
        lo, hi = (0, 1) if lo is None else (int(lo), int(hi))
        return rng.integers(lo, hi + 1, size=dims).astype(dtype.numpy())
    if dtype == ir.DataType.STRING:
        return np.full(dims, "a", dtype=object)
    raise UsageError(f"input {value.name}: cannot generate values of type {dtype.name}")


def data_files(path: Path, label: str = "--inputs {path}") -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UsageError(f"{label.format(path=path)}: the folder holds no .npz files")
        return files
    if not path.is_file():
        raise UsageError(f"{label.format(path=path)}: no such file or folder")
    return [path]


def _open_npz(path: Path, label: str):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(
            f"{label.format(path=path)}: not a readable .npz file ({type(e).__name__})"
        ) from None


def load_batches(spec: InputSpec, model: ir.Model, notices: list[str]) -> Iterator[Feeds]:
    values = spec.model_inputs(model)
    remaining = spec.samples if spec.samples else np.inf
    for path in data_files(spec.data, spec.label):
        with _open_npz(path, spec.label) as npz:
            missing = [v.name for v in values if v.name not in npz.files]
            if missing:
                where, found = spec.label.format(path=path), ", ".join(npz.files)
                raise UsageError(
                    f"{where}: no array for input {', '.join(missing)} (it has {found})"
                )
            arrays = {v.name: _conform(path, spec.label, v, npz[v.name], notices) for v in values}
        for feeds, rows in _split(spec.label.format(path=path), values, arrays, spec.batch):
            if remaining <= 0:
                return
            if rows > remaining:  # only a batch of rows can hold more than one sample
                feeds = {k: a[: int(remaining)] for k, a in feeds.items()}
                rows = int(remaining)
            remaining -= rows
            yield feeds


def _conform(
    path: Path, label: str, value: ir.Value, array: np.ndarray, notices: list[str]
) -> np.ndarray:
    """Cast to the input's element type where every value survives; refuse otherwise."""
    want = value.dtype.numpy()
    if array.dtype == want:
        return array
    cast = array.astype(want)
    if not np.array_equal(cast.astype(array.dtype), array):
        raise UsageError(
            f"{label.format(path=path)}: {value.name} holds {array.dtype} values that {want} cannot represent"
        )
    note = f"{value.name}: {array.dtype} values in {path.name} cast to {want}"
    if note not in notices:
        notices.append(note)
    return cast


def _split(where: str, values: list[ir.Value], arrays: dict[str, np.ndarray], batch: int | None):
    """Cut one file's arrays into (feeds, samples): rows of the batch axis in chunks, or one feed per leading item."""
    per_item, rows = {}, set()
    for v in values:
        a = arrays[v.name]
        rank = None if v.shape is None else len(v.shape)
        if rank is not None and a.ndim == rank + 1:
            per_item[v.name] = True
        elif rank is None or a.ndim == rank:
            per_item[v.name] = False
            if not a.ndim:
                raise UsageError(f"{where}: {v.name} is a scalar; give it a sample axis")
        else:
            raise UsageError(
                f"{where}: {v.name} has rank {a.ndim}; the input has rank {rank} (or {rank + 1} with a sample axis)"
            )
        rows.add(a.shape[0])
    if len(rows) > 1:
        raise UsageError(f"{where}: the arrays hold different numbers of samples ({sorted(rows)})")
    n = rows.pop()
    if all(per_item.values()):
        for i in range(n):
            yield {k: a[i] for k, a in arrays.items()}, 1
        return
    if any(per_item.values()):
        raise UsageError(f"{where}: mix of arrays with and without a sample axis")
    step = _chunk(where, values, batch, n)
    for start in itertools.count(0, step):
        if start >= n:
            return
        yield {k: a[start : start + step] for k, a in arrays.items()}, min(step, n - start)


def _chunk(where: str, values: list[ir.Value], batch: int | None, n: int) -> int:
    """Rows per run: a fixed batch dim wins; otherwise ``batch`` (default 1)."""
    fixed = {
        v.shape[0]
        for v in values
        if v.shape is not None and len(v.shape) and not shape_resolver.is_dynamic(v.shape[0])
    }
    if fixed:
        size = fixed.pop()
        if n % size:
            raise UsageError(
                f"{where}: {n} samples do not fill whole batches of the model's fixed batch size {size}"
            )
        return size
    return max(1, batch or 1)
