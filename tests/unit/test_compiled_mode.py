"""cacheproxy/mode.py: when the mypyc build of the hot path runs, and when its .py files run instead."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from cacheproxy import mode

_MODULES = ("cacheproxy.protocol.framing", "cacheproxy.proxy.caching")


def _fake_build(package: Path) -> None:
    """A package dir as setup.py leaves it: sources, an extension file per module and the group, the manifest."""
    hashes = {}
    for module in _MODULES:
        source = package.joinpath(*module.split(".")[1:]).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
        source.with_suffix(EXTENSION_SUFFIXES[0]).write_bytes(b"not really an extension")
        hashes[module] = hashlib.sha256(source.read_bytes()).hexdigest()
    (package / f"_hot__mypyc{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    manifest = {"group": "cacheproxy._hot__mypyc", "modules": hashes}
    (package / mode.MANIFEST).write_text(json.dumps(manifest))


def test_a_matching_build_is_compiled(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    decided = mode.decide({}, tmp_path)
    assert decided.compiled and decided.name == "compiled" and decided.modules == _MODULES
    assert decided.describe() == "hot path compiled with mypyc (2 modules)"


def test_an_edited_source_refuses_the_whole_build(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    with (tmp_path / "proxy" / "caching.py").open("a") as source:
        source.write("# edited after the build\n")
    decided = mode.decide({}, tmp_path)
    assert not decided.compiled and decided.modules == _MODULES
    assert decided.reason == "sources changed since the mypyc build: cacheproxy.proxy.caching"


def test_cacheproxy_pure_refuses_the_build(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    decided = mode.decide({"CACHEPROXY_PURE": "1"}, tmp_path)
    assert not decided.compiled and decided.reason == "CACHEPROXY_PURE=1" and decided.modules == _MODULES
    assert mode.decide({"CACHEPROXY_PURE": "0"}, tmp_path).compiled


def test_a_missing_extension_refuses_the_build(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    (tmp_path / "protocol" / f"framing{EXTENSION_SUFFIXES[0]}").unlink()
    decided = mode.decide({}, tmp_path)
    assert not decided.compiled and decided.reason == "compiled extensions missing: cacheproxy.protocol.framing"


def test_no_build_is_pure(tmp_path: Path) -> None:
    decided = mode.decide({}, tmp_path)
    assert not decided.compiled and decided.modules == () and decided.reason.startswith("not compiled")
    (tmp_path / mode.MANIFEST).write_text("{")
    assert mode.decide({}, tmp_path).reason.startswith("unreadable")


@pytest.fixture
def fake_package(tmp_path: Path) -> Iterator[Path]:
    """`fakepkg.mod` as a .py with a (broken) extension beside it, which Python's import would prefer."""
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("SOURCE = True\n")
    (package / f"mod{EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    sys.path.insert(0, str(tmp_path))
    yield package
    sys.path.remove(str(tmp_path))
    for name in [name for name in sys.modules if name == "fakepkg" or name.startswith("fakepkg.")]:
        del sys.modules[name]


def test_python_alone_would_load_the_extension(fake_package: Path) -> None:
    with pytest.raises(ImportError):
        importlib.import_module("fakepkg.mod")


def test_prefer_source_loads_the_py_beside_an_extension(fake_package: Path) -> None:
    finder = mode.PreferSource("fakepkg")
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module("fakepkg.mod")
    finally:
        sys.meta_path.remove(finder)
    assert module.SOURCE is True and module.__file__ == str(fake_package / "mod.py")
