"""The mypyc build of the hot path (setup.py) as installed: the compiled modules run, and CACHEPROXY_PURE=1 or an
edited source makes every one of them run from its .py instead (cacheproxy/mode.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cacheproxy
from cacheproxy import mode

pytestmark = pytest.mark.skipif(
    not (mode.PACKAGE_DIR / mode.MANIFEST).exists(),
    reason="no mypyc build here (pip install -e . or python3 setup.py build_ext --inplace builds one)",
)

_PROBE = """
import json, importlib, cacheproxy
from cacheproxy import mode
files = {name: importlib.import_module(name).__file__ for name in cacheproxy.MODE.modules}
print(json.dumps({"compiled": cacheproxy.MODE.compiled, "reason": cacheproxy.MODE.reason, "files": files,
                  "loaded": mode.loaded_compiled(), "edited": getattr(importlib.import_module(
                      "cacheproxy.protocol.framing"), "EDITED", False)}))
"""


def _probe(root: Path, **env: str) -> tuple[dict[str, object], str]:
    environ = {k: v for k, v in os.environ.items() if k != mode.PURE_ENV} | env | {"PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result, done.stderr


def test_the_build_runs_compiled() -> None:
    result, _ = _probe(mode.PACKAGE_DIR.parent)
    assert result["compiled"] is True, result["reason"]
    files = result["files"]
    assert isinstance(files, dict) and files and all(not path.endswith(".py") for path in files.values())
    assert result["loaded"] == sorted(files)


def test_cacheproxy_pure_runs_the_sources() -> None:
    result, _ = _probe(mode.PACKAGE_DIR.parent, CACHEPROXY_PURE="1")
    assert result["compiled"] is False and result["reason"] == "CACHEPROXY_PURE=1"
    files = result["files"]
    assert isinstance(files, dict) and files and all(path.endswith(".py") for path in files.values())
    assert result["loaded"] == []


def test_an_edited_source_runs_instead_of_the_stale_build(tmp_path: Path) -> None:
    """The development hazard: after an in-place build, an edited .py must not be shadowed by its old extension."""
    copy = tmp_path / "cacheproxy"
    shutil.copytree(mode.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "protocol" / "framing.py").open("a") as source:
        source.write("\nEDITED = True\n")
    result, stderr = _probe(tmp_path)
    assert result["compiled"] is False
    assert result["reason"] == "sources changed since the mypyc build: cacheproxy.protocol.framing"
    assert result["edited"] is True and result["loaded"] == []
    files = result["files"]
    assert isinstance(files, dict) and all(
        path.startswith(str(copy)) and path.endswith(".py") for path in files.values()
    )
    assert "RuntimeWarning: cacheproxy: sources changed since the mypyc build" in stderr


def test_this_process_runs_what_mode_decided() -> None:
    loaded = set(mode.loaded_compiled())
    if cacheproxy.MODE.compiled:
        assert loaded and loaded <= set(cacheproxy.MODE.modules)
    else:
        assert not loaded
