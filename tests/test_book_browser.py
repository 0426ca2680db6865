"""Every page of the built book, opened in headless Chromium with the network off.

Checks what a reader on a train sees: no request leaves the machine, the math is typeset
(no raw TeX left), every image loads, and the console shows no errors. Needs the book
built (`make book`; `make test` builds it first) and Debian's chromium (`apt-get install
chromium`, or set CHROMIUM to another Chromium/Chrome binary); playwright drives it and
never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

HTML = Path(os.environ.get("BOOK_HTML",
                           Path(__file__).parent.parent / "_build" / "html"))
CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or "/usr/bin/chromium")
PAGES = sorted(p for p in HTML.rglob("*.html")
               if "_static" not in p.parts and "_sources" not in p.parts
               and p.name not in ("genindex.html", "search.html"))

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="no chromium: install Debian's package (apt-get install "
                              "chromium) to run the browser test"),
    pytest.mark.skipif(not PAGES,
                       reason=f"the book is not built in {HTML}: run make book"),
]

# Flags that keep Chromium from calling home (it would be refused on a closed network).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-default-apps"]

# MathJax 3: wait for its startup typesetting, then every math element must hold an
# <mjx-container> (rendered SVG) and no TeX delimiters may be left in the visible text.
MATH_DONE = """async () => {
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return false;
  await MathJax.startup.promise;
  return true;
}"""

UNTYPESET = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('span.math, div.math')) {
    if (!el.querySelector('mjx-container')) bad.push(el.textContent.slice(0, 60));
  }
  const text = (document.querySelector('main') || document.body).innerText;
  for (const raw of ['\\\\(', '\\\\[', '$$']) if (text.includes(raw)) bad.push(raw);
  return bad;
}"""

BROKEN_IMAGES = """() => Array.from(document.images)
  .filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src)"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.mark.parametrize("page_path", PAGES, ids=lambda p: str(p.relative_to(HTML)))
def test_page_works_offline(browser, page_path):
    context = browser.new_context(offline=True)
    page = context.new_page()
    outside, errors = [], []

    def route(r):
        if r.request.url.startswith(("file://", "data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri(), wait_until="load")
    if page_path.name == "index.html":  # a meta refresh to the first page
        page.wait_for_url(lambda url: not url.endswith("/index.html"))
        page.wait_for_load_state("load")
    has_math = page.evaluate("() => document.querySelectorAll('.math').length > 0")
    if has_math:
        page.wait_for_function(MATH_DONE, timeout=30_000)
        assert page.evaluate(UNTYPESET) == [], "math left untypeset"
    assert page.evaluate(BROKEN_IMAGES) == [], "images that did not load"
    assert outside == [], "requests that would leave the machine"
    assert errors == [], "console errors"
    context.close()
