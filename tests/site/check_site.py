#!/usr/bin/env python
"""Open every page of the built book in headless Chromium and check that it works offline.

Usage:  python tests/site/check_site.py _build/html [--require-math book/03_vae] [--search-query scvi]

For each page in the book's navigation (plus the root redirect and any other built page) it checks:

  (a) math: if the page has math (elements with class "math", or its source under _sources/ has
      $...$, $$...$$, \\begin{...}, {math}), MathJax is loaded, has typeset every math element,
      reports no TeX errors, and no raw TeX delimiters (\\( \\[ $$) remain in the page's text
      (code blocks excepted);
  (b) images: every <img> has loaded (complete and naturalWidth > 0), notebook figures included;
  (c) requests: no request for a page resource failed or got an HTTP status >= 400;
  (d) offline: no request left 127.0.0.1 (such requests are recorded and blocked);
  (e) links: every link to another file of the site points to a file that exists;
  (f) JavaScript: no uncaught exception;
  (g) hidden tests: an exercise page (exercises/*.html) shows none of the hidden tests of its
      instructor notebook (exercises/<page>.ipynb of the repository, or --exercises DIR), neither
      in its HTML nor in the source it offers for download (_sources/): no "### BEGIN/END HIDDEN
      TESTS" marker and no line of a hidden-test region. This check reads files only.

It then opens search.html?q=QUERY and checks that the Sphinx search lists results that exist.

Prints one line per page (OK / FAIL with reasons), then "N passed, M failed"; exits 1 on any
failure and 2 when the browser cannot be started. The page discovery, the source-math detection
and the hidden-test check are plain Python (no browser) and are unit-tested in
tests/test_site_check_logic.py.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Built files that are not pages of the book.
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "jupyter_execute", ".doctrees"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# Uncaught JavaScript errors that are known, harmless and not ours to fix. Each is reported as a
# note, not a failure.
KNOWN_JS_ERRORS = {
    # Sphinx 7.4.7 (the last 7.x; Jupyter Book 1 needs sphinx~=7.0) writes inline scripts that an
    # extension adds after the builder starts twice (it compares filename None with ''), so
    # sphinx-thebe's `const THEBE_JS_URL = ...` is declared twice and the second copy throws. The
    # first copy defines everything; thebe (the unused "live code" button) is unaffected.
    "Identifier 'THEBE_JS_URL' has already been declared":
        "sphinx-thebe's inline config script is written twice by Sphinx 7.4 (harmless)",
}


# --------------------------------------------------------------------------------------------
# Page discovery (pure Python)
# --------------------------------------------------------------------------------------------
class _NavParser(HTMLParser):
    """Collect the hrefs of <a class="reference internal"> inside <nav class="... bd-docs-nav ...">
    (the sidebar table of contents of the Sphinx book theme), and a meta refresh target."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # >0 while inside the docs nav
        self.hrefs: list[str] = []
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            m = re.search(r"url\s*=\s*['\"]?([^'\";]+)", a.get("content") or "", re.I)
            if m:
                self.refresh = m.group(1).strip()
        if tag == "nav":
            if self.depth or "bd-docs-nav" in classes:
                self.depth += 1
        elif self.depth and tag == "a" and "internal" in classes and a.get("href"):
            self.hrefs.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "nav" and self.depth:
            self.depth -= 1


def parse_nav(html: str) -> tuple[list[str], str | None]:
    """Return (hrefs of the sidebar toc links, meta-refresh target or None) of one HTML page."""
    p = _NavParser()
    p.feed(html)
    return p.hrefs, p.refresh


def _resolve(page_rel: str, href: str) -> str | None:
    """Resolve href (relative to the page at site-relative path page_rel) to a site-relative file
    path, or None for external links and pure fragments."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc:
        return None
    if not parts.path:  # "#anchor": the page itself
        return page_rel
    joined = urljoin("http://site/" + page_rel, parts.path)
    path = unquote(urlsplit(joined).path).lstrip("/")
    if path == "" or path.endswith("/"):
        path += "index.html"
    return path


def discover_pages(site: Path) -> tuple[list[str], list[str]]:
    """Pages to check, as site-relative paths, navigation order first; plus problems found.

    The navigation is read from the sidebar of the root page (index.html, following its redirect);
    every other built .html page (except genindex/search and files under _static, _sources, ...)
    is appended so that no page escapes the check. Problems: nav links to missing files, or no
    navigation found at all."""
    problems: list[str] = []
    all_pages = sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if not (set(p.relative_to(site).parts[:-1]) & SKIP_DIRS)
        and p.relative_to(site).as_posix() not in SKIP_PAGES
    )
    start = "index.html"
    if (site / start).exists():
        _, refresh = parse_nav((site / start).read_text(encoding="utf-8", errors="replace"))
        if refresh:
            target = _resolve(start, refresh)
            if target and (site / target).exists():
                start = target
            else:
                problems.append(f"index.html redirects to {refresh!r}, which does not exist")
    nav: list[str] = []
    if (site / start).exists():
        hrefs, _ = parse_nav((site / start).read_text(encoding="utf-8", errors="replace"))
        for href in [""] + hrefs:  # "" = the root page itself
            target = _resolve(start, href) if href else start
            if target is None:
                continue
            if not (site / target).exists():
                problems.append(f"navigation link {href!r} on {start} points to a missing file")
            elif target not in nav:
                nav.append(target)
    if len(nav) <= 1:
        problems.append(f"no sidebar navigation found on {start} (is this a Jupyter Book build?)")
    pages = nav + [p for p in all_pages if p not in nav]
    return pages, problems


# --------------------------------------------------------------------------------------------
# Does a page's source contain math? (pure Python)
# --------------------------------------------------------------------------------------------
_FENCE = re.compile(r"^(```|~~~)(?!\{math\}).*?^\1", re.M | re.S)  # code fences, not ```{math}
_CODESPAN = re.compile(r"(?<!\{math\})`[^`\n]*`")  # `code` but not {math}`...`
_MATH_PATTERNS = [
    ("$$...$$", re.compile(r"\$\$.+?\$\$", re.S)),
    # myst's dollarmath with its defaults (dmath_allow_space/allow_digits = True) makes any
    # $...$ on one line math, even "$5 and $10"; mirror that.
    ("$...$", re.compile(r"(?<![\\$])\$[^$\n]+?(?<!\\)\$")),
    ("\\begin{...}", re.compile(r"\\begin\{(equation|align|gather|multline|eqnarray)\*?\}")),
    ("{math}", re.compile(r"\{math\}")),
    ("\\(...\\)", re.compile(r"\\\(.+?\\\)", re.S)),
]


def markdown_of_source(text: str, suffix: str) -> str:
    """The markdown prose of a source file: markdown cells of a notebook, or a .md file."""
    if suffix == ".ipynb":
        try:
            nb = json.loads(text)
        except ValueError:
            return ""
        cells = nb.get("cells", [])
        return "\n\n".join(
            "".join(c["source"]) if isinstance(c.get("source"), list) else c.get("source", "")
            for c in cells
            if c.get("cell_type") == "markdown"
        )
    return text


def source_math(text: str, suffix: str = ".md") -> str | None:
    """Return an example of math found in the prose of a page's source, or None.
    Code fences and `code spans` are ignored."""
    md = markdown_of_source(text, suffix)
    md = _FENCE.sub("", md)
    md = _CODESPAN.sub("", md)
    for _, pat in _MATH_PATTERNS:
        m = pat.search(md)
        if m:
            snippet = " ".join(m.group(0).split())
            return snippet if len(snippet) <= 40 else snippet[:37] + "..."
    return None


def find_source(site: Path, page: str) -> Path | None:
    """The copy of a page's source that Sphinx keeps under _sources/ (any suffix), if any."""
    stem = page[: -len(".html")]
    folder = site / "_sources" / Path(stem).parent
    if not folder.is_dir():
        return None
    name = Path(stem).name
    for cand in sorted(folder.iterdir()):
        # Sphinx 7 writes e.g. 01_counts.ipynb (or 01_counts.ipynb.txt / intro.md.txt)
        base = cand.name[:-4] if cand.name.endswith(".txt") else cand.name
        if Path(base).stem == name and Path(base).suffix in {".ipynb", ".md", ".rst", ".txt", ""}:
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Hidden tests of the exercises must not reach the site (pure Python)
# --------------------------------------------------------------------------------------------
EXERCISES = Path(__file__).resolve().parents[2] / "exercises"  # the instructor notebooks
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
MIN_HIDDEN_CHARS = 12  # shorter hidden lines (")", "else:", "import math") are too common to mean a leak


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _cells(notebook_text: str) -> list[str]:
    """The source of every cell of a notebook (JSON text), or [] if it is not a notebook."""
    try:
        cells = json.loads(notebook_text).get("cells", [])
    except (ValueError, AttributeError):
        return []
    return ["".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
            for c in cells]


def _notebook_sources(notebook_text: str) -> str:
    return "\n".join(_cells(notebook_text)) or notebook_text


def hidden_test_lines(notebook_text: str) -> list[str]:
    """The lines of a notebook's hidden-test regions that would betray a leak: whitespace-normalized,
    at least MIN_HIDDEN_CHARS long, and not also written outside the hidden regions (a line the
    visible code shares, such as an import, proves nothing). Comments count: they are hidden too."""
    hidden, outside = set(), set()
    for source in _cells(notebook_text):
        inside = False
        for line in source.splitlines():
            mark = line.strip()
            if mark.startswith(HIDDEN_BEGIN):
                inside = True
            elif mark.startswith(HIDDEN_END):
                inside = False
            elif mark:
                (hidden if inside else outside).add(_normalize(line))
    return sorted(line for line in hidden - outside if len(line) >= MIN_HIDDEN_CHARS)


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def page_text(html: str) -> str:
    """Everything a page carries as text (scripts included, since a reader can see those too), with
    the tags dropped, entities decoded and whitespace runs collapsed. Syntax highlighting splits a
    code line into many spans; joining their text gives the line back."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return _normalize("".join(parser.parts))


def hidden_test_leaks(text: str, hidden_lines: list[str]) -> list[str]:
    """The hidden-test markers and hidden lines that occur in ``text`` (a page's text or a source)."""
    text = _normalize(text)
    return [m for m in (HIDDEN_BEGIN, HIDDEN_END) if m in text] + [ln for ln in hidden_lines if ln in text]


def hidden_test_problems(site: Path, exercises: Path = EXERCISES) -> dict[str, list[str]]:
    """For every exercise page of the site (exercises/*.html), the hidden tests it shows: in its
    rendered HTML, or in the copy of its source that the page offers for download (_sources/).
    The hidden lines are read from the instructor notebook of the same name in ``exercises``.
    Returns {page: [reasons]}; pages without problems are left out."""
    problems: dict[str, list[str]] = {}
    for page in sorted(site.glob("exercises/*.html")):
        rel = page.relative_to(site).as_posix()
        notebook = exercises / (page.stem + ".ipynb")
        reasons = []
        hidden = hidden_test_lines(notebook.read_text(encoding="utf-8")) if notebook.exists() else []
        if notebook.exists() and not hidden and HIDDEN_BEGIN in notebook.read_text(encoding="utf-8"):
            reasons.append(f"{notebook.name} has hidden tests but none long enough to look for")
        leaks = hidden_test_leaks(page_text(page.read_text(encoding="utf-8", errors="replace")), hidden)
        if leaks:
            reasons.append(f"hidden tests shown on the page ({len(leaks)} lines), e.g. {leaks[0]!r}")
        source = find_source(site, rel)
        if source is not None:
            text = source.read_text(encoding="utf-8", errors="replace")
            if ".ipynb" in source.name:  # JSON escapes quotes and newlines: compare the cells' text
                text = _notebook_sources(text)
            leaks = hidden_test_leaks(text, hidden)
            if leaks:
                reasons.append(f"hidden tests in the page's downloadable source {source.relative_to(site).as_posix()} "
                               f"({len(leaks)} lines), e.g. {leaks[0]!r}")
        if reasons:
            problems[rel] = reasons
    return problems


# --------------------------------------------------------------------------------------------
# Browser checks
# --------------------------------------------------------------------------------------------
JS_MATH = r"""
async (timeoutMs) => {
  const out = {mathElements: 0, untypeset: [], containers: 0, errors: [], mathjax: null};
  const maths = Array.from(document.querySelectorAll('.math'));
  out.mathElements = maths.length;
  const hasMJ = !!(window.MathJax && (window.MathJax.startup || window.MathJax.version));
  const scripts = Array.from(document.scripts).map(s => s.src).filter(s => /mathjax/i.test(s));
  out.mathjaxScripts = scripts;
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    const t = new Promise((_, rej) => setTimeout(() => rej(new Error('timeout')), timeoutMs));
    try { await Promise.race([window.MathJax.startup.promise, t]); out.mathjax = 'done'; }
    catch (e) { out.mathjax = 'MathJax.startup.promise: ' + e; }
  } else {
    out.mathjax = hasMJ ? 'no startup promise' : 'absent';
  }
  out.version = (window.MathJax && window.MathJax.version) || null;
  for (const el of maths) {
    if (!el.querySelector('mjx-container')) {
      out.untypeset.push((el.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 60));
    }
  }
  out.containers = document.querySelectorAll('mjx-container').length;
  // TeX errors: <merror> (e.g. a missing argument) and macros MathJax does not know, which its
  // noundefined extension shows as red text instead of failing.
  try {
    for (const item of window.MathJax.startup.document.math) {
      const mml = window.MathJax.startup.toMML(item.root);
      const tex = String(item.math).replace(/\s+/g, ' ').trim().slice(0, 50);
      const err = /data-mjx-error="([^"]*)"/.exec(mml);
      const undef = /<mtext mathcolor="red">(\\[^<]*)</.exec(mml);
      if (err) out.errors.push(`${err[1]} in '${tex}'`);
      else if (undef) out.errors.push(`undefined macro ${undef[1]} in '${tex}'`);
    }
  } catch (e) {  // no MathJax, or an API change: fall back to the rendered error elements
    for (const e of document.querySelectorAll('mjx-merror')) {
      out.errors.push((e.getAttribute('data-mjx-error') || e.textContent || '').slice(0, 80));
    }
  }
  return out;
}
"""

# Text of the page outside code blocks and MathJax output, searched for raw TeX left behind.
JS_RAW_TEX = r"""
() => {
  const SKIP = new Set(['SCRIPT', 'STYLE', 'PRE', 'CODE', 'TEXTAREA', 'NOSCRIPT', 'KBD', 'SAMP',
                        'MJX-CONTAINER', 'MJX-ASSISTIVE-MML']);
  const skipped = (node) => {
    for (let el = node.parentElement; el; el = el.parentElement) {
      if (SKIP.has(el.tagName)) return true;
      if (el.classList && (el.classList.contains('highlight') || el.classList.contains('output')
          && el.classList.contains('stream'))) return true;
    }
    return false;
  };
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [];
  const pats = [/\\\(/, /\\\[/, /\$\$/, /\$\\[A-Za-z]+[^$\n]*\$/];
  let n;
  while ((n = walker.nextNode())) {
    const s = n.nodeValue;
    if (!s || !/[\\$]/.test(s) || skipped(n)) continue;
    for (const p of pats) {
      const m = p.exec(s);
      if (m) {
        const i = Math.max(0, m.index - 20);
        found.push(s.slice(i, m.index + 40).replace(/\s+/g, ' ').trim());
        break;
      }
    }
    if (found.length >= 5) break;
  }
  return found;
}
"""

JS_IMAGES = r"""
async (timeoutMs) => {
  const imgs = Array.from(document.images);
  for (const img of imgs) { if (img.loading === 'lazy') img.loading = 'eager'; }
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => {
    img.addEventListener('load', r, {once: true});
    img.addEventListener('error', r, {once: true});
    setTimeout(r, timeoutMs);
  })));
  const res = [];
  for (const img of imgs) {
    let ok = img.complete && img.naturalWidth > 0;
    if (!ok && img.complete && /\.svg(\?|#|$)/i.test(img.currentSrc || img.src)) {
      try { await img.decode(); ok = true; } catch (e) {}   // SVG without intrinsic size
    }
    res.push({src: img.getAttribute('src') || '', url: img.currentSrc || img.src, ok,
              complete: img.complete, w: img.naturalWidth});
  }
  return res;
}
"""

JS_LINKS = r"""
() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass


def start_server(site: Path):
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, name="site-server", daemon=True)
    t.start()
    return httpd


class PageRecorder:
    """Records failed and external requests and JS errors of one page. Pages are checked one at
    a time; the context's route handler (which blocks non-local requests) reports to ACTIVE[0]."""

    ACTIVE: list["PageRecorder"] = []

    def __init__(self, base: str):
        self.base = base
        self.failed: list[str] = []
        self.external: list[str] = []
        self.js_errors: list[str] = []
        self.known_js_errors: list[str] = []
        self.n_requests = 0

    def attach(self, page):
        PageRecorder.ACTIVE[:] = [self]
        page.on("request", self._on_request)
        page.on("requestfailed", self._on_failed)
        page.on("response", self._on_response)
        page.on("pageerror", self._on_pageerror)

    def _on_pageerror(self, err):
        msg = (str(err).splitlines() or ["?"])[0][:200]
        (self.known_js_errors if msg in KNOWN_JS_ERRORS else self.js_errors).append(msg)

    def _on_request(self, req):
        self.n_requests += 1

    def _on_failed(self, req):
        if not is_local(req.url):
            return  # blocked by us, recorded as external
        label = short(req.url, self.base)
        if not any(f.startswith(label + " (HTTP") for f in self.failed):
            self.failed.append(f"{label} ({req.failure})")

    def _on_response(self, resp):
        if resp.status >= 400 and is_local(resp.url):
            if urlsplit(resp.url).path == "/favicon.ico":
                return  # requested by the browser itself, not by the page
            self.failed.append(f"{short(resp.url, self.base)} (HTTP {resp.status})")


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "javascript"):
        return True
    return (parts.hostname or "") in LOCAL_HOSTS


def short(url: str, base: str) -> str:
    return url[len(base):] if url.startswith(base) else url


def check_links(site: Path, base: str, hrefs: list[str]) -> list[str]:
    """Links to files of this site that do not exist."""
    bad = []
    for href in sorted(set(hrefs)):
        if not href.startswith(base):
            continue
        path = unquote(urlsplit(href).path).lstrip("/")
        if path == "" or path.endswith("/"):
            path += "index.html"
        if not (site / path).exists():
            bad.append(short(href, base).split("#")[0])
    return sorted(set(bad))


def check_page(ctx, site: Path, base: str, rel: str, timeout_s: float, must_have_math: str | None,
               redirect: bool, notes: dict[str, set[str]]) -> tuple[list[str], str]:
    """Load one page and return (reasons for failure, short description)."""
    reasons: list[str] = []
    page = ctx.new_page()
    rec = PageRecorder(base)
    rec.attach(page)
    t0 = time.monotonic()
    try:
        try:
            resp = page.goto(base + rel, wait_until="load", timeout=timeout_s * 1000)
        except Exception as e:  # noqa: BLE001 - report any browser error as a failure
            return [f"page did not load within {timeout_s:.0f} s: {str(e).splitlines()[0]}"], ""
        if resp is None or resp.status >= 400:
            return [f"page answered HTTP {resp.status if resp else '?'}"], ""
        if redirect:
            try:
                page.wait_for_url(lambda u: not u.endswith("/" + rel) and u != base, timeout=timeout_s * 1000)
                page.wait_for_load_state("load", timeout=timeout_s * 1000)
            except Exception:  # noqa: BLE001
                return [f"redirect page did not redirect within {timeout_s:.0f} s"], ""
        desc_bits = []
        if redirect:
            desc_bits.append(f"redirects to {short(page.url, base)}")
        # (a) math
        math = page.evaluate(JS_MATH, int(timeout_s * 1000))
        has_math = math["mathElements"] > 0
        if math["mathjax"] not in ("done", "absent"):
            reasons.append(f"MathJax did not finish typesetting: {math['mathjax']}")
        if has_math and math["mathjax"] == "absent":
            if math["mathjaxScripts"]:
                reasons.append(f"{math['mathElements']} math elements but MathJax did not load "
                               f"from {', '.join(short(u, base) for u in math['mathjaxScripts'])}")
            else:
                reasons.append(f"{math['mathElements']} math elements but no MathJax script on the "
                               f"page (is sphinx-mathjax-offline in _config.yml?)")
        if math["untypeset"]:
            reasons.append(f"{len(math['untypeset'])} of {math['mathElements']} math elements not typeset, "
                           f"e.g. {math['untypeset'][0]}")
        if math["errors"]:
            reasons.append(f"MathJax TeX errors: {'; '.join(math['errors'][:3])}")
        if must_have_math and math["containers"] == 0:
            reasons.append(f"expected typeset math ({must_have_math}) but the page has none")
        for src in math["mathjaxScripts"]:
            if not is_local(src):
                reasons.append(f"MathJax loaded from a remote host: {src}")
        raw = page.evaluate(JS_RAW_TEX)
        if raw:
            reasons.append(f"raw TeX visible in the text: {' | '.join(raw[:3])}")
        if math["containers"]:
            desc_bits.append(f"math {math['containers']} typeset (MathJax {math['version']})")
        # (b) images
        imgs = page.evaluate(JS_IMAGES, int(timeout_s * 1000))
        broken = [i for i in imgs if not i["ok"]]
        for i in broken[:5]:
            reasons.append(f"image not loaded: {i['src'] or '(no src)'}")
        if len(broken) > 5:
            reasons.append(f"... and {len(broken) - 5} more broken images")
        if imgs:
            desc_bits.append(f"{len(imgs)} images")
        # (e) links to files of the site
        for href in check_links(site, base, page.evaluate(JS_LINKS))[:5]:
            reasons.append(f"link to a missing file: {href}")
        # let late requests (fonts, lazy scripts) settle before judging requests
        try:
            page.wait_for_load_state("networkidle", timeout=5000)
        except Exception:  # noqa: BLE001 - best effort only
            pass
        # (c) failed requests, (d) external requests, (f) JS errors
        for f in sorted(set(rec.failed))[:5]:
            reasons.append(f"request failed: {f}")
        for u in sorted(set(rec.external))[:5]:
            reasons.append(f"request to a non-local host (blocked): {u}")
        for e in rec.js_errors[:3]:
            reasons.append(f"uncaught JavaScript error: {e}")
        desc_bits.append(f"{rec.n_requests} requests")
        desc_bits.append(f"{time.monotonic() - t0:.1f} s")
        return reasons, ", ".join(desc_bits)
    finally:
        for e in rec.known_js_errors:
            notes.setdefault(e, set()).add(rel)
        page.close()


def check_search(ctx, site: Path, base: str, query: str, timeout_s: float,
                 notes: dict[str, set[str]]) -> tuple[list[str], str]:
    page = ctx.new_page()
    rec = PageRecorder(base)
    rec.attach(page)
    url = f"{base}search.html?q={quote(query)}"
    try:
        page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        # Sphinx fills the list item by item, then writes "Search finished, found N page(s)" or
        # "Your search did not match any documents" into the summary. Stop early if a request or
        # a script failed (e.g. a missing searchindex.js: the page would wait forever).
        deadline = time.monotonic() + timeout_s
        summary = ""
        while time.monotonic() < deadline and not rec.failed and not rec.js_errors:
            summary = page.evaluate(
                "() => (document.querySelector('#search-results .search-summary') || {}).textContent || ''")
            if summary.strip():
                break
            page.wait_for_timeout(250)
        if not summary.strip():
            why = [f"request failed: {f}" for f in sorted(set(rec.failed))[:5]]
            why += [f"uncaught JavaScript error: {e}" for e in rec.js_errors[:3]]
            waited = "" if why else f" within {timeout_s:.0f} s"
            return [f"the search for {query!r} did not finish{waited}"] + why, ""
        res = page.evaluate(
            """() => ({
              items: Array.from(document.querySelectorAll('#search-results ul.search li a'))
                          .map(a => [a.textContent.trim(), a.href]),
              summary: (document.querySelector('#search-results .search-summary') || {}).textContent || ''
            })"""
        )
        reasons = []
        if not res["items"]:
            reasons.append(f"search for {query!r} found nothing: {res['summary'].strip()!r}")
        bad = check_links(site, base, [h for _, h in res["items"]])
        for b in bad[:5]:
            reasons.append(f"search result points to a missing file: {b}")
        for f in sorted(set(rec.failed))[:5]:
            reasons.append(f"request failed: {f}")
        for u in sorted(set(rec.external))[:5]:
            reasons.append(f"request to a non-local host (blocked): {u}")
        for e in rec.js_errors[:3]:
            reasons.append(f"uncaught JavaScript error: {e}")
        titles = ", ".join(t for t, _ in res["items"][:3])
        return reasons, f"{len(res['items'])} results for {query!r}: {titles}"
    except Exception as e:  # noqa: BLE001
        return [f"search page failed: {str(e).splitlines()[0]}"], ""
    finally:
        for e in rec.known_js_errors:
            notes.setdefault(e, set()).add(f"search.html?q={query}")
        page.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("site", type=Path, help="the built HTML folder, e.g. _build/html")
    ap.add_argument("--require-math", action="append", default=[], metavar="PAGE",
                    help="page that must contain typeset math, e.g. book/03_vae or book/03_vae.html "
                         "(repeatable)")
    ap.add_argument("--search-query", action="append", default=None, metavar="WORD",
                    help="word to search for on search.html (repeatable; default: scvi)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per page (default 30)")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", CHROMIUM),
                    help=f"Chromium executable (default {CHROMIUM}, or $CHROMIUM)")
    ap.add_argument("--only", action="append", default=[], metavar="PAGE",
                    help="check only these pages (repeatable; for debugging)")
    ap.add_argument("--exercises", type=Path, default=EXERCISES, metavar="DIR",
                    help=f"the instructor notebooks whose hidden tests must not reach the site (default {EXERCISES})")
    args = ap.parse_args(argv)
    site: Path = args.site.resolve()
    queries = args.search_query or ["scvi"]

    if not (site / "index.html").exists() and not any(site.glob("*.html")):
        print(f"ERROR: {site} holds no built site (no .html files); run `make book` first.")
        return 2
    if not Path(args.chromium).exists():
        print(f"ERROR: Chromium not found at {args.chromium}.\n"
              f"Install Debian's Chromium:  apt-get update && apt-get install -y chromium\n"
              f"(or point --chromium / $CHROMIUM at another Chromium binary).")
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("ERROR: the Python package 'playwright' is missing; it is in requirements.txt "
              "(make venv installs it). Its own browser download is not needed.")
        return 2

    pages, problems = discover_pages(site)
    if args.exercises.is_dir():
        hidden = hidden_test_problems(site, args.exercises)
    else:
        hidden = {}
        problems.append(f"--exercises {args.exercises}: no such folder, so the hidden tests were not looked for")
    if args.only:
        want = {p if p.endswith(".html") else p + ".html" for p in args.only}
        pages = [p for p in pages if p in want]
    required = {}
    for p in args.require_math:
        p = p if p.endswith(".html") else p + ".html"
        if not (site / p).exists():
            problems.append(f"--require-math {p}: no such page in the site")
        required[p] = "--require-math"

    httpd = start_server(site)
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    print(f"Checking {len(pages)} pages + search of {site} at {base} with {args.chromium}")
    n_ok = n_fail = 0
    external_all: set[str] = set()
    notes: dict[str, set[str]] = {}
    try:
        with sync_playwright() as pw:
            try:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                             args=CHROMIUM_ARGS, timeout=60_000)
            except Exception as e:  # noqa: BLE001
                print(f"ERROR: could not start Chromium ({args.chromium}): {str(e).splitlines()[0]}")
                return 2
            print(f"Chromium {browser.version}")
            ctx = browser.new_context(service_workers="block")
            ctx.set_default_timeout(args.timeout * 1000)

            def route(r):
                if is_local(r.request.url):
                    r.continue_()
                else:  # offline book: record, never fetch
                    external_all.add(r.request.url)
                    for rec in PageRecorder.ACTIVE:
                        rec.external.append(r.request.url)
                    r.abort("blockedbyclient")

            ctx.route("**/*", route)
            for rel in pages:
                must = required.get(rel)
                if must is None:
                    src = find_source(site, rel)
                    if src is not None:
                        example = source_math(src.read_text(encoding="utf-8", errors="replace"),
                                              Path(src.name[:-4] if src.name.endswith(".txt") else src.name).suffix)
                        if example:
                            must = f"its source has math, e.g. {example}"
                redirect = rel == "index.html" and parse_nav(
                    (site / rel).read_text(encoding="utf-8", errors="replace"))[1] is not None
                reasons, desc = check_page(ctx, site, base, rel, args.timeout, must, redirect, notes)
                reasons = reasons + hidden.get(rel, [])
                if rel.startswith("exercises/") and args.exercises.is_dir() and rel not in hidden:
                    desc += ", no hidden tests"
                if reasons:
                    n_fail += 1
                    print(f"FAIL {rel}")
                    for r in reasons:
                        print(f"     - {r}")
                else:
                    n_ok += 1
                    print(f"OK   {rel}  ({desc})")
            for q in queries:
                reasons, desc = check_search(ctx, site, base, q, args.timeout, notes)
                label = f"search.html?q={q}"
                if reasons:
                    n_fail += 1
                    print(f"FAIL {label}")
                    for r in reasons:
                        print(f"     - {r}")
                else:
                    n_ok += 1
                    print(f"OK   {label}  ({desc})")
            ctx.close()
            browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()

    if problems:
        n_fail += 1
        print("FAIL site structure")
        for p in problems:
            print(f"     - {p}")
    for err, where in notes.items():
        print(f"Note: known harmless JavaScript error on {len(where)} page(s), not counted: {err!r}"
              f" ({KNOWN_JS_ERRORS[err]})")
    if external_all:
        print(f"Blocked {len(external_all)} request(s) to non-local hosts:")
        for u in sorted(external_all)[:20]:
            print(f"     {u}")
    print(f"{n_ok} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
