"""Unit tests for the browser-free parts of tests/site/check_site.py (page discovery, finding math
in a page's source, link checks). The browser check itself runs with `make check-site`."""
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).parent / "site" / "check_site.py"
_spec = importlib.util.spec_from_file_location("check_site", _PATH)
cs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cs)

NAV_PAGE = """<html><head><title>x</title></head><body>
<nav class="bd-links bd-docs-nav" aria-label="Main"><div><ul>
<li class="toctree-l1 current active"><a class="reference internal" href="#">Welcome</a></li>
<li class="toctree-l1"><a class="reference internal" href="01_counts.html">1. Counts</a></li>
<li class="toctree-l1"><a class="reference internal" href="../exercises/ex02_autoencoders.html">Ex</a></li>
<li class="toctree-l1"><a class="reference external" href="https://example.org/">out</a></li>
</ul></div></nav>
<nav class="bd-toc"><a class="reference internal" href="#section">not the book toc</a></nav>
</body></html>"""


def make_site(tmp_path: Path, missing: str | None = None) -> Path:
    site = tmp_path / "html"
    files = {
        "index.html": '<meta http-equiv="Refresh" content="0; url=book/intro.html" />',
        "book/intro.html": NAV_PAGE,
        "book/01_counts.html": "<p>counts</p>",
        "exercises/ex02_autoencoders.html": "<p>ex</p>",
        "book/orphan.html": "<p>not in the toc</p>",
        "genindex.html": "",
        "search.html": "",
        "_static/x.html": "",
        "_sources/book/intro.md": "# Welcome",
    }
    for name, text in files.items():
        if name == missing:
            continue
        f = site / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return site


def test_parse_nav_reads_only_the_book_toc_and_the_redirect():
    hrefs, refresh = cs.parse_nav(NAV_PAGE)
    assert hrefs == ["#", "01_counts.html", "../exercises/ex02_autoencoders.html"]
    assert refresh is None
    _, refresh = cs.parse_nav('<meta http-equiv="Refresh" content="0; url=book/intro.html" />')
    assert refresh == "book/intro.html"


@pytest.mark.parametrize(
    "page, href, expected",
    [
        ("book/intro.html", "01_counts.html", "book/01_counts.html"),
        ("book/intro.html", "../exercises/ex.html#sec", "exercises/ex.html"),
        ("book/intro.html", "#top", "book/intro.html"),
        ("book/intro.html", "../", "index.html"),
        ("book/intro.html", "https://example.org/a.html", None),
        ("index.html", "book/a%20b.html", "book/a b.html"),
    ],
)
def test_resolve(page, href, expected):
    assert cs._resolve(page, href) == expected


def test_discover_pages_follows_redirect_and_keeps_toc_order(tmp_path):
    pages, problems = cs.discover_pages(make_site(tmp_path))
    assert problems == []
    # toc order first (root page, then its sidebar), then every other page, never genindex/search/_static
    assert pages[:3] == ["book/intro.html", "book/01_counts.html", "exercises/ex02_autoencoders.html"]
    assert set(pages[3:]) == {"book/orphan.html", "index.html"}


def test_discover_pages_reports_a_toc_link_to_a_missing_page(tmp_path):
    pages, problems = cs.discover_pages(make_site(tmp_path, missing="book/01_counts.html"))
    assert "book/01_counts.html" not in pages
    assert any("01_counts.html" in p and "missing" in p for p in problems)


def test_discover_pages_reports_a_broken_redirect(tmp_path):
    _, problems = cs.discover_pages(make_site(tmp_path, missing="book/intro.html"))
    assert any("redirects" in p for p in problems)


@pytest.mark.parametrize(
    "text, has_math",
    [
        ("A count $x_{ng}$ here.", True),
        ("Display\n\n$$\n\\log p(x)\n$$\n", True),
        ("\\begin{align}\na &= b\n\\end{align}", True),
        ("```{math}\ny = x^2\n```", True),
        ("Inline {math}`y`.", True),
        ("No math at all, just prose.", False),
        ("Code `$HOME` and `\\(` are code.", False),
        ("```python\nlabel = r'$\\alpha$'\n```\nprose", False),
        ("One dollar sign: $5.", False),
        ("Escaped \\$5 and \\$10.", False),
    ],
)
def test_source_math_in_markdown(text, has_math):
    assert (cs.source_math(text, ".md") is not None) == has_math


def test_source_math_reads_only_markdown_cells_of_a_notebook():
    nb = {
        "cells": [
            {"cell_type": "code", "source": ["x = '$a$'\n"], "metadata": {}, "outputs": []},
            {"cell_type": "markdown", "source": ["# Title\n", "no math\n"], "metadata": {}},
        ],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }
    assert cs.source_math(json.dumps(nb), ".ipynb") is None
    nb["cells"][1]["source"].append("but $\\mu$ here")
    assert cs.source_math(json.dumps(nb), ".ipynb") == "$\\mu$"
    assert cs.source_math("not json", ".ipynb") is None


def test_find_source(tmp_path):
    site = make_site(tmp_path)
    (site / "_sources/book/01_counts.ipynb").write_text("{}")
    (site / "_sources/book/glossary.md.txt").write_text("# G")
    assert cs.find_source(site, "book/01_counts.html").name == "01_counts.ipynb"
    assert cs.find_source(site, "book/intro.html").name == "intro.md"
    (site / "book/glossary.html").write_text("")
    assert cs.find_source(site, "book/glossary.html").name == "glossary.md.txt"
    assert cs.find_source(site, "book/orphan.html") is None


def test_check_links_and_is_local(tmp_path):
    site = make_site(tmp_path)
    base = "http://127.0.0.1:8000/"
    links = [base + "book/01_counts.html#sec", base + "book/nope.html", base, "https://example.org/"]
    assert cs.check_links(site, base, links) == ["book/nope.html"]
    assert cs.is_local(base + "x.js") and cs.is_local("data:image/png;base64,AA")
    assert not cs.is_local("https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js")


# --------------------------------------------------------------------------- hidden tests of the exercises

def _notebook(*sources: str) -> str:
    cells = [{"cell_type": "code", "source": s.splitlines(keepends=True), "metadata": {}, "outputs": [],
              "execution_count": 1} for s in sources]
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


CHECK = "from scipy import stats\ncheck_log_nb(log_nb)"
HIDDEN = ("### BEGIN HIDDEN TESTS\nfrom scipy import stats\n\n# dz/dvar = z / (2 var) at mu = 0\n"
          "assert torch.allclose(var.grad, z.detach() / 8)\n)\n### END HIDDEN TESTS")
HIDDEN_LINES = ["# dz/dvar = z / (2 var) at mu = 0", "assert torch.allclose(var.grad, z.detach() / 8)"]
# how Sphinx and Pygments render the check cell: one span per token, entities for < > & "
PAGE = ('<div class="cell_input"><pre><span class="n">check_log_nb</span><span class="p">(</span>'
        '<span class="n">log_nb</span><span class="p">)</span></pre></div>')
LEAKY = PAGE + ('<pre><span class="k">assert</span> <span class="n">torch</span><span class="o">.</span>'
                '<span class="n">allclose</span><span class="p">(</span><span class="n">var</span>'
                '<span class="o">.</span><span class="n">grad</span><span class="p">,</span>  '
                '<span class="n">z</span><span class="o">.</span><span class="n">detach</span>'
                '<span class="p">()</span> <span class="o">/</span> <span class="mi">8</span>'
                '<span class="p">)</span></pre>')


def test_hidden_test_lines_are_the_long_lines_found_only_inside_hidden_regions():
    # the import is shared with the visible check cell and ")" is too short: neither proves a leak
    assert cs.hidden_test_lines(_notebook(CHECK, HIDDEN)) == sorted(HIDDEN_LINES)
    assert cs.hidden_test_lines(_notebook(CHECK)) == []
    assert cs.hidden_test_lines("not json") == []


def test_page_text_joins_highlighted_tokens_and_decodes_entities():
    assert cs.page_text(LEAKY).endswith("assert torch.allclose(var.grad, z.detach() / 8)")
    assert cs.page_text("<p>a &lt; b &amp;&amp;\n  c</p>") == "a < b && c"


def test_hidden_test_leaks_finds_markers_and_hidden_lines():
    assert cs.hidden_test_leaks(cs.page_text(PAGE), HIDDEN_LINES) == []
    assert cs.hidden_test_leaks(cs.page_text(LEAKY), HIDDEN_LINES) == [HIDDEN_LINES[1]]
    assert cs.hidden_test_leaks("x\n### BEGIN HIDDEN TESTS\n# dz/dvar =  z / (2 var) at mu = 0", HIDDEN_LINES) == [
        "### BEGIN HIDDEN TESTS", HIDDEN_LINES[0]]  # whitespace does not hide a leak


def _exercise_site(tmp_path: Path, page: str, source: str | None) -> tuple[Path, Path]:
    site, exercises = tmp_path / "html", tmp_path / "exercises"
    (site / "exercises").mkdir(parents=True)
    exercises.mkdir()
    (exercises / "ex03_vae.ipynb").write_text(_notebook(CHECK, HIDDEN))
    (site / "exercises" / "ex03_vae.html").write_text(page)
    (site / "exercises" / "ex04_other.html").write_text("<p>no notebook of that name: nothing to compare</p>")
    if source is not None:
        (site / "_sources" / "exercises").mkdir(parents=True)
        (site / "_sources" / "exercises" / "ex03_vae.ipynb").write_text(source)
    return site, exercises


def test_hidden_test_problems_passes_a_page_without_hidden_tests(tmp_path):
    site, exercises = _exercise_site(tmp_path, PAGE, source=_notebook(CHECK))
    assert cs.hidden_test_problems(site, exercises) == {}


def test_hidden_test_problems_fails_a_page_that_shows_a_hidden_string(tmp_path):
    site, exercises = _exercise_site(tmp_path, LEAKY, source=None)
    problems = cs.hidden_test_problems(site, exercises)
    assert list(problems) == ["exercises/ex03_vae.html"]
    assert "shown on the page" in problems["exercises/ex03_vae.html"][0]
    assert HIDDEN_LINES[1] in problems["exercises/ex03_vae.html"][0]


def test_hidden_test_problems_fails_a_downloadable_source_with_hidden_tests(tmp_path):
    site, exercises = _exercise_site(tmp_path, PAGE, source=_notebook(CHECK, HIDDEN))
    (reason,) = cs.hidden_test_problems(site, exercises)["exercises/ex03_vae.html"]
    assert "downloadable source _sources/exercises/ex03_vae.ipynb" in reason


def test_hidden_test_lines_of_the_real_exercise_notebooks():
    """Every notebook with hidden tests gives strings to look for; ex03's include the gradient
    comment that the rendered book used to show."""
    notebooks = sorted(cs.EXERCISES.glob("ex*.ipynb"))
    assert notebooks
    for path in notebooks:
        text = path.read_text()
        if cs.HIDDEN_BEGIN in text:
            assert cs.hidden_test_lines(text), path.name
    ex03 = cs.hidden_test_lines((cs.EXERCISES / "ex03_vae.ipynb").read_text())
    assert any("z / (2 var)" in line for line in ex03)
