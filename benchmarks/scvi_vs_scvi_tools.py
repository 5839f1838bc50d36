"""mini_scvi's SCVI and scvi-tools' SCVI trained side by side on the same data and split.

Data: pbmc3k, cells with >= 200 genes, genes in >= 3 cells, 1,200 highly variable genes
(``mini_scvi.data.pbmc3k_hvg``), a seeded 90/10 cell split. Both models: default architecture
(n_hidden 128, n_latent 10, 1 layer, ZINB, gene dispersion, observed library), batch size 128,
200 epochs, Adam lr 1e-3, KL warm-up 400 epochs, no early stopping, trained on the 90% part.

Reported, per implementation, in one run (ratios are comparable; absolute times are not, on a
shared machine): seconds per training epoch, held-out marginal log-likelihood (importance
sampling, 1,000 samples), KMeans ARI / NMI of the latent mean against the cell types.

Run: ``make bench`` (creates .venv-bench with scvi-tools), or
``.venv-bench/bin/python benchmarks/scvi_vs_scvi_tools.py [--epochs N] [--threads T]``.
Without scvi-tools installed it runs mini_scvi alone. Results: benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import mini_scvi

RESULTS = Path(__file__).resolve().parent / "results"


def clustering_scores(latent: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """KMeans with k = number of cell types on the labelled cells; ARI and NMI against the labels."""
    keep = ~np.asarray(labels.isna())
    truth = np.asarray(labels[keep].astype(str))
    pred = KMeans(n_clusters=len(set(truth)), n_init=10, random_state=seed).fit_predict(latent[keep])
    return {"ari": adjusted_rand_score(truth, pred), "nmi": normalized_mutual_info_score(truth, pred)}


def run_mini(train, test, full, epochs: int, seed: int, mc: int) -> dict:
    from mini_scvi.model import SCVI

    mini_scvi.settings.seed = seed
    SCVI.setup_anndata(train, layer="counts")
    model = SCVI(train)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, device="cpu", progress_bar=False,
                plan_kwargs={"lr": 1e-3, "n_epochs_kl_warmup": 400})
    seconds = time.perf_counter() - start
    SCVI.setup_anndata(test, layer="counts")
    SCVI.setup_anndata(full, layer="counts")
    return {
        "seconds_per_epoch": seconds / epochs,
        "heldout_marginal_ll": model.get_marginal_ll(test, n_mc_samples=mc),
        "train_elbo_last_epoch": -float(model.history["elbo_train"].iloc[-1, 0]),
        **clustering_scores(model.get_latent_representation(full), full.obs["cell_type"], seed),
    }


def run_scvi_tools(train, test, full, epochs: int, seed: int, mc: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.model.SCVI.setup_anndata(train, layer="counts")
    model = scvi.model.SCVI(train)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, accelerator="cpu", enable_progress_bar=False,
                plan_kwargs={"lr": 1e-3, "n_epochs_kl_warmup": 400}, early_stopping=False)
    seconds = time.perf_counter() - start
    mll = model.get_marginal_ll(test, n_mc_samples=mc, return_mean=False)
    return {
        "version": scvi.__version__,
        "seconds_per_epoch": seconds / epochs,
        "heldout_marginal_ll": float(np.mean(np.asarray(mll))),
        "train_elbo_last_epoch": -float(model.history["elbo_train"].iloc[-1, 0]),
        **clustering_scores(model.get_latent_representation(full), full.obs["cell_type"], seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mc", type=int, default=1000, help="importance samples for the marginal likelihood")
    parser.add_argument("--out", default=str(RESULTS / "scvi_vs_scvi_tools"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    full = mini_scvi.data.pbmc3k_hvg(n_top_genes=1200)
    perm = np.random.default_rng(args.seed).permutation(full.n_obs)
    n_train = int(round(0.9 * full.n_obs))
    train, test = full[np.sort(perm[:n_train])].copy(), full[np.sort(perm[n_train:])].copy()
    print(f"pbmc3k: {full.n_obs} cells x {full.n_vars} genes; train {train.n_obs}, held out {test.n_obs}")

    results = {
        "data": {"n_cells": full.n_obs, "n_genes": full.n_vars, "n_train": train.n_obs, "n_test": test.n_obs},
        "settings": {"epochs": args.epochs, "batch_size": 128, "lr": 1e-3, "n_epochs_kl_warmup": 400,
                     "torch_threads": args.threads, "seed": args.seed, "n_mc_samples": args.mc},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
    }
    results["mini_scvi"] = run_mini(train.copy(), test.copy(), full.copy(), args.epochs, args.seed, args.mc)
    results["mini_scvi"]["version"] = mini_scvi.__version__
    print("mini_scvi  ", json.dumps(results["mini_scvi"]))
    try:
        results["scvi_tools"] = run_scvi_tools(train.copy(), test.copy(), full.copy(), args.epochs, args.seed, args.mc)
        print("scvi-tools ", json.dumps(results["scvi_tools"]))
        results["speedup"] = results["scvi_tools"]["seconds_per_epoch"] / results["mini_scvi"]["seconds_per_epoch"]
        print(f"mini_scvi is {results['speedup']:.2f}x faster per epoch (same run)")
    except ImportError:
        print("scvi-tools is not installed: run `make bench` for the side-by-side comparison")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [("seconds per epoch", "seconds_per_epoch", "{:.3f}"), ("held-out marginal LL", "heldout_marginal_ll", "{:.2f}"),
            ("ELBO (train, last epoch)", "train_elbo_last_epoch", "{:.2f}"), ("KMeans ARI", "ari", "{:.3f}"),
            ("KMeans NMI", "nmi", "{:.3f}")]
    impls = [k for k in ("mini_scvi", "scvi_tools") if k in results]
    lines = ["| metric | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for name, key, fmt in rows:
        lines.append(f"| {name} | " + " | ".join(fmt.format(results[i][key]) for i in impls) + " |")
    if "speedup" in results:
        lines.append(f"\nmini_scvi is **{results['speedup']:.2f}x** faster per epoch than scvi-tools "
                     f"{results['scvi_tools']['version']} in the same run ({args.threads} CPU threads).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
