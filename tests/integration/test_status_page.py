"""The status page in a real headless browser (Debian's chromium, driven through chromedriver by selenium): it
renders its charts (canvas pixels drawn) and its numbers and charts follow the traffic sent through the proxy.

The routes themselves (/, /status.json, the vendored chart library) are checked over plain HTTP too.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.cachetest import connect_via, new_marker, wait_until
from tests.support.pgcluster import PgCluster
from tests.support.proxy import ProxyThread

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
HIT_GREEN = (35, 150, 60)  # the hit series' stroke (static/status.html)

# Per canvas of the page: how many pixels are drawn (not transparent), and the topmost row holding the hit series'
# colour (-1: none), so that a line that rose from zero can be told from a flat one.
_CANVAS_JS = """
const [r0, g0, b0] = arguments[0];
return Array.from(document.querySelectorAll('.chart canvas')).map((canvas) => {
  const ctx = canvas.getContext('2d');
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let drawn = 0, top = -1;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] === 0) continue;
    drawn++;
    if (top < 0 && Math.abs(data[i] - r0) < 30 && Math.abs(data[i + 1] - g0) < 30 && Math.abs(data[i + 2] - b0) < 30
        && data[i + 3] > 200) {
      top = Math.floor(i / 4 / canvas.width);
    }
  }
  return {id: canvas.closest('.chart').id, drawn, top, height: canvas.height};
});
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (.ci/setup installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _admin(start_proxy: Callable[..., ProxyThread]) -> tuple[ProxyThread, str]:
    proxy = start_proxy(admin={"listen": "127.0.0.1:0"}, verify={"sample": 1.0})
    assert proxy.app is not None and proxy.app.admin is not None
    return proxy, f"http://127.0.0.1:{proxy.app.admin.port}"


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_the_routes_serve_the_page_its_library_and_live_json(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread]
) -> None:
    proxy, base = _admin(start_proxy)
    status, content_type, body = _get(base + "/")
    assert status == 200 and content_type.startswith("text/html") and b"/static/uplot.min.js" in body
    status, content_type, body = _get(base + "/static/uplot.min.js")
    assert status == 200 and "javascript" in content_type and body.startswith(b"/*! https://github.com/leeoniya/uPlot")
    before = orjson.loads(_get(base + "/status.json")[2])
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');", dbname=dbname)
    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(5):
            conn.execute(f"SELECT v AS {new_marker()} FROM t WHERE id = 1")  # misses
            conn.execute("SELECT v FROM t WHERE id = 1")  # one miss, then hits
    after = orjson.loads(_get(base + "/status.json")[2])
    assert after["cache"]["hits"] == before["cache"]["hits"] + 4
    assert after["queries"]["read"]["miss"] == before["queries"]["read"]["miss"] + 6
    assert after["top_tables"][0] == {"table": "t", "hits": 4, "misses": 6}
    # Statements are shown as fingerprints: the page has no login, and literals may be private.
    top = after["top_statements"][0]
    assert (top["statement"], top["hits"], top["entries"]) == ("SELECT v FROM t WHERE id = ?", 4, 1)
    assert after["memory"]["max_bytes"] > 0 and after["time_saved_seconds"] > 0
    assert set(after["feeds"]) >= {"invalidation", "catalog", "verify"}
    assert after["feeds"]["invalidation"][dbname] == {"bus": "up"}
    wait_until(lambda: len(orjson.loads(_get(base + "/status.json")[2])["series"]["t"]) >= 2, "two samples")


def test_the_page_renders_charts_and_follows_traffic(
    pg: PgCluster, dbname: str, start_proxy: Callable[..., ProxyThread], browser: Any, tmp_path: Path
) -> None:
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');", dbname=dbname)
    proxy, base = _admin(start_proxy)
    browser.get(base + "/")
    updates = lambda: int(browser.find_element("tag name", "body").get_attribute("data-updates"))  # noqa: E731
    wait_until(lambda: updates() >= 3, "the page to poll /status.json")
    text = lambda id_: browser.find_element("id", id_).text  # noqa: E731
    assert text("hits") == "0" and text("verify").startswith("0")
    canvases = browser.execute_script(_CANVAS_JS, HIT_GREEN)
    assert {c["id"] for c in canvases} == {"chart-qps", "chart-ratio", "chart-memory", "chart-churn"}
    assert all(c["drawn"] > 1000 for c in canvases), canvases  # axes, grid and series are drawn
    flat = next(c for c in canvases if c["id"] == "chart-qps")
    assert flat["top"] < 0 or flat["top"] > flat["height"] // 2, flat  # no traffic yet: a flat line at zero

    with connect_via(pg, dbname, proxy) as conn:
        for _ in range(200):
            assert conn.execute("SELECT v FROM t WHERE id = 1").fetchall() == [("a",)]
    wait_until(lambda: text("hits") == "199", "the hits to show")
    wait_until(lambda: text("hit-ratio") == "99.5%", "the hit ratio to show")
    wait_until(lambda: "SELECT v FROM t WHERE id = ?" in text("top-statements"), "the top statement")
    wait_until(lambda: not text("verify").startswith("0"), "the verification checks to show")

    def risen() -> bool:
        qps = next(c for c in browser.execute_script(_CANVAS_JS, HIT_GREEN) if c["id"] == "chart-qps")
        return 0 <= qps["top"] < qps["height"] // 3  # the hit line climbed to the top third of the chart

    wait_until(risen, "the queries-per-second chart to draw the hits")
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    print(f"status page screenshot: {shot}")
