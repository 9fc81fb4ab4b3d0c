"""Screenshots of the MLflow UI over a sweep's store, with Debian's headless Chromium.

Needs a running `make ui` server, Debian's chromium (/usr/bin/chromium) and playwright (requirements.lock;
it drives the system browser, nothing is downloaded). Usage:
  python scripts/screenshot_ui.py http://127.0.0.1:5000 <experiment id> docs/
writes docs/mlflow_ui_sweep.png: the experiment's training-runs view (chart mode), the sweep's parent run
expanded to its trials, charts filtered to pl/quality (with and without refinement); docs/mlflow_ui_system.png:
the same view on the trials' system metrics (CPU, memory, disk, network; GPU where present); and
docs/mlflow_ui_models.png: the experiment's logged models (each trial's best checkpoint) with their metrics.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google's hosts on a closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1700, "height": 1150}
SETTLE_MS = 4000  # the UI fetches runs and metric histories after the first paint
# MLflow 3.17's UI picks GenAI or model training from this URL parameter, else from the browser's local
# storage (default GenAI); the experiment's mlflow.experimentKind tag does not decide it.
ML_VIEW = "workflowType=machine_learning"
CHART_FILTER = "pl/quality"  # with and without refinement: the comparison the sweep is about


@contextmanager
def browser_page():
    """A page in headless Chromium with a fresh, throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="s4mc-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS, viewport=VIEWPORT)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_timeout(SETTLE_MS)
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():  # MLflow 3's assistant opens beside every page of a fresh profile: not ours to show
        close.first.click()
        page.wait_for_timeout(500)
    if "Model training" not in page.inner_text("body"):
        raise SystemExit(f"error: {page.url} is not MLflow's model-training (runs) view")


def runs_view(page, base: str, experiment: str, out: Path, chart_filter: str = CHART_FILTER) -> None:
    _open(page, f"{base}/#/experiments/{experiment}/runs?{ML_VIEW}&compareRunsMode=CHART")
    # Expand the sweep's parent run (the "+" in its run-name cell) so that its trials are listed and charted.
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    page.wait_for_timeout(2000)
    page.get_by_placeholder("Search metric charts").fill(chart_filter)
    page.wait_for_timeout(SETTLE_MS)
    page.screenshot(path=str(out))


def models_view(page, base: str, experiment: str, out: Path) -> None:
    _open(page, f"{base}/#/experiments/{experiment}/models?{ML_VIEW}")
    if "-best" not in page.inner_text("body"):
        raise SystemExit(f"error: no logged model named <trial>-best on {page.url}")
    page.screenshot(path=str(out))


def main(base: str, experiment: str, out_dir: str) -> None:
    out = Path(out_dir)
    # One fresh profile per view: the UI remembers expanded runs, so a second visit would collapse them.
    with browser_page() as page:
        runs_view(page, base, experiment, out / "mlflow_ui_sweep.png")
    with browser_page() as page:
        runs_view(page, base, experiment, out / "mlflow_ui_system.png", chart_filter="system/")
    with browser_page() as page:
        models_view(page, base, experiment, out / "mlflow_ui_models.png")
    print(f"wrote mlflow_ui_sweep.png, mlflow_ui_system.png and mlflow_ui_models.png in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python scripts/screenshot_ui.py BASE_URL EXPERIMENT_ID OUT_DIR")
    main(*sys.argv[1:4])
