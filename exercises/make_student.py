"""Student versions of the exercise notebooks, a book without solutions, and grading.

The instructor notebooks (exercises/exNN_*.ipynb) use nbgrader's markers:

* ``### BEGIN SOLUTION`` / ``### END SOLUTION`` inside a code cell: the student version keeps the
  lines around the region (the function signature and docstring) and replaces the region by
  ``raise NotImplementedError()`` at the region's indentation. A region that only sets ``answer``
  (a multiple-choice question) becomes ``answer = None  # your answer``.
* ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``: removed. Hidden tests sit in cells of their
  own (nbgrader autograder-test cells, right after the visible check cell, tagged ``remove-cell``
  so that the book does not render them); a cell left empty by the removal is dropped.

Outputs and execution counts are cleared, the ``hide-input`` tag (which folds solutions in the
book) is dropped from solution cells, and ``# NBVAL_CHECK_OUTPUT`` lines are removed.

Usage (from the repository root)::

    python exercises/make_student.py exercises student        # student notebooks + checks/
    python exercises/make_student.py --book _build/student_src  # book sources without solutions
    python exercises/make_student.py --grade SUBMITTED.ipynb exercises/ex04_count_likelihoods.ipynb

``--grade`` copies the student's solution cells (matched by their nbgrader ``grade_id``) into the
instructor notebook, which still holds the hidden tests, executes it and reports each check cell.
It runs the student's code: do it in a sandbox (a container or a throwaway account).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]  # the repository
EXERCISES = Path(__file__).resolve().parent

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
MARKERS = (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN)
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
ANSWER_STUB = "answer = None  # your answer"
TEXT_STUB = "YOUR ANSWER HERE"
NBVAL_MARK = "# NBVAL_CHECK_OUTPUT"
FOLD_TAGS = {"hide-input", "hide-cell", "remove-input", "remove-cell"}  # tags that hide solutions in the book
FILES_FOR_STUDENTS = ["checks"]  # what the notebooks import from their own folder (a package)
BOOK_MARKER = ".made_by_make_student"  # --book refuses to overwrite a folder that lacks it

_ANSWER_LINE = re.compile(r"^\s*answer\s*=")


class MarkerError(ValueError):
    """Unbalanced or nested markers in a cell."""


# --------------------------------------------------------------------------- one cell


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _is_answer_region(region: list[str]) -> bool:
    code = [ln for ln in region if ln.strip() and not ln.strip().startswith("#")]
    return bool(code) and all(_ANSWER_LINE.match(ln) for ln in code)


def strip_source(source: str, cell_type: str, where: str = "") -> tuple[str, int, int]:
    """Return (student source, number of solution regions, number of hidden-test regions)."""
    out: list[str] = []
    n_solution = n_hidden = 0
    state = None  # None, "solution" or "hidden"
    region: list[str] = []
    indent = ""
    for line in source.splitlines():
        mark = line.strip()
        if mark.startswith(BEGIN_SOLUTION) or mark.startswith(BEGIN_HIDDEN):
            if state is not None:
                raise MarkerError(f"{where}: {mark!r} inside an open {state} region")
            state = "solution" if mark.startswith(BEGIN_SOLUTION) else "hidden"
            indent, region = _indent(line), []
        elif mark.startswith(END_SOLUTION) or mark.startswith(END_HIDDEN):
            expected = END_SOLUTION if state == "solution" else END_HIDDEN
            if state is None or not mark.startswith(expected):
                raise MarkerError(f"{where}: {mark!r} without a matching BEGIN")
            if state == "solution":
                n_solution += 1
                if cell_type != "code":
                    out.append(indent + TEXT_STUB)
                elif _is_answer_region(region):
                    out.append(indent + ANSWER_STUB)
                else:
                    out.extend(indent + stub for stub in CODE_STUB)
            else:
                n_hidden += 1
            state = None
        elif state is None:
            if mark != NBVAL_MARK:
                out.append(line)
        else:
            region.append(line)
    if state is not None:
        raise MarkerError(f"{where}: {state} region not closed")
    while out and not out[-1].strip():  # hidden tests usually end a cell: drop the blank lines left
        out.pop()
    return "\n".join(out), n_solution, n_hidden


def is_hidden_test_cell(cell) -> bool:
    """A cell that holds nothing but hidden tests (it is dropped from student versions)."""
    if BEGIN_HIDDEN not in cell.source:
        return False
    source, n_solution, n_hidden = strip_source(cell.source, cell.cell_type)
    return n_hidden > 0 and n_solution == 0 and not source.strip()


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """A student copy of an instructor notebook: no solutions, no hidden tests, no outputs."""
    nb = copy.deepcopy(nb)
    nb.cells = [cell for cell in nb.cells if not is_hidden_test_cell(cell)]
    for i, cell in enumerate(nb.cells):
        source, n_solution, _ = strip_source(cell.source, cell.cell_type, f"{name}, cell {i}")
        cell.source = source
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        if n_solution:
            tags = [t for t in cell.metadata.get("tags", []) if t not in FOLD_TAGS]
            if tags:
                cell.metadata["tags"] = tags
            else:
                cell.metadata.pop("tags", None)
        leftover = [m for m in MARKERS if m in cell.source]
        if leftover:  # e.g. a marker in the middle of a line, which the line-based pass does not see
            raise MarkerError(f"{name}, cell {i}: marker {leftover[0]!r} left after stripping")
    return nb


def make_student_dir(src: Path, out: Path) -> list[Path]:
    """Write the student version of every exercise notebook of ``src`` (and the checks package) into ``out``."""
    src, out = Path(src), Path(out)
    notebooks = sorted(src.glob("ex*.ipynb"))
    if not notebooks:
        raise SystemExit(f"no exercise notebooks (ex*.ipynb) in {src}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        student = student_notebook(nb, path.name)
        nbformat.validate(student)
        target = out / path.name
        nbformat.write(student, target)
        written.append(target)
    for name in FILES_FOR_STUDENTS:
        if (src / name).is_dir():
            if (out / name).exists():
                shutil.rmtree(out / name)
            shutil.copytree(src / name, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            written.append(out / name)
        elif (src / name).exists():
            shutil.copy2(src / name, out / name)
            written.append(out / name)
    return written


# --------------------------------------------------------------------------- --book


_NOT_LINKED = {"_build", "student", "exercises", "book", "_config.yml", "_toc.yml", "tests", "benchmarks"}


def make_book_sources(out: Path, root: Path = ROOT) -> Path:
    """Write the book's sources with student exercises into ``out``, ready for ``jupyter-book build out``.

    * ``_config.yml``: the repository's, with ``hide_solutions: True`` and the exercise notebooks
      excluded from execution (they are shipped unexecuted); chapters are executed as usual and share
      the main build's execution cache (``_build/.jupyter_cache``), so a built book makes this fast;
    * ``_toc.yml`` and ``book/``: copied;
    * ``exercises/``: the student notebooks and the checks package;
    * everything else at the top level (``mini_scvi/`` for literalinclude, ``data/``, ...): symlinked.
    """
    import yaml

    out, root = Path(out).resolve(), Path(root).resolve()
    if out == root or root.is_relative_to(out):
        raise SystemExit(f"refusing to write the book sources into {out}: it contains the repository")
    if out.exists():
        if not (out / BOOK_MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by make_student.py --book; remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / BOOK_MARKER).write_text("written by exercises/make_student.py --book; safe to delete\n")

    config = yaml.safe_load((root / "_config.yml").read_text())
    config.setdefault("sphinx", {}).setdefault("config", {})["hide_solutions"] = True
    execute = config.setdefault("execute", {})
    patterns = list(execute.get("exclude_patterns") or [])
    execute["exclude_patterns"] = patterns + [p for p in ["exercises/*"] if p not in patterns]
    if not execute.get("cache"):
        execute["cache"] = str(root / "_build" / ".jupyter_cache")
    header = "# Written by exercises/make_student.py --book from the repository's _config.yml: do not edit.\n"
    (out / "_config.yml").write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    shutil.copy2(root / "_toc.yml", out / "_toc.yml")
    shutil.copytree(root / "book", out / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    make_student_dir(root / "exercises", out / "exercises")

    top_of_out = out.relative_to(root).parts[0] if out.is_relative_to(root) else None
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(".") or name in _NOT_LINKED or name.endswith(".egg-info") or name == top_of_out:
            continue
        try:
            os.symlink(entry, out / name, target_is_directory=entry.is_dir())
        except OSError:  # no symlinks (some Windows setups): copy instead
            if entry.is_dir():
                shutil.copytree(entry, out / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(entry, out / name)
    return out


# --------------------------------------------------------------------------- --grade


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def grade(submitted: Path, instructor: Path, out: Path | None = None, timeout: int = 600) -> list[dict]:
    """Run the student's answers against the instructor notebook (hidden tests included).

    Returns one record per check cell: grade_id, points, passed, error. Writes the executed notebook
    to ``out`` (default: ``<submitted>.graded.ipynb`` next to the submission).
    """
    from nbclient import NotebookClient

    submitted, instructor = Path(submitted), Path(instructor)
    student_nb = nbformat.read(submitted, as_version=4)
    nb = nbformat.read(instructor, as_version=4)
    answers = {
        _nbgrader(c)["grade_id"]: c.source
        for c in student_nb.cells
        if _nbgrader(c).get("solution") and "grade_id" in _nbgrader(c)
    }
    missing = []
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if meta.get("solution"):
            if meta.get("grade_id") in answers:
                cell.source = answers[meta["grade_id"]]
            else:  # the student deleted the cell: grade it as not done
                missing.append(meta.get("grade_id"))
                cell.source, _, _ = strip_source(cell.source, cell.cell_type, instructor.name)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(instructor.resolve().parent)}},
    )
    client.execute()
    out = Path(out) if out else submitted.with_suffix(".graded.ipynb")
    nbformat.write(nb, out)

    results = []
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if not meta.get("grade") or cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        error = ""
        if errors:
            first_line = (errors[0]["evalue"] or "").splitlines()[:1]
            error = f"{errors[0]['ename']}: {''.join(first_line)}"
        results.append({"grade_id": meta.get("grade_id", "?"), "points": meta.get("points", 0),
                        "passed": not errors, "error": error})
    for gid in missing:
        print(f"warning: no cell with grade_id {gid!r} in {submitted.name}; graded as not done", file=sys.stderr)
    return results


def _print_report(results: list[dict], out_name: str) -> None:
    width = max([len(r["grade_id"]) for r in results] + [8])
    for r in results:
        status = "PASS" if r["passed"] else "FAIL"
        score = f"{r['points'] if r['passed'] else 0}/{r['points']}"
        print(f"{r['grade_id']:<{width}}  {status}  {score}  {r['error']}".rstrip())
    got = sum(r["points"] for r in results if r["passed"])
    total = sum(r["points"] for r in results)
    print(f"{'total':<{width}}  {got}/{total} points; executed notebook: {out_name}")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", help="folder with the instructor notebooks (e.g. exercises)")
    parser.add_argument("out", nargs="?", help="folder for the student notebooks (e.g. student)")
    parser.add_argument("--book", metavar="OUT", help="write book sources without solutions into OUT")
    parser.add_argument("--grade", nargs=2, metavar=("SUBMITTED_NB", "INSTRUCTOR_NB"),
                        help="grade a student's notebook with the instructor notebook's hidden tests")
    parser.add_argument("--output", help="with --grade: where to write the executed notebook")
    parser.add_argument("--timeout", type=int, default=600, help="with --grade: seconds per cell")
    args = parser.parse_args(argv)

    if args.grade:
        results = grade(Path(args.grade[0]), Path(args.grade[1]), args.output and Path(args.output), args.timeout)
        out_name = args.output or str(Path(args.grade[0]).with_suffix(".graded.ipynb"))
        _print_report(results, out_name)
        return 0 if all(r["passed"] for r in results) else 1
    if args.book:
        out = make_book_sources(Path(args.book))
        print(f"book sources without solutions in {out}; build with: jupyter-book build {args.book}")
        return 0
    if not (args.src and args.out):
        parser.error("give SRC_DIR and OUT_DIR, or --book OUT, or --grade SUBMITTED_NB INSTRUCTOR_NB")
    written = make_student_dir(Path(args.src), Path(args.out))
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
