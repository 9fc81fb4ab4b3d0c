"""Screenshot of optuna-dashboard (`make dashboard`) on a sweep's study, with Debian's headless Chromium.

Needs a running `make dashboard` server and the same browser set-up as scripts/screenshot_ui.py. Usage:
  python scripts/screenshot_dashboard.py http://127.0.0.1:8080 embedded_default docs/optuna_dashboard.png
It opens the study list, checks that the sweep's study is there, opens the study (its history, intermediate
values and parameter plots) and saves the page.
"""

from __future__ import annotations

import re
import sys

from screenshot_ui import SETTLE_MS, browser_page


def main(base: str, study: str, out: str) -> None:
    with browser_page() as page:
        page.goto(f"{base}/dashboard")
        page.wait_for_timeout(SETTLE_MS)
        link = page.get_by_text(re.compile(rf"^\d+\. {re.escape(study)}$"))  # the list reads "1. <study>"
        if link.count() == 0:
            raise SystemExit(f"error: study {study!r} is not listed at {base}/dashboard")
        link.first.click()
        page.wait_for_timeout(SETTLE_MS)
        page.screenshot(path=out, full_page=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python scripts/screenshot_dashboard.py BASE_URL STUDY_NAME OUT.png")
    main(*sys.argv[1:4])
