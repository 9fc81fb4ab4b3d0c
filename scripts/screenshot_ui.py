"""Screenshot of the MLflow UI comparing a sweep's trials (pl/quality curves), with headless Chromium.

Needs a running `make ui` server, Debian's chromium, and `pip install playwright` (it drives the
system browser; nothing is downloaded). Usage:
  python scripts/screenshot_ui.py http://127.0.0.1:5000 <experiment id> docs/mlflow_ui_sweep.png
"""

import sys

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main(base: str, experiment: str, out: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1700, "height": 1150})
        page.goto(f"{base}/#/experiments/{experiment}/runs?compareRunsMode=CHART")
        page.wait_for_timeout(4000)
        # Expand the sweep's parent run so its trials (child runs) appear in the chart legend.
        # The run-name cell of the parent row holds the "+" expander (an ag-grid row of the runs table).
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.wait_for_timeout(2000)
        page.get_by_placeholder("Search metric charts").fill("pl/quality")
        page.wait_for_timeout(4000)
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
