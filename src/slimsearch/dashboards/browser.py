"""A headless Chromium for the report: render it and read its status, or take a screenshot.

Used by the tests (the report renders without script errors) and to take the README's
screenshot; nothing else in slimsearch needs a browser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

from slimsearch.exceptions import SlimSearchError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-unsafe-swiftshader",
         "--virtual-time-budget=15000")


def find_chromium() -> Optional[str]:
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise SlimSearchError(f"no Chromium found on PATH (looked for {list(CANDIDATES)}); "
                              "install Debian's `chromium` package")
    with tempfile.TemporaryDirectory(prefix="slimsearch-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


class Rendered(NamedTuple):
    state: str  # "rendered", "errors", "pending" (scripts never finished) or "missing" (no marker)
    traces: list[str]  # "<figure id>:<trace name>" of every trace drawn
    errors: list[str]  # script errors the page recorded


def render(page: Path, timeout: float = 120) -> Rendered:
    """Open ``page`` in headless Chromium and read the ``#report-status`` marker the report sets."""
    import html

    done = _run(["--dump-dom", Path(page).resolve().as_uri()], timeout)
    match = re.search(r'<div id="report-status"([^>]*)>', done.stdout)
    if match is None:
        return Rendered("missing", [], [f"no #report-status in the DOM (chromium exit {done.returncode}): "
                                        f"{done.stderr[-500:]}"])
    attrs = {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', match.group(1))}
    return Rendered(attrs.get("data-state", "missing"), json.loads(attrs.get("data-traces", "[]")),
                    json.loads(attrs.get("data-errors", "[]")))


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1400, timeout: float = 120) -> Path:
    """A PNG of the top ``width`` x ``height`` pixels of ``page``."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars",
                 Path(page).resolve().as_uri()], timeout)
    if not out.exists():
        raise SlimSearchError(f"chromium wrote no screenshot to {out} (exit {done.returncode}): {done.stderr[-300:]}")
    return out
