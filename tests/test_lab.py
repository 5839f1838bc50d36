"""`make lab` works: JupyterLab from the venv opens a chapter and runs its cells on the venv's Python.

Starts the venv's JupyterLab headless on a free loopback port with a random token, a temporary
root folder (a copy of chapter 1 with one cell put in front, so the committed notebook is never
touched) and temporary Jupyter config, data, runtime and settings folders. Headless Chromium
(Debian's /usr/bin/chromium, driven by playwright, as tests/site/check_site.py does) opens the
notebook, runs that cell through the kernel the chapter's metadata names ("python3") and reads
its output off the page: 6*7, mini_scvi's version and the kernel's sys.prefix, which must be the
venv's. Every wait is bounded; server, kernel and browser are stopped in a finally. Skipped only
when Chromium is missing (.ci/run installs it before `make test`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mini_scvi

REPO = Path(__file__).resolve().parents[1]
CHAPTER = REPO / "book" / "01_counts.ipynb"
sys.path.insert(0, str(REPO / "tests" / "site"))
from check_site import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (one set of browser flags for both tests)

MARK = "MINI_SCVI_LAB_CHECK"
CELL = f"import sys, mini_scvi\nprint('{MARK}', 6 * 7, mini_scvi.__version__, sys.prefix)"
SERVER_START_S = 45  # bounded waits, seconds
CELL_OUTPUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


def test_make_lab_target():
    """The Makefile's lab target installs the kernel spec into the venv and starts the venv's lab."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    out = subprocess.run(["make", "-n", "lab"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "-m ipykernel install --sys-prefix --name mini_scvi" in out.stdout
    lab = [line for line in out.stdout.splitlines() if "/bin/jupyter lab" in line]
    assert lab and "--no-browser" in lab[-1], out.stdout


def test_lab_runs_a_chapter_cell_on_the_venv_python():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    passed = False
    tmp = Path(tempfile.mkdtemp(prefix="mini_scvi_lab_"))
    root = tmp / "root"
    root.mkdir()
    nb = json.loads(CHAPTER.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"  # the kernel the lab must give the venv's Python
    nb["cells"].insert(0, {"cell_type": "code", "execution_count": None, "id": "lab-check",
                           "metadata": {}, "outputs": [], "source": CELL})
    (root / CHAPTER.name).write_text(json.dumps(nb), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON", "PYTHONPATH"))}
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")]:
        (tmp / sub).mkdir()
        env[var] = str(tmp / sub)
    env["OMP_NUM_THREADS"] = "1"
    token = secrets.token_hex(24)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def server_log() -> str:
        log.flush()
        return (tmp / "server.log").read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"JupyterLab exited with {server.returncode}:\n{server_log()}"
            try:
                _api(base, token, "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"JupyterLab not up after {SERVER_START_S} s:\n{server_log()}"
                time.sleep(0.5)
        t_server = time.monotonic() - t0

        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_ARGS, timeout=30_000, service_workers="block")
            try:
                ctx.set_default_timeout(30_000)
                # offline: anything that is not this server is blocked
                ctx.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base)
                          else r.abort("blockedbyclient"))
                page = ctx.new_page()
                page.goto(f"{base}/lab/tree/{CHAPTER.name}?reset&token={token}", wait_until="domcontentloaded")
                first = page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell").first
                editor = first.locator(".jp-InputArea-editor .cm-content", has_text=MARK)
                editor.wait_for(state="visible")  # the first cell is the one this test put there
                # the kernel ("python3", from the chapter's metadata) is connected and idle
                page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(
                    state="visible", timeout=SERVER_START_S * 1000)
                editor.click()
                page.keyboard.press("Shift+Enter")
                out = first.locator(".jp-OutputArea-output", has_text=MARK)
                try:
                    out.wait_for(state="visible", timeout=CELL_OUTPUT_S * 1000)
                except Exception:
                    page.screenshot(path=str(tmp / "lab.png"))
                    raise AssertionError(f"no output from the cell after {CELL_OUTPUT_S} s "
                                         f"(screenshot {tmp / 'lab.png'}):\n{server_log()}")
                text = out.inner_text().split()
                kernel_name = page.locator(".jp-NotebookPanel .jp-KernelName").first.inner_text()
            finally:
                ctx.close()

        i = text.index(MARK)
        assert text[i + 1:i + 3] == ["42", mini_scvi.__version__], text
        assert Path(text[i + 3]).resolve() == Path(sys.prefix).resolve(), (
            f"the kernel runs {text[i + 3]}, not this venv ({sys.prefix})")
        sessions = _api(base, token, "/api/sessions")
        assert [s["kernel"]["name"] for s in sessions if s["path"] == CHAPTER.name] == ["python3"], sessions
        assert "Python 3" in kernel_name, kernel_name
        assert time.monotonic() - t0 < 90, f"took {time.monotonic() - t0:.0f} s (server up in {t_server:.0f} s)"
        passed = True
    finally:
        try:  # stop the kernels through the server, then the server
            if server.poll() is None:
                for k in _api(base, token, "/api/kernels") or []:
                    _api(base, token, f"/api/kernels/{k['id']}", method="DELETE")
        except Exception:  # noqa: BLE001  (cleanup must go on)
            pass
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        log.close()
        if passed:  # a failure leaves the server log and screenshot in tmp
            shutil.rmtree(tmp, ignore_errors=True)
