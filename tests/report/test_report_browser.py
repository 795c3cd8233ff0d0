"""Reports opened in a real headless browser (Debian's chromium, started by the test).

For each page: the DOM after the page's scripts ran (``--dump-dom``) shows zero recorded script errors
(``<body data-errors="0">``; the page counts uncaught errors and console.error calls itself), the
page script finished (``data-ready="1"``) and the plot SVG is there; the screenshot PNG is decoded and
must show a plot (hundreds of saturated pixels at least: lines, markers, heat-map cells). A page with a
deliberately broken script checks that the recorder counts errors at all.
Skipped, saying why, when chromium is not installed (``make setup`` installs it where apt-get works).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from mixq.report import load_run, render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
TIMEOUT_S = 90


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium with a fresh profile folder; fails the test after TIMEOUT_S seconds."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--window-size=1200,1600", "--virtual-time-budget=3000", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")


def dump_dom(tmp_path, page) -> str:
    result = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert "<body" in result.stdout, f"chromium printed no DOM (exit {result.returncode}): {result.stderr[-2000:]}"
    return result.stdout


def coloured_pixels(png) -> int:
    """Pixels whose channels differ by more than 0.2 (saturated colour: not white, grey or the dark header)."""
    from matplotlib.image import imread

    rgb = imread(str(png))[..., :3]  # [H, W, 3] float in [0, 1]
    assert rgb.shape[0] >= 800 and rgb.shape[1] >= 800, rgb.shape
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.2).sum())


@pytest.mark.parametrize(("kind", "plot"), [("frontier", "frontier-plot"), ("quantize", "alloc-0"),
                                            ("train", "train-plot"), ("profile", "sens-weight"),
                                            ("export", "bytes-bars")])
def test_page_loads_without_errors_and_shows_the_plot(runs, tmp_path, kind, plot):
    page = tmp_path / f"{kind}.html"
    page.write_text(render_report(load_run(runs[kind])), encoding="utf-8")
    dom = dump_dom(tmp_path, page)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-errors="0"' in body, re.findall(r"<li>(.*?)</li>", dom)
    assert 'data-ready="1"' in body  # the page script ran to its end
    assert re.search(rf'<svg[^>]*id="{plot}"', dom), f"no <svg id={plot}> in the DOM"
    shot = tmp_path / f"{kind}.png"
    result = chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert coloured_pixels(shot) > 800  # a blank page has none (last test)


def test_the_page_records_script_errors(runs, tmp_path):
    html = render_report(load_run(runs["train"]))
    broken = html.replace("</main>", "</main><script>console.error('boom'); undefinedFunction();</script>")
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    dom = dump_dom(tmp_path, page)
    assert 'data-errors="2"' in re.search(r"<body[^>]*>", dom).group(0)
    assert "console.error: boom" in dom and "undefinedFunction" in dom


def test_blank_png_has_no_coloured_pixels(tmp_path):
    from matplotlib.image import imsave

    imsave(tmp_path / "blank.png", np.full((900, 900, 3), 0.97))
    assert coloured_pixels(tmp_path / "blank.png") == 0
