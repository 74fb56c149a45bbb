"""Render a report in headless Chromium: check that every figure drew offline, take screenshots.

Uses Playwright for Python (``pip install "weightspace[browser]"``; its driver ships inside the
wheel) with the **system** Chromium (``apt-get install chromium``; never ``playwright install``),
found from ``$CHROMIUM_PATH`` or ``chromium``/``chromium-browser``/``google-chrome`` on ``PATH`` and
launched with ``--no-sandbox``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from viz._common import VizError

__all__ = ["find_chromium", "browser_check", "screenshot", "BrowserUnavailable"]

_OFFLINE = ("file:", "data:", "blob:", "about:")


class BrowserUnavailable(VizError, RuntimeError):
    """Playwright or a system Chromium is missing; the message says what to install."""


def find_chromium() -> Optional[str]:
    """Path of a system Chromium: ``$CHROMIUM_PATH``, else the first of chromium, chromium-browser, google-chrome."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


@contextmanager
def _browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BrowserUnavailable(
            'Playwright is not installed: pip install "weightspace[browser]" (or playwright)'
        ) from exc
    exe = find_chromium()
    if exe is None:
        raise BrowserUnavailable("no system Chromium: apt-get install chromium, or set CHROMIUM_PATH")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=exe,
            args=["--no-sandbox", "--disable-gpu", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"],
        )
        try:
            yield b
        finally:
            b.close()


_PROBE = """() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return {
    divs: divs.length,
    drawn: divs.filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')).length,
    main_svg: document.querySelectorAll('.js-plotly-plot .main-svg').length,
    data_lengths: divs.map(d => (d.data ? d.data.length : -1)),
    share_buttons: document.querySelectorAll(
      '.modebar-btn[data-title*="Share"], .modebar-btn[data-title*="Cloud"]').length,
    modebar_titles: [...new Set([...document.querySelectorAll('.modebar-btn')].map(b => b.getAttribute('data-title')))],
  };
}"""


def _check_page(
    b, page_path: Path, n: Optional[int], timeout_s: float, width: int, height: int, screenshot_to,
    max_height: Optional[int] = None,
) -> Dict[str, Any]:
    page = b.new_page(viewport={"width": width, "height": height})
    errors: List[str] = []
    requests: List[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("request", lambda r: requests.append(r.url))
    try:  # inline figure scripts run while the page loads: a big report can take a while on a busy machine
        page.goto(page_path.as_uri(), wait_until="load", timeout=timeout_s * 1000)
    except Exception as exc:
        errors.append(f"timeout: the page did not load within {timeout_s} s ({type(exc).__name__})")
    if n is None:
        n = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
    try:
        page.wait_for_function(
            "n => [...document.querySelectorAll('.plotly-graph-div')]"
            ".filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')).length >= n",
            arg=n,
            timeout=timeout_s * 1000,
        )
    except Exception as exc:  # a timeout: report what is there
        errors.append(f"timeout: {n} figures did not render within {timeout_s} s ({type(exc).__name__})")
    page.wait_for_timeout(300)  # let late console errors arrive
    out = page.evaluate(_PROBE)
    if screenshot_to is not None:
        if max_height:  # the top of the page only (e.g. a README picture)
            page.screenshot(path=str(screenshot_to), full_page=True,
                            clip={"x": 0, "y": 0, "width": width, "height": max_height})
        else:
            page.screenshot(path=str(screenshot_to), full_page=True)
    page.close()
    out["errors"] = errors
    out["requests"] = requests
    out["offline"] = all(u.startswith(_OFFLINE) for u in requests)
    return out


def browser_check(
    path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    expected_figures: Union[None, int, Sequence[Optional[int]]] = None,
    *,
    timeout_s: float = 30.0,
    width: int = 1280,
    height: int = 900,
    screenshot_to: Optional[Union[str, os.PathLike]] = None,
):
    """Open ``path`` in headless Chromium and report what rendered.

    Waits (up to ``timeout_s``) until ``expected_figures`` plot divs hold a drawn ``.main-svg`` (default:
    as many as there are ``.plotly-graph-div``). Returns ``{"divs", "drawn", "main_svg", "data_lengths",
    "share_buttons", "modebar_titles", "errors", "requests", "offline"}``: ``data_lengths`` is each plot
    div's number of traces, ``errors`` are page errors and console errors, ``requests`` every URL the
    page asked for, ``offline`` whether all are ``file:``/``data:``/``blob:``. Nothing is asserted here:
    the caller decides. A list of paths (with a list of expected counts) is checked in one browser
    session and gives a list of dicts.
    """
    many = isinstance(path, (list, tuple))
    paths = [Path(p).resolve() for p in (path if many else [path])]
    ns = list(expected_figures) if isinstance(expected_figures, (list, tuple)) else [expected_figures] * len(paths)
    if len(ns) != len(paths):
        raise VizError(f"{len(paths)} pages but {len(ns)} expected figure counts")
    for p in paths:
        if not p.is_file():
            raise VizError(f"{p} is not a file")
    with _browser() as b:
        outs = [
            _check_page(b, p, n, timeout_s, width, height, screenshot_to if not many else None)
            for p, n in zip(paths, ns)
        ]
    return outs if many else outs[0]


def screenshot(
    path: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    width: int = 1280,
    timeout_s: float = 60.0,
    overwrite: bool = False,
    max_height: Optional[int] = None,
) -> Dict[str, Any]:
    """A full-page PNG of a report after every figure has drawn (only its top ``max_height`` CSS pixels
    when given); returns :func:`browser_check`'s dict."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise VizError(f"{out} exists; pass overwrite=True to replace it")
    if not out.parent.is_dir():
        raise VizError(f"directory {out.parent} does not exist")
    with _browser() as b:
        return _check_page(b, Path(path).resolve(), None, timeout_s, width, 900, out, max_height)
