"""E2E: the container image's build steps (`.ci/build-image`, which needs no Docker engine) and the examples/ files.

There is no Docker engine on the project's machines, so the image is checked the way `.ci/build-image` runs it: the
Dockerfile's facts by grep, its wheel build and install in a fresh venv, and the installed command against `pg`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cacheproxy import __version__
from tests.support.pgcluster import PgCluster

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
BUILD_IMAGE = REPO_ROOT / ".ci" / "build-image"

# The names the admin server exports (/metrics); a histogram also has _bucket, _sum and _count series.
METRICS = {
    "cacheproxy_cache_hits_total",
    "cacheproxy_cache_misses_total",
    "cacheproxy_cache_evictions_total",
    "cacheproxy_cache_expirations_total",
    "cacheproxy_cache_invalidations_total",
    "cacheproxy_cache_entries",
    "cacheproxy_cache_bytes",
    "cacheproxy_cache_max_bytes",
    "cacheproxy_client_connections",
    "cacheproxy_upstream_connections",
    "cacheproxy_queries_total",
    "cacheproxy_query_duration_seconds",
    "cacheproxy_table_hits_total",
    "cacheproxy_table_misses_total",
    "cacheproxy_database_invalidations_total",
}
HISTOGRAMS = {"cacheproxy_query_duration_seconds"}
METRIC_RE = re.compile(r"\bcacheproxy_[a-z_]+")


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m cacheproxy check-config --config PATH` with the upstream from the environment, as in the image."""
    env = {**os.environ, "CACHEPROXY_UPSTREAM": "postgres://app:example-secret@db.invalid:5432/app"}
    return subprocess.run(
        [sys.executable, "-m", "cacheproxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )


# --- the image's build steps ----------------------------------------------------------------------------------


# A cold pip cache downloads every dependency wheel; the builder compiles the hot path with mypyc (1-2 min).
@pytest.mark.timeout(600)
def test_build_image_script_builds_installs_and_smoke_tests(pg: PgCluster, dbname: str) -> None:
    result = subprocess.run(
        [str(BUILD_IMAGE), "--smoke", pg.url(dbname=dbname)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=580,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    for expected in (
        "build-image: Dockerfile: FROM python:3.11-slim, USER 10001:10001, EXPOSE 6432 9187, HEALTHCHECK on /readyz",
        "build-image: builder: pip wheel -> cacheproxy-",
        "build-image: final: fresh venv, wheels installed with --no-index, cacheproxy from site-packages, not editable",
        "build-image: final: hot path compiled with mypyc",  # this machine has gcc, as the image's builder stage
        f"build-image: cacheproxy --version: cacheproxy {__version__}",
        "build-image: check-config (environment only): upstream password masked",
        "build-image: check-config --config examples/cacheproxy.yaml: ok",
        "build-image: smoke: cacheproxy run (environment only) accepts clients on 127.0.0.1:",
        "build-image: smoke: examples/app.py through the proxy: app: ok",
        "build-image: smoke: SIGTERM -> exit 0",
    ):
        assert any(line.startswith(expected) for line in lines), f"no line starting {expected!r} in:\n{output}"
    assert any(line.startswith("build-image: smoke: admin ") or "admin endpoint not" in line for line in lines)
    assert any("HEALTHCHECK command" in line for line in lines), output
    assert lines[-1].startswith("build-image: ok ("), output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("USER 10001:10001", "USER root"), "the last USER must be a non-root user"),
        (("EXPOSE 6432 9187", "EXPOSE 6432"), "no EXPOSE 6432 9187"),
        (
            ("FROM python:3.11-slim AS builder", "FROM python:3.12 AS builder"),
            "every stage must be FROM python:3.11-slim",
        ),
        (("\nHEALTHCHECK ", "\n# HEALTHCHECK "), "no HEALTHCHECK"),
        (("pip wheel --wheel-dir /wheels .", "pip wheel -w /wheels ."), "the builder no longer runs"),
    ],
)
def test_build_image_checks_the_dockerfile(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    """A copy of the script beside a Dockerfile that breaks one stated fact fails before building anything."""
    (tmp_path / ".ci").mkdir()
    script = tmp_path / ".ci" / "build-image"
    script.write_bytes(BUILD_IMAGE.read_bytes())
    script.chmod(0o755)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert change[0] in dockerfile
    (tmp_path / "Dockerfile").write_text(dockerfile.replace(change[0], change[1], 1))
    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert "builder:" not in result.stdout


def test_build_image_rejects_unknown_arguments() -> None:
    result = subprocess.run([str(BUILD_IMAGE), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown argument: --bogus" in result.stderr


# --- examples/ ------------------------------------------------------------------------------------------------


def _strings(node: Any, keys: frozenset[str]) -> Iterator[str]:
    """Every string value under one of `keys`, anywhere in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, keys)


def _metric_family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    path = EXAMPLES / "grafana" / "cacheproxy-dashboard.json"
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]

    exprs = list(_strings(dashboard, frozenset({"expr", "query", "definition"})))
    used = {_metric_family(name) for expr in exprs for name in METRIC_RE.findall(expr)}
    assert used - METRICS == set(), f"metrics that cacheproxy does not export: {sorted(used - METRICS)}"
    assert METRICS - used == set(), f"exported metrics no panel shows: {sorted(METRICS - used)}"
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    histogram = [e for e in exprs if "cacheproxy_query_duration_seconds_bucket" in e]
    for quantile in ("0.5", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e for e in histogram), quantile
    assert all("outcome" in e for e in histogram)
    titles = " | ".join(panel["title"] for panel in panels).lower()
    for topic in ("hit ratio", "hits and misses", "memory", "evictions", "connections", "p99", "kind", "top tables"):
        assert topic in titles, topic


def test_compose_file_wires_postgres_sidecar_and_app() -> None:
    path = EXAMPLES / "docker-compose.yml"
    text = path.read_text()
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"postgres", "valkey", "cacheproxy", "app"}
    assert services["postgres"]["image"] == "postgres:15"
    assert "healthcheck" in services["postgres"]

    proxy = services["cacheproxy"]
    assert (path.parent / proxy["build"]["context"] / proxy["build"].get("dockerfile", "Dockerfile")).is_file()
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "@postgres:5432/" in proxy["environment"]["CACHEPROXY_UPSTREAM"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in proxy["volumes"]}
    assert (path.parent / mounts["/etc/cacheproxy/cacheproxy.yaml"]).is_file()
    assert proxy["command"] == ["run", "--config", "/etc/cacheproxy/cacheproxy.yaml"]
    assert any(port.endswith(":6432") for port in proxy["ports"])
    assert any(port.endswith(":9187") for port in proxy["ports"])

    # The shared tier (cache.shared.url, from CACHEPROXY_SHARED_URL in cacheproxy.yaml): the valkey service.
    assert "allkeys-lru" in services["valkey"]["command"]
    assert proxy["environment"]["CACHEPROXY_SHARED_URL"].startswith("redis://valkey:6379/")
    assert proxy["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert "${CACHEPROXY_SHARED_URL:-}" in (EXAMPLES / "cacheproxy.yaml").read_text()

    app = services["app"]
    assert "@cacheproxy:6432/" in app["environment"]["DATABASE_URL"]
    assert app["depends_on"]["cacheproxy"]["condition"] == "service_healthy"
    assert any(volume.startswith("./app.py:") for volume in app["volumes"])
    # The compose file relies on the image's HEALTHCHECK (on /readyz) for `service_healthy`.
    assert "/readyz" in (REPO_ROOT / "Dockerfile").read_text()


def test_kubernetes_pod_has_sidecar_probes_configmap_and_secret() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "pod.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {"ConfigMap", "Secret", "Pod"}
    spec = by_kind["Pod"]["spec"]
    containers = {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}
    proxy, app = containers["cacheproxy"], containers["app"]

    ports = {port["name"]: port["containerPort"] for port in proxy["ports"]}
    assert ports["admin"] == 9187
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    env = {item["name"]: item for item in proxy["env"]}
    assert env["CACHEPROXY_UPSTREAM"]["valueFrom"]["secretKeyRef"]["name"] == by_kind["Secret"]["metadata"]["name"]
    assert env["CACHEPROXY_LISTEN"]["value"] == "127.0.0.1:6432"
    assert env["CACHEPROXY_ADMIN_LISTEN"]["value"].endswith(":9187")
    assert proxy["securityContext"]["runAsUser"] == 10001

    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/cacheproxy")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = by_kind["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert proxy["args"] == ["run", "--config", "/etc/cacheproxy/cacheproxy.yaml"]
    assert "cacheproxy.yaml" in configmap["data"]

    app_env = {item["name"]: item for item in app["env"]}
    key = app_env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"]
    assert "@127.0.0.1:6432/" in by_kind["Secret"]["stringData"][key]


def test_example_configs_pass_check_config(tmp_path: Path) -> None:
    result = check_config(EXAMPLES / "cacheproxy.yaml")
    assert result.returncode == 0, result.stderr
    assert "upstream: postgres://app:****@db.invalid:5432/app" in result.stdout
    assert "example-secret" not in result.stdout

    docs = yaml.safe_load_all((EXAMPLES / "kubernetes" / "pod.yaml").read_text())
    configmap = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    path = tmp_path / "cacheproxy.yaml"
    path.write_text(configmap["data"]["cacheproxy.yaml"])
    result = check_config(path)
    assert result.returncode == 0, result.stderr


def test_examples_readme_says_how_the_image_is_checked() -> None:
    text = (EXAMPLES / "README.md").read_text()
    assert ".ci/build-image" in text
    assert "no Docker engine" in text


def test_kubernetes_valkey_is_the_shared_tier_of_the_pods_sidecar() -> None:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((EXAMPLES / "kubernetes" / "valkey.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service"}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "allkeys-lru" in container["args"]
    service = docs["Service"]
    pod = next(d for d in yaml.safe_load_all((EXAMPLES / "kubernetes" / "pod.yaml").read_text()) if d["kind"] == "Pod")
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == "cacheproxy")
    url = next(item["value"] for item in proxy["env"] if item["name"] == "CACHEPROXY_SHARED_URL")
    assert (
        url.startswith(f"redis://{service['metadata']['name']}.") and f":{service['spec']['ports'][0]['port']}/" in url
    )
