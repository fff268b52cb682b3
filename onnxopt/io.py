"""Model I/O: lazy loading with clear errors, atomic saving, external data when needed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.stats import constant_tensors, tensor_bytes

# Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
PROTO_LIMIT_BYTES = 2**31 - 64 * 2**20


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model; tensors in external data stay memory-mapped until they are used."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf raises several types for garbage and truncated files
        raise UsageError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    if not len(model.graph.outputs):
        raise UsageError(f"{path}: not a readable ONNX model (the graph has no outputs)")
    _check_external_data(model, path)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def external_tensors(model: ir.Model):
    return (t for t in constant_tensors(model) if isinstance(t, ir.ExternalTensor))


def _check_external_data(model: ir.Model, path: Path) -> None:
    for tensor in external_tensors(model):
        data = Path(tensor.base_dir) / tensor.location
        if not data.is_file():
            raise UsageError(f"{path}: external data file {tensor.location} is missing")
        if tensor.offset + tensor.length > data.stat().st_size:
            raise UsageError(f"{path}: external data file {tensor.location} is too short")


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a saved model refers to."""
    model = load(path)
    return sorted({Path(t.base_dir) / t.location for t in external_tensors(model)})


def check_output_path(output: str | os.PathLike, input: str | os.PathLike) -> None:
    """Refuse to write over the input model or the external data it reads from."""
    out = Path(output).resolve()
    protected = {Path(input).resolve()}
    try:
        protected.update(p.resolve() for p in external_files(input))
    except UsageError:
        pass
    data = out.with_name(out.name + ".data")
    for p in (out, data):
        if p in protected:
            raise UsageError(
                f"{output}: refusing to write over the input model or its data ({p.name})"
            )
    if out.is_dir():
        raise UsageError(f"{output}: is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"{output}: folder {out.parent} does not exist")


@contextlib.contextmanager
def staged_save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None):
    """Write the model into a temporary folder beside ``path`` and yield the temporary file.

    When the block ends normally the files are renamed into place; when it raises (a failed
    check, say) nothing is left behind. ``external_data=None`` chooses: external data when the
    tensors would not fit in one protobuf or the model already had external tensors.
    """
    path = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > PROTO_LIMIT_BYTES or any(
            True for _ in external_tensors(model)
        )
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnxopt-") as tmp:
        staged = Path(tmp) / path.name
        try:
            if external_data:
                ir.save(model, staged, external_data=data_name, size_threshold_bytes=1024)
            else:
                ir.save(model, staged)
        except OSError as e:
            raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None
        yield staged
        if (Path(tmp) / data_name).exists():
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write atomically: nothing appears at ``path`` until the whole model is written."""
    with staged_save(model, path, external_data=external_data):
        pass
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a report atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except OSError as e:
        raise UsageError(f"{path}: cannot write ({e.strerror or e})") from None
    os.replace(tmp, path)


def to_json(data) -> str:
    """Strict JSON: infinities and NaNs (an exact match's SNR, say) become the strings "inf", "-inf", "nan"."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=1, default=str)


def file_size(path: str | os.PathLike) -> int:
    """Size on disk, counting the external data files beside the model."""
    return Path(path).stat().st_size + sum(p.stat().st_size for p in external_files(path))
