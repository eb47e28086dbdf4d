"""Screenshots of the Prefect dashboards: the pictures must render in the UI itself.

In a throw-away copy of the repository (small params, ``scripts/local_prefect.py``)
this starts ``prefect server`` (127.0.0.1, a free port, SQLite in a temporary
``PREFECT_HOME``), runs ``python -m flows.run`` against it (what ``make run`` runs:
the training flow, then the default allocation), and drives headless Chromium
(``apt-get install chromium``) over its DevTools protocol: it opens each flow run's
page in the UI (``/v2/runs/flow-run/ID``, the server's default UI), clicks the
Artifacts tab, and saves a full-page screenshot; then each picture and table
artifact's own page. It checks:

1. each flow run's Artifacts tab shows a card for every artifact key of that flow;
2. on that tab, the cards of the budget curve, the test-trial cost curve and the
   clusters picture each hold an ``<img>`` with a ``data:image/png`` source that
   the browser decoded (``naturalWidth > 0``), for both flows;
3. each picture artifact's own page shows its image too, and the clusters table
   artifact's page has ``chosen_arm`` as its first column.

Exit code 0 when every check holds, 1 otherwise. About 3 minutes on 2 cores.

    python scripts/dashboard_screenshots.py [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_prefect import copy_repository, env_for, free_port, prefect_server, sh, stop

KEYS = {
    "training": ["training-progress", "budget-curve", "cost-curve", "clusters", "clusters-chart", "training-report"],
    "allocation": ["allocation-budget-curve", "allocation-cost-curve", "allocation-clusters",
                   "allocation-clusters-chart", "allocation-report"],
}
PICTURES = {"budget-curve", "cost-curve", "clusters-chart", "allocation-budget-curve", "allocation-cost-curve",
            "allocation-clusters-chart"}
TABLES = {"clusters", "allocation-clusters"}

#: Per artifact card on the page: its title, and whether it holds a decoded PNG image.
CARDS_JS = """Object.fromEntries(Array.from(document.querySelectorAll('[data-slot=card]')).map(card => {
  const title = card.querySelector('h3'); const img = card.querySelector('img[src^="data:image/png"]');
  return [title ? title.textContent.trim() : '', !!(img && img.complete && img.naturalWidth > 0)]; }))"""
IMAGES_JS = """Array.from(document.querySelectorAll('img[src^="data:image/png"]'))
  .filter(img => img.complete && img.naturalWidth > 0).length"""
FIRST_COLUMN_JS = "(() => { const th = document.querySelector('th'); return th ? th.textContent.trim() : ''; })()"
TAB_JS = """(() => { const tab = Array.from(document.querySelectorAll('button[role=tab]'))
  .find(e => e.textContent.trim() === 'Artifacts'); if (!tab) return false;
  for (const type of ['pointerdown', 'mousedown', 'pointerup', 'mouseup', 'click'])
    tab.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, button: 0}));
  return true; })()"""


def chromium() -> str:
    """The Chromium binary (Debian: ``apt-get install chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("error: chromium not found: apt-get install -y chromium")


class Page:
    """One headless Chromium tab, driven over the DevTools protocol (``websockets``, a Prefect dependency)."""

    def __init__(self, ws) -> None:
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})

    async def js(self, expression: str):
        found = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return found.get("result", {}).get("value")

    async def open(self, url: str, ready: str, timeout_s: float = 60) -> bool:
        """Navigate and wait until the expression ``ready`` is true."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if await self.js(ready):
                return True
        return False

    async def screenshot(self, path: Path) -> None:
        """The whole page, however tall, as PNG."""
        height = await self.js("Math.max(...Array.from(document.querySelectorAll('*')).map(e => e.scrollHeight))")
        await self.call("Emulation.setDeviceMetricsOverride", width=1600, height=min(int(height or 1200), 8000),
                        deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(1.5)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        await self.call("Emulation.setDeviceMetricsOverride", width=1600, height=1200, deviceScaleFactor=1,
                        mobile=False)


def start_browser(profile: Path) -> tuple[subprocess.Popen, str]:
    """Headless Chromium with its DevTools endpoint on 127.0.0.1; the process and its page's websocket URL."""
    port = free_port()
    browser = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                f"--user-data-dir={profile}", "--window-size=1600,1200", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                return browser, next(t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page")
        except (OSError, StopIteration):
            time.sleep(0.2)
    stop(browser)
    raise RuntimeError("chromium did not start")


async def inspect(ws_url: str, ui: str, runs: dict, out: Path) -> dict[str, bool]:
    """Open every page, take its screenshot, and evaluate the checks."""
    import websockets

    checks: dict[str, bool] = {}
    async with websockets.connect(ws_url, max_size=2**28) as ws:
        page = Page(ws)
        await page.call("Page.enable")
        for flow, keys in KEYS.items():
            run_id, arts = runs.get(flow, ("", {}))
            await page.open(f"{ui}/v2/runs/flow-run/{run_id}", TAB_JS)
            await asyncio.sleep(4)
            cards = await page.js(CARDS_JS) or {}
            await page.screenshot(out / f"{flow}-artifacts-tab.png")
            checks[f"{flow}: Artifacts tab has a card for each of {', '.join(keys)}"] = set(keys) <= set(cards)
            for key in keys:
                if key in PICTURES:
                    checks[f"{flow}: Artifacts tab shows {key} as a picture"] = bool(cards.get(key))
            for key in (k for k in keys if k in PICTURES | TABLES and k in arts):
                url = f"{ui}/v2/artifacts/artifact/{arts[key]}"
                if key in PICTURES:
                    ok = await page.open(url, f"{IMAGES_JS} > 0")
                    checks[f"{flow}: the {key} page shows its picture"] = ok
                else:
                    ok = await page.open(url, f"{FIRST_COLUMN_JS} !== ''")
                    checks[f"{flow}: the {key} page has chosen_arm first"] = (
                        ok and await page.js(FIRST_COLUMN_JS) == "chosen_arm")
                await page.screenshot(out / f"{key}.png")
    return checks


def flow_runs_and_artifacts(api: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Per flow name: the latest run's id and its artifacts (key -> id)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = {}
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for fr in client.read_flow_runs():
            flow = client.read_flow(fr.flow_id).name
            if flow in KEYS and flow not in out:
                arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
                out[flow] = (str(fr.id), {a.key: str(a.id) for a in arts})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the screenshots go (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="budgetalloc-screens-"))
    out = args.out or work / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    repo = copy_repository(work / "repo")
    with prefect_server(work / "prefect-home", log=work / "server.log") as settings:
        sh(repo, sys.executable, "-m", "flows.run", env=env_for(repo, **settings))
        runs = flow_runs_and_artifacts(settings["PREFECT_API_URL"])
        browser, ws_url = start_browser(work / "chromium-profile")
        try:
            checks = asyncio.run(inspect(ws_url, settings["PREFECT_API_URL"].removesuffix("/api"), runs, out))
        finally:
            stop(browser)
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(json.dumps({"screenshots": sorted(str(p) for p in out.glob("*.png"))}, indent=1))
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
