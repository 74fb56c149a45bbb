"""Full-page screenshot of a weightspace report in headless Chromium, with the render check.

    python benchmarks/screenshot.py REPORT.html OUT.png [--width 1280] [--overwrite]

Uses Playwright with the system Chromium (``apt-get install chromium``; ``$CHROMIUM_PATH`` to pick
another), the same browser as the ``browser`` tests. Prints how many figures drew, the errors and
any non-local request, and exits 1 if a figure did not draw, the page logged an error or it asked
the network for anything (so CI can keep the PNG as an artifact and fail on a broken report).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the report's HTML file")
    ap.add_argument("out", type=Path, help="where to write the PNG")
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every figure (default 120)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--max-height", type=int, default=None, help="keep only the top N CSS pixels (README picture)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's viz, when run from a clone
    import viz

    try:
        out = viz.screenshot(args.report, args.out, width=args.width, timeout_s=args.timeout, overwrite=args.overwrite,
                             max_height=args.max_height)
    except viz.VizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    remote = [u for u in out["requests"] if not u.startswith(("file:", "data:", "blob:", "about:"))]
    print(f"{args.out}: {out['drawn']}/{out['divs']} figures drawn, {len(out['errors'])} errors, "
          f"{len(remote)} network requests, share buttons: {out['share_buttons']}")
    for e in out["errors"]:
        print(f"  error: {e}")
    for u in remote:
        print(f"  request: {u}")
    return 0 if (out["drawn"] == out["divs"] and not out["errors"] and not remote) else 1


if __name__ == "__main__":
    sys.exit(main())
