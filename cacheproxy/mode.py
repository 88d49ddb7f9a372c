"""Which code runs the hot path: the modules setup.py compiled with mypyc, or their .py files.

Python prefers an extension module (.so) to the .py beside it, so after an in-place build (the editable install) an
edited .py would silently keep running its stale compiled version. The build therefore records the SHA-256 of each
compiled module's source (cacheproxy/_compiled.json), and `activate` (run by cacheproxy/__init__.py, before any
other module of the package is imported) refuses every compiled module, in favour of the .py files, when:
- CACHEPROXY_PURE=1 is set (say, to compare, or to debug with pdb), or
- one compiled module's source no longer matches its recorded hash (warned about: rebuild with `pip install -e .`
  or `python3 setup.py build_ext --inplace`), or
- an extension of the set is missing.
All or none: compiled modules call each other natively, so a compiled one must never run next to a .py one of the
same set. This module is never compiled itself (it decides which code is).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = "_compiled.json"
PURE_ENV = "CACHEPROXY_PURE"


@dataclass(frozen=True)
class Mode:
    """The outcome of `decide`: compiled or not, why, and the modules of the compiled set."""

    compiled: bool
    reason: str  # why pure Python ("" when compiled)
    modules: tuple[str, ...]  # the compiled set named by the manifest (empty without one)

    @property
    def name(self) -> str:
        return "compiled" if self.compiled else "pure"

    def describe(self) -> str:
        if self.compiled:
            return f"hot path compiled with mypyc ({len(self.modules)} modules)"
        return f"hot path in pure Python ({self.reason})"


def _extension(package_dir: Path, module: str) -> Path | None:
    """The built extension of a module of the package (`cacheproxy.x.y`), if there is one."""
    stem = package_dir.joinpath(*module.split(".")[1:])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.exists():
            return candidate
    return None


def decide(environ: Mapping[str, str], package_dir: Path = PACKAGE_DIR) -> Mode:
    """Compiled if the manifest's extensions are all there and every source still has the hash it was built from."""
    try:
        manifest = json.loads((package_dir / MANIFEST).read_text())
        group: str = manifest["group"]
        hashes: dict[str, str] = manifest["modules"]
    except FileNotFoundError:
        return Mode(False, "not compiled: no mypyc build installed", ())
    except (ValueError, KeyError, TypeError) as error:
        return Mode(False, f"unreadable {MANIFEST}: {error!r}", ())
    modules = tuple(sorted(hashes))
    if environ.get(PURE_ENV) == "1":
        return Mode(False, f"{PURE_ENV}=1", modules)
    changed = []
    for module, digest in hashes.items():
        source = package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")
        try:
            if hashlib.sha256(source.read_bytes()).hexdigest() != digest:
                changed.append(module)
        except OSError:
            pass  # an install without sources (none of ours): nothing to prefer to the extension
    if changed:
        return Mode(False, f"sources changed since the mypyc build: {', '.join(sorted(changed))}", modules)
    missing = [module for module in (group, *modules) if _extension(package_dir, module) is None]
    if missing:
        return Mode(False, f"compiled extensions missing: {', '.join(missing)}", modules)
    return Mode(True, "", modules)


class PreferSource(MetaPathFinder):
    """Finds a module of the package as its .py file where an extension module stands beside it."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not fullname.startswith(self.prefix):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader) or not spec.origin:
            return spec
        source = Path(spec.origin).with_name(fullname.rsplit(".", 1)[-1] + ".py")
        return spec_from_file_location(fullname, source) if source.exists() else spec


def activate(environ: Mapping[str, str] = os.environ) -> Mode:
    """Decides the mode and, when pure, makes the import system take the .py files of the compiled set."""
    mode = decide(environ)
    if not mode.compiled and mode.modules:  # there are extensions to refuse
        if not any(isinstance(finder, PreferSource) for finder in sys.meta_path):
            sys.meta_path.insert(0, PreferSource(__package__ or "cacheproxy"))
        if mode.reason.startswith("sources changed"):
            warnings.warn(f"cacheproxy: {mode.reason}; running pure Python until rebuilt", RuntimeWarning, stacklevel=2)
    return mode


def loaded_compiled() -> list[str]:
    """The modules of the package imported so far from extension modules (what actually runs compiled), without
    the group's shared library (`_hot__mypyc`, the code of them all)."""
    found = []
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        loader = spec.loader if isinstance(spec, ModuleSpec) else None
        if (
            name.startswith("cacheproxy.")
            and not name.endswith("__mypyc")
            and isinstance(loader, importlib.machinery.ExtensionFileLoader)
        ):
            found.append(name)
    return sorted(found)
