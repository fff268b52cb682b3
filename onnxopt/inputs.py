"""Generated model inputs: seeded, reproducible, in ranges that are safe for real models."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError


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


def input_shape(value: ir.Value, shapes: dict[str, list[int]], notices: list[str]) -> list[int]:
    if value.name in shapes:
        return shapes[value.name]
    if value.shape is None:
        raise UsageError(f"input {value.name} has no shape: give one with --shape {value.name}=...")
    dims = [d if isinstance(d, int) else 1 for d in value.shape]
    symbolic = [str(d.value or "?") for d in value.shape if not isinstance(d, int)]
    if symbolic:
        notices.append(
            f"input {value.name}: {', '.join(symbolic)} set to 1 (shape {dims}); choose with --shape {value.name}=..."
        )
    return dims


def generate(model: ir.Model, shapes: dict[str, list[int]] | None = None, seed: int = 0):
    """Inputs for every graph input that is not an initializer. Returns (feeds, notices)."""
    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    feeds, notices = {}, []
    unknown = set(shapes) - {v.name for v in model.graph.inputs}
    if unknown:
        raise UsageError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dims = input_shape(value, shapes, notices)
        if value.dtype is None:
            raise UsageError(f"input {value.name} has no element type")
        dtype = value.dtype.numpy()
        if value.dtype == ir.DataType.BOOL:
            array = np.zeros(dims, dtype=bool)
        elif value.dtype.is_floating_point():
            array = rng.random(dims, dtype=np.float64).astype(dtype)
        elif value.dtype.is_integer():
            array = rng.integers(0, 2, size=dims).astype(dtype)
        elif value.dtype == ir.DataType.STRING:
            array = np.full(dims, "a", dtype=object)
        else:
            raise UsageError(f"input {value.name}: cannot generate values of type {value.dtype.name}")
        feeds[value.name] = array
    return feeds, notices
