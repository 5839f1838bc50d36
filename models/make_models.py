"""Train, with the package's own code, every model the chapters analyse, and store it in models/.

    make models                      # all of them: two processes of one thread each, on 2 cores
    .venv/bin/python models/make_models.py pbmc3k_scvi_zinb sim_autozi   # some of them

Each model is trained with scvi-tools' default number of epochs (AutoZI: the tutorial's 200 at
lr 1e-2) on the training cells of a fixed split, written with ``save()`` to ``models/<name>/``,
and described by ``models/<name>/record.json``: the commit, seed, epochs, threads, wall time,
and the ELBO per cell on the held-out cells. ``tests/test_models.py`` loads every stored model
with the current code and recomputes that ELBO, so a change to a module or a likelihood cannot
leave stale models behind. The chapters load these models with ``Model.load(...)`` for every
analysis (chapters 5-7); they train live only briefly, to show the loop.

Why store them: a 400-epoch run costs minutes, and training grows the last-bit differences of
another CPU's kernels into other numbers (``shared/reference/portability.md``). A stored model
is the same weights everywhere; evaluating it is one pass, whose floats differ only in the last bits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import mini_scvi
from mini_scvi.model import AUTOZI, SCVI

MODELS_DIR = Path(__file__).resolve().parent
SEED = 0


# ---------------------------------------------------------------- the data each model is trained on


def pbmc3k() -> ad.AnnData:
    """The course's pbmc3k (2,638 cells x 1,200 genes), with the tutorial's ``str_labels`` column."""
    adata = mini_scvi.data.pbmc3k_hvg()
    adata.obs["str_labels"] = adata.obs["cell_type"].astype(str)
    return adata


def sim_batches() -> ad.AnnData:
    """Chapter 5's simulation: two batches, four cell types (chapter 6 uses it for transform_batch)."""
    adata = mini_scvi.data.simulate_counts(n_cells=3000, n_genes=300, n_cell_types=4, n_batches=2,
                                           batch_effect=0.5, seed=0)
    return _with_split(adata)


def sim_zi() -> ad.AnnData:
    """Chapter 7's simulation: half of 150 genes zero-inflated, most with a mean count above 1."""
    adata = mini_scvi.data.simulate_counts(n_cells=1500, n_genes=150, n_cell_types=2, zi_fraction=0.5,
                                           zi_rate=(0.3, 0.7), mean_log_expr=1.0, seed=0)
    return _with_split(adata)


def _with_split(adata: ad.AnnData) -> ad.AnnData:
    adata.obs["split"] = np.where(mini_scvi.data.held_out(adata.n_obs), "held out", "train")
    return adata


DATA: dict[str, Callable[[], ad.AnnData]] = {"pbmc3k": pbmc3k, "sim_batches": sim_batches, "sim_zi": sim_zi}


# ---------------------------------------------------------------- the models


@dataclass(frozen=True)
class Spec:
    model_cls: type
    data: str
    setup: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    max_epochs: int | None = None  # None: the model's default (scvi-tools': 400 for these sizes)
    plan: dict = field(default_factory=dict)
    chapters: tuple[int, ...] = ()


AUTOZI_PLAN = {"lr": 1e-2}  # the AutoZI paper and tutorial
PBMC = {"layer": "counts"}
SPECS: dict[str, Spec] = {
    "pbmc3k_scvi_zinb": Spec(SCVI, "pbmc3k", PBMC, {}, chapters=(5, 6)),
    "pbmc3k_scvi_nb": Spec(SCVI, "pbmc3k", PBMC, {"gene_likelihood": "nb"}, chapters=(6,)),
    "pbmc3k_scvi_zinb_ll": Spec(SCVI, "pbmc3k", PBMC, {"use_observed_lib_size": False}, chapters=(5, 6)),
    "pbmc3k_scvi_nb_ll": Spec(SCVI, "pbmc3k", PBMC, {"gene_likelihood": "nb", "use_observed_lib_size": False},
                              chapters=(6,)),
    "pbmc3k_autozi_gene": Spec(AUTOZI, "pbmc3k", {**PBMC, "labels_key": "str_labels"}, {},
                               max_epochs=200, plan=AUTOZI_PLAN, chapters=(7,)),
    "pbmc3k_autozi_gene_label": Spec(AUTOZI, "pbmc3k", {**PBMC, "labels_key": "str_labels"},
                                     {"dispersion": "gene-label", "zero_inflation": "gene-label"},
                                     max_epochs=200, plan=AUTOZI_PLAN, chapters=(7,)),
    "sim_scvi_batch": Spec(SCVI, "sim_batches", {"batch_key": "batch"}, {}, chapters=(5, 6)),
    "sim_scvi_nobatch": Spec(SCVI, "sim_batches", {}, {}, chapters=(5,)),
    "sim_autozi": Spec(AUTOZI, "sim_zi", {}, {}, max_epochs=200, plan=AUTOZI_PLAN, chapters=(7,)),
    "sim_autozi_ll": Spec(AUTOZI, "sim_zi", {}, {"use_observed_lib_size": False}, max_epochs=200,
                          plan=AUTOZI_PLAN, chapters=(7,)),
    "sim_autozi_eb": Spec(AUTOZI, "sim_zi", {}, {"alpha_prior": None, "beta_prior": None}, max_epochs=200,
                          plan=AUTOZI_PLAN, chapters=(7,)),
}


def split_data(name: str) -> tuple[ad.AnnData, ad.AnnData]:
    """(training cells, held-out cells) of model ``name``, each set up as the model was."""
    spec = SPECS[name]
    adata = DATA[spec.data]()
    parts = []
    for keep in (adata.obs["split"] == "train", adata.obs["split"] == "held out"):
        part = adata[keep.to_numpy()].copy()
        spec.model_cls.setup_anndata(part, **spec.setup)
        parts.append(part)
    return parts[0], parts[1]


def held_out_elbo(model, adata_held_out: ad.AnnData) -> float:
    """ELBO per held-out cell, with a fixed seed for its one posterior sample per cell."""
    mini_scvi.settings.seed = SEED
    return model.get_elbo(adata_held_out)


def load(name: str, adata: ad.AnnData | None = None):
    """Load stored model ``name`` on ``adata`` (default: its training cells, set up as it was)."""
    if adata is None:
        adata = split_data(name)[0]
    return SPECS[name].model_cls.load(MODELS_DIR / name, adata)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=MODELS_DIR, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mini_scvi"], cwd=MODELS_DIR.parent,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes to mini_scvi/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_one(name: str) -> dict:
    spec = SPECS[name]
    adata_train, adata_held_out = split_data(name)
    mini_scvi.settings.seed = SEED
    model = spec.model_cls(adata_train, **spec.model)
    start = time.perf_counter()
    model.train(max_epochs=spec.max_epochs, train_size=1.0, plan_kwargs=spec.plan or None, progress_bar=False)
    wall = time.perf_counter() - start
    model.save(MODELS_DIR / name, overwrite=True)
    record = {
        "name": name,
        "model": spec.model_cls.__name__,
        "data": spec.data,
        "setup_anndata": spec.setup,
        "model_kwargs": spec.model,
        "plan_kwargs": spec.plan,
        "n_cells_train": adata_train.n_obs,
        "n_cells_held_out": adata_held_out.n_obs,
        "n_genes": adata_train.n_vars,
        "epochs": len(model.history["elbo_train"]),
        "seed": SEED,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),
        "seconds_per_epoch": round(wall / len(model.history["elbo_train"]), 4),
        "final_elbo_train": float(model.history["elbo_train"].iloc[-1].item()),
        "held_out_elbo": held_out_elbo(model, adata_held_out),
        "chapters": list(spec.chapters),
        "commit": _commit(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }
    (MODELS_DIR / name / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _train_group(names: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    for name in names:
        r = train_one(name)
        print(f"{name:26s} {r['epochs']:4d} epochs  {r['wall_time_s']:7.1f} s  held-out ELBO {r['held_out_elbo']:.3f}",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"models to train (default: all): {', '.join(SPECS)}")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at the same time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SPECS))
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    names = args.names or list(SPECS)
    start = time.perf_counter()
    # Two single-threaded jobs keep 2 cores busy better than one job of two threads: the small
    # matrix products of these models leave a second thread waiting at every synchronization.
    # Each model is trained and seeded in one process, so the split changes no result.
    groups = [names[i :: args.jobs] for i in range(args.jobs) if names[i :: args.jobs]]
    if len(groups) == 1:
        _train_group(groups[0], args.threads)
    else:
        ctx = multiprocessing.get_context("spawn")
        jobs = [ctx.Process(target=_train_group, args=(group, args.threads)) for group in groups]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        if any(job.exitcode for job in jobs):
            sys.exit("a training job failed (see above)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
