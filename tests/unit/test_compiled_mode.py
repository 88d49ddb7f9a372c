"""cacheproxy/mode.py: when the mypyc build of the hot path runs, and when its .py files run instead."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import json
import re
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


def _hot_modules() -> list[Path]:
    root = Path(__file__).resolve().parents[2]
    listed = re.findall(r'^    "(cacheproxy/[\w/]+\.py)",$', (root / "setup.py").read_text(), re.MULTILINE)
    assert len(listed) >= 19, "setup.py's HOT_MODULES not found"
    return [root / path for path in listed]


def test_compiled_dataclasses_write_their_own_init() -> None:
    """The __init__ that @dataclass generates is exec'd Python, which mypyc does not compile: constructing such a
    class from compiled code ran interpreted (about 3,000 CPU instructions, ten times a compiled __init__; 15 per
    prepared miss, a fifth of its cost). So every dataclass of the compiled group writes its __init__ itself, and
    none is frozen (mypy refuses the assignments of an explicit __init__ to a frozen dataclass)."""
    offenders = []
    for path in _hot_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
            if not any(decorator.startswith("dataclass") for decorator in decorators):
                continue
            has_init = any(isinstance(item, ast.FunctionDef) and item.name == "__init__" for item in node.body)
            if not has_init or any("frozen=True" in decorator for decorator in decorators):
                offenders.append(f"{path.name}:{node.lineno} {node.name}")
    assert not offenders, offenders


def test_explicit_inits_take_the_fields_in_order() -> None:
    """dataclasses.replace (by keyword) and the positional calls rely on __init__'s parameters being the fields, in
    their order, with their defaults (a compiled __init__ shows no signature: this builds instances instead)."""
    from cacheproxy.analysis.analyzer import analyze_head
    from cacheproxy.policy.classify import Classified
    from cacheproxy.policy.verdict import ReadVerdict, WriteScope
    from cacheproxy.protocol.frontend import Bind
    from cacheproxy.protocol.replies import Op, Pending

    verdict = ReadVerdict(True, None, frozenset({"t"}), 5.0, "r", "lazy", "never", 1.0)
    samples: list[object] = [
        verdict,
        WriteScope(frozenset({"t"}), False, "why", True, "update"),
        Bind("p", "s", b"args", (0, 1)),
        Pending(Op.SYNC, True, False, None, True, False, "done", True),
        Classified(analyze_head("SELECT 1", "test"), verdict, 3, None, frozenset({"t"}), "id", None),
    ]
    for sample in samples:
        fields = dataclasses.fields(sample)  # type: ignore[arg-type]
        values = [getattr(sample, field.name) for field in fields]
        assert type(sample)(*values) == sample
        assert type(sample)(**{field.name: value for field, value in zip(fields, values, strict=True)}) == sample
        assert dataclasses.replace(sample) == sample  # type: ignore[type-var]
    assert dataclasses.replace(verdict, ttl=7.0).ttl == 7.0 and hash(verdict) == hash(dataclasses.replace(verdict))
    assert Pending(Op.SYNC) == Pending(Op.SYNC, False, False, None, False, False, None, False)
    assert ReadVerdict(False, "x") == ReadVerdict(False, "x", frozenset(), 0.0, "", "lazy", "until_write", 0.0)
