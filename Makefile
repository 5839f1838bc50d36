# Two commands do everything on a fresh clone: `make book` and `make test`.
# Each creates .venv from requirements.txt when it is missing or older than requirements.txt.
# Nothing needs activating: every command below calls .venv/bin/... directly.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH  := .venv-bench
export PYTHONHASHSEED := 0

.PHONY: help venv test test-unit test-notebooks test-portable models book book-student student check-site lab bench clean

help:
	@echo "make book          build the Jupyter Book (executes every chapter on CPU) into _build/html"
	@echo "make test          unit tests + nbval over every chapter and exercise notebook"
	@echo "make test-portable nbval over the chapters again with PyTorch's portable kernels (other floats, as on another CPU)"
	@echo "make models        train the converged models chapters 5-7 analyse into models/ (about 15 min on 2 cores)"
	@echo "make student       write student versions of the exercises (no solutions) into student/"
	@echo "make book-student  build the book with no solutions into _build/student/_build/html"
	@echo "make check-site    open every built page in headless Chromium and check math, figures, search"
	@echo "make lab           JupyterLab on the repository with the venv's kernel, to work through chapters and exercises"
	@echo "make bench         run the benchmarks against scvi-tools (own venv: .venv-bench)"
	@echo "make clean         remove .venv, _build and caches"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip check
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import mini_scvi, torch; print('mini_scvi', mini_scvi.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)

test: test-unit test-notebooks

test-unit: $(STAMP)
	$(PY) -m pytest tests -q

test-notebooks: $(STAMP)
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider book/*.ipynb exercises/*.ipynb

# PyTorch's portable (non-SIMD) kernels give other last bits on this machine, as another CPU would:
# every checked output and assertion of the chapters must hold under them too (CI runs both).
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q --nbval-lax -p no:cacheprovider book/*.ipynb

models: $(STAMP)
	$(PY) models/make_models.py

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "Open _build/html/index.html"

student: $(STAMP)
	$(PY) exercises/make_student.py exercises student

book-student: $(STAMP)
	$(PY) exercises/make_student.py --book _build/student_src
	$(VENV)/bin/jupyter-book build _build/student_src --path-output _build/student --warningiserror --keep-going

check-site: $(STAMP)
	$(PY) tests/site/check_site.py _build/html

# JupyterLab on the repository root (no browser: open the URL it prints). The chapters and exercises
# ask for the kernel "python3", which in the venv's lab is the venv's own Python; the same
# interpreter is also installed as "mini_scvi (.venv)" (rewritten each time, so idempotent).
# As root (a container) it passes --allow-root. Extra options: make lab LAB_ARGS="--port 8899".
lab: $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name mini_scvi --display-name "mini_scvi (.venv)"
	$(VENV)/bin/jupyter lab --no-browser --ServerApp.root_dir="$(CURDIR)" $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

$(BENCH)/.installed: benchmarks/requirements.txt
	test -x $(BENCH)/bin/python || python3 -m venv $(BENCH)
	$(BENCH)/bin/pip install -q --disable-pip-version-check -r benchmarks/requirements.txt 2>&1 | grep -v "is ignored" || true
	$(BENCH)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	touch $@

bench: $(STAMP) $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/scvi_vs_scvi_tools.py
	$(BENCH)/bin/python benchmarks/autozi_simulation.py
	$(BENCH)/bin/python benchmarks/autozi_simulation.py --overdispersion lognormal --out benchmarks/results/autozi_simulation_lognormal
	$(PY) benchmarks/scale.py

clean:
	rm -rf _build $(VENV) $(BENCH) student .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
