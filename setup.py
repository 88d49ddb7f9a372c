"""Builds cacheproxy with its hot path compiled by mypyc (README: "Compiled hot path"), or pure Python if it cannot.

pyproject.toml holds the project's metadata; this file only adds the compiled modules. The modules in HOT_MODULES
(the request loop's per-message work, picked by profile) are compiled into C extensions next to their .py files.
Compiling never decides whether the install succeeds: if mypy's check or C generation fails, or the C compiler
fails or is missing, the build says so and goes on without extensions, and cacheproxy runs its .py files.
`CACHEPROXY_PURE=1` at build time skips the compilation; at run time it ignores built extensions (cacheproxy/mode.py).

After a successful build, build_ext writes cacheproxy/_compiled.json: each compiled module with the SHA-256 of the
source it was compiled from. cacheproxy/mode.py reads it at import and refuses the whole compiled set (all or none:
compiled modules call each other natively) as soon as one source no longer matches, so that an edited .py runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The modules each request goes through (bench/hit_path.py, bench/miss_path.py under cProfile), compiled together
# as one group: calls between them are native C calls. Keep cacheproxy/mode.py's expectations in mind: a module
# listed here must not be monkeypatched or subclassed by interpreted code (unless allow_interpreted_subclasses).
HOT_MODULES = [
    "cacheproxy/protocol/framing.py",
    "cacheproxy/protocol/messages.py",
    "cacheproxy/protocol/frontend.py",
    "cacheproxy/protocol/replies.py",
    "cacheproxy/protocol/statements.py",
    "cacheproxy/proxy/caching.py",
    "cacheproxy/proxy/local_answers.py",
    "cacheproxy/proxy/inflight.py",
    "cacheproxy/proxy/transaction.py",
    "cacheproxy/proxy/requests.py",
    "cacheproxy/proxy/cache_service.py",
    "cacheproxy/proxy/plain_relay.py",
    "cacheproxy/cache/engine.py",
    "cacheproxy/cache/shard.py",
    "cacheproxy/cache/entry.py",
    "cacheproxy/cache/keys.py",
    "cacheproxy/policy/verdict.py",
    "cacheproxy/policy/classify.py",
    "cacheproxy/analysis/fingerprint.py",
    # What a miss or a write also runs: a simple statement's row by its fingerprint's template, the advisor's
    # counters, the metrics.
    "cacheproxy/analysis/points.py",
    "cacheproxy/analysis/strings.py",
    "cacheproxy/advice/workload.py",
    "cacheproxy/observability/metrics.py",
    # A subclass of CacheEngine (the engine with several workers): interpreted code cannot subclass compiled classes.
    "cacheproxy/workers/engine.py",
]
# The shared library of the group, inside the package (an editable install maps only `cacheproxy` to the source).
GROUP = "cacheproxy._hot"
MANIFEST = "_compiled.json"
# The setup.py commands that build extensions (pip's PEP 517 hooks run editable_wheel or bdist_wheel; metadata-only
# hooks run egg_info/dist_info, which need no mypy run).
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist_egg"}
# mypy checks the code strictly in CI (pyproject.toml); here it only has to type it for compilation, without the
# third-party packages (pip builds in an isolated environment without them: their types become Any), so the
# strictness that depends on them is relaxed. The same flags in every build, so every build compiles the same code.
MYPY_FLAGS = [
    "--no-site-packages",
    "--ignore-missing-imports",
    "--allow-subclassing-any",
    "--allow-untyped-calls",
    "--allow-untyped-decorators",
    "--no-warn-return-any",
    "--no-warn-unused-ignores",
]


def _say(message: str) -> None:
    print(f"cacheproxy build: {message}", file=sys.stderr, flush=True)


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a failed compile leaves no extension behind and no manifest."""

    def run(self) -> None:
        if not self.extensions:
            return
        started = time.monotonic()
        try:
            super().run()
        except Exception as error:  # CCompilerError, missing compiler or headers (setuptools' own exceptions)
            _say(f"compiling the hot path failed ({type(error).__name__}: {error}); installing pure Python")
            self._remove_outputs()
            return
        for directory in self._package_dirs():
            self._write_manifest(directory)
        _say(f"hot path compiled with mypyc: {len(HOT_MODULES)} modules in {time.monotonic() - started:.0f} s")

    def _package_dirs(self) -> set[Path]:
        """Where the package's extensions went: the source tree (in place, editable) and/or the build tree."""
        directories = {Path(self.get_ext_fullpath(f"{GROUP}__mypyc")).parent}
        directories.add(Path(self.build_lib) / "cacheproxy")
        return {directory for directory in directories if directory.is_dir()}

    def _write_manifest(self, directory: Path) -> None:
        manifest = {
            "group": f"{GROUP}__mypyc",
            "modules": {_module_name(path): _source_hash(ROOT / path) for path in HOT_MODULES},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for inplace in (0, 1):
                self.inplace = inplace
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        for directory in self._package_dirs():
            (directory / MANIFEST).unlink(missing_ok=True)


def _remove_inplace() -> None:
    """Extensions of an earlier in-place build that this build will not replace: pure Python must not load them."""
    from importlib.machinery import EXTENSION_SUFFIXES

    package = ROOT / "cacheproxy"
    candidates = [
        package / f"{GROUP.split('.')[-1]}__mypyc",
        *(ROOT / path.removesuffix(".py") for path in HOT_MODULES),
    ]
    for stem in candidates:
        for suffix in EXTENSION_SUFFIXES:
            stem.with_name(stem.name + suffix).unlink(missing_ok=True)
    (package / MANIFEST).unlink(missing_ok=True)


def _extensions() -> list[object]:
    if not BUILDING.intersection(sys.argv[1:]):
        return []  # metadata only (egg_info, dist_info): no need to run mypy
    if os.environ.get("CACHEPROXY_PURE") == "1":
        _say("CACHEPROXY_PURE=1: not compiling; installing pure Python")
        return []
    os.chdir(ROOT)  # mypyc resolves the module paths and writes its C files (build/) relative to here
    # A previous in-place build's extensions and manifest must not outlive this build's outcome.
    _remove_inplace()
    try:
        from mypyc.build import mypycify

        return list(mypycify([*MYPY_FLAGS, *HOT_MODULES], group_name=GROUP, opt_level="3", debug_level="0"))
    except BaseException as error:  # ImportError, or SystemExit when mypy reports an error
        if isinstance(error, KeyboardInterrupt):
            raise
        _say(f"mypyc could not compile the hot path ({type(error).__name__}: {error}); installing pure Python")
        _remove_inplace()
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
