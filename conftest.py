"""pytest's --doctest-modules imports each module of the package by its path. A module compiled by mypyc (setup.py,
cacheproxy/mode.py) is an extension: its __file__ is not the .py (pytest refuses the mismatch) and its functions keep
no docstrings to test. So with the compiled build, the compiled modules' doctests are not collected; a pure-Python
run (CACHEPROXY_PURE=1) runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

import cacheproxy

_ROOT = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if not cacheproxy.MODE.compiled or collection_path.suffix != ".py":
        return None
    try:
        module = ".".join(collection_path.resolve().relative_to(_ROOT).with_suffix("").parts)
    except ValueError:
        return None
    return True if module in cacheproxy.MODE.modules else None
