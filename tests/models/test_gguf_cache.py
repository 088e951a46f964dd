"""The GGUF conversion cache: keyed by file identity, written atomically, reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hallm.core.model_loader import gguf
from hallm.platforms import ConfigError


@pytest.fixture
def fake_writer(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the (slow) real conversion with one that records its calls."""
    calls: list[Path] = []

    def write(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_write_hf_dir", write)
    return calls


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "gguf").iterdir())


def test_converts_once_then_hits(tmp_path: Path, fake_writer: list[Path]) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF fake")
    first = gguf.convert_gguf(model, tmp_path / "cache")
    assert (first / "config.json").is_file() and first.parent == tmp_path / "cache" / "gguf"
    assert gguf.convert_gguf(model, tmp_path / "cache") == first
    assert len(fake_writer) == 1
    assert _entries(tmp_path / "cache") == [first.name]  # no temporary directory left


def test_changed_file_gets_a_new_entry(tmp_path: Path, fake_writer: list[Path]) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF fake")
    first = gguf.convert_gguf(model, tmp_path / "cache")
    model.write_bytes(b"GGUF fake, longer")
    os.utime(model, ns=(1, 1))
    assert gguf.convert_gguf(model, tmp_path / "cache") != first
    assert len(fake_writer) == 2


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, out: Path) -> None:
        (out / "half-written").write_text("x")
        raise ConfigError("cannot read GGUF file")

    monkeypatch.setattr(gguf, "_write_hf_dir", broken)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF fake")
    with pytest.raises(ConfigError):
        gguf.convert_gguf(model, tmp_path / "cache")
    assert _entries(tmp_path / "cache") == []


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALLM_CACHE_DIR", str(tmp_path / "env"))
    assert gguf.cache_root() == tmp_path / "env"
    monkeypatch.delenv("HALLM_CACHE_DIR")
    assert gguf.cache_root() == Path.home() / ".cache" / "hallm"
    assert gguf.cache_root(tmp_path) == tmp_path


def test_a_conversion_parses_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers reads the file for the config, the tokenizer and the tensors: one parse
    serves them all (and hallm's metadata check), and gguf is itself again afterwards."""
    import gguf as gguf_pkg

    from tests.utils.tiny_gguf import write_tiny_gguf
    from tests.utils.tiny_models import build_tiny_model

    hf_dir = build_tiny_model("qwen3_moe", tmp_path / "hf")
    model = write_tiny_gguf(hf_dir, tmp_path / "tiny.gguf")
    reader_cls, name_map = gguf_pkg.GGUFReader, gguf_pkg.get_tensor_name_map
    parsed: list[str] = []

    class CountingReader(reader_cls):  # type: ignore[misc,valid-type]
        def __init__(self, path: str, *args: object, **kwargs: object) -> None:
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf_pkg, "GGUFReader", CountingReader)
    out = gguf.convert_gguf(model, tmp_path / "cache")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert parsed == [str(model)]
    assert gguf_pkg.GGUFReader is CountingReader and gguf_pkg.get_tensor_name_map is name_map
