"""The wheel works without the repository: it ships the bundled data as mini_scvi/_data/.

Builds the wheel offline from a copy of the sources (so no build/ folder lands in the working
tree), checks what it holds, installs it with ``pip --target`` into a temporary folder and loads
pbmc3k from a Python that cannot see the repository: run with ``-I`` from a folder outside it, the
repository's editable-install finder removed, the temporary folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = ("pbmc3k.h5ad", "pbmc3k_hvg_genes.txt")


def _pip(*args: str, timeout: float = 120) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env, timeout=timeout,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    shutil.copytree(REPO / "mini_scvi", src / "mini_scvi", ignore=ignore)
    shutil.copytree(REPO / "data", src / "data", ignore=ignore)
    # offline: the build backend is the venv's setuptools (no isolation), nothing from an index
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src))
    (whl,) = (tmp / "dist").glob("mini_scvi-*.whl")
    return whl


def test_wheel_holds_package_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in DATA_FILES:
        assert f"mini_scvi/_data/{f}" in names, f"{f} is not shipped as mini_scvi/_data/{f}"
    with zipfile.ZipFile(wheel) as z:
        for f in DATA_FILES:
            assert z.getinfo(f"mini_scvi/_data/{f}").file_size == (REPO / "data" / f).stat().st_size
    # every module of the package (a sub-package missing from pyproject's list would fail here)
    for py in (REPO / "mini_scvi").rglob("*.py"):
        rel = py.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is not in the wheel: add its package to [tool.setuptools] packages"
    # nothing else: no top-level data/, no data/README.md, no tests or notebooks
    stray = sorted(n for n in names if not (n.startswith("mini_scvi/") or n.startswith("mini_scvi-")))
    assert not stray, f"unexpected files in the wheel: {stray}"
    assert not [n for n in names if n.startswith("mini_scvi/_data/") and n.split("/")[-1] not in DATA_FILES]

    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    by_name = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower(): r for r in requires}
    for dep in ("torch", "numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "scikit-misc", "tqdm"):
        assert dep in by_name, f"{dep} is not a dependency of the wheel"
        assert ">=" in by_name[dep], f"{by_name[dep]}: give it a lower bound"


def test_installed_wheel_loads_data_outside_repo(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))
    assert (site / "mini_scvi" / "_data" / "pbmc3k.h5ad").is_file()
    work = tmp_path / "work"  # the current folder: outside the repository
    work.mkdir()
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        site, repo = Path({str(site)!r}), Path({str(REPO)!r})
        # -I ignores PYTHONPATH and the current folder; the venv's site-packages still installs
        # the repository's editable finder, so take it out and put the installed copy first
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
        sys.path[:] = [str(site)] + [p for p in sys.path if p and Path(p).resolve() != repo]
        import mini_scvi
        from mini_scvi import data
        a = data.pbmc3k()
        h = data.pbmc3k_hvg()
        print(json.dumps({{
            "file": mini_scvi.__file__,
            "counts": str(data._bundled("pbmc3k.h5ad")),
            "genes": str(data._bundled(data.HVG_GENES_FILE)),
            "pbmc3k": list(a.shape),
            "hvg": list(h.shape),
            "repo_modules": sorted(m for m, mod in sys.modules.items()  # the venv lives in the repo: look at mini_scvi/
                                   if Path(getattr(mod, "__file__", None) or "/").resolve().is_relative_to(repo / "mini_scvi")),
        }}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MINI_SCVI"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=work, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pkg = site / "mini_scvi"
    assert Path(out["file"]).resolve().is_relative_to(site.resolve()), out["file"]
    assert Path(out["counts"]).resolve() == (pkg / "_data" / "pbmc3k.h5ad").resolve()
    assert Path(out["genes"]).resolve() == (pkg / "_data" / "pbmc3k_hvg_genes.txt").resolve()
    assert out["repo_modules"] == [], f"modules imported from the repository: {out['repo_modules']}"
    assert out["pbmc3k"] == [2700, 32738]
    assert out["hvg"] == [2638, 1200]
