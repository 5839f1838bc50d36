"""AutoZI's synthetic experiment, in spirit (Clivio et al. 2019): can AutoZI find the ZI genes?

For each share of zero-inflated genes (0, 25, 50, 75, 100%), counts are simulated with
``mini_scvi.data.simulate_counts``: 2,000 cells x 200 genes, two cell types, negative-binomial
counts with inverse dispersions theta_g log-uniform in [5, 50], and on the chosen genes extra
zeros with a rate drawn uniformly in [0.3, 0.7]. AUTOZI (defaults: Beta(0.5, 0.5) prior,
minimal dropout 0.01) is trained with lr 1e-2, as in the paper and the tutorial; a gene is called ZI when
q(delta_g < 0.5) > 0.5. Reported: TPR and FPR of the calls for all genes and for genes with mean
count > 1 (the paper's reliability threshold), ROC AUC of q(delta_g < 0.5), seconds per epoch, and
each false positive among the genes with mean > 1 (its mean count, theta_g and q); side by side
with scvi-tools' AUTOZI on the same data when scvi-tools is installed (``make bench``).

What moves the false positive rate (exploratory single runs of mini_scvi, share 50%): strongly
overdispersed genes (theta_g down to 2: a gene with mean 1-5 then has so many zeros of its own
that NB and ZINB are hard to tell apart) and long training on few genes (the decoder's per-cell
dropout can learn where a training cell's zeros are). ``--theta 2 20`` is the harder setting.
``--overdispersion lognormal`` simulates Poisson log-normal counts with the same variance, the
kind of counts the paper simulated (results: ``results/autozi_simulation_lognormal.*``).

Run: ``.venv-bench/bin/python benchmarks/autozi_simulation.py [--cells 2000 --genes 200 --epochs 200]``.
Results: benchmarks/results/autozi_simulation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from sklearn.metrics import roc_auc_score

import mini_scvi

RESULTS = Path(__file__).resolve().parent / "results"


def simulate(share: float, n_cells: int, n_genes: int, theta: tuple[float, float], seed: int,
             overdispersion: str = "gamma"):
    return mini_scvi.data.simulate_counts(
        n_cells=n_cells, n_genes=n_genes, n_cell_types=2, de_fraction=0.2, zi_fraction=share,
        zi_rate=(0.3, 0.7), mean_log_expr=1.0, sd_log_expr=1.0, theta=theta, overdispersion=overdispersion,
        seed=seed,
    )


def fit_mini(adata, epochs: int, seed: int) -> tuple[np.ndarray, float]:
    from mini_scvi.model import AUTOZI

    mini_scvi.settings.seed = seed
    AUTOZI.setup_anndata(adata)
    model = AUTOZI(adata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, plan_kwargs={"lr": 1e-2}, device="cpu", progress_bar=False)
    seconds = (time.perf_counter() - start) / epochs
    ab = model.get_alphas_betas()
    return beta_dist.cdf(0.5, ab["alpha_posterior"], ab["beta_posterior"]), seconds


def fit_scvi_tools(adata, epochs: int, seed: int) -> tuple[np.ndarray, float]:
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.model.AUTOZI.setup_anndata(adata)
    model = scvi.model.AUTOZI(adata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, plan_kwargs={"lr": 1e-2}, accelerator="cpu", enable_progress_bar=False)
    seconds = (time.perf_counter() - start) / epochs
    ab = model.get_alphas_betas()
    return beta_dist.cdf(0.5, ab["alpha_posterior"], ab["beta_posterior"]), seconds


def rates(called: np.ndarray, truth: np.ndarray) -> dict:
    tp, fp = (called & truth).sum(), (called & ~truth).sum()
    return {"tpr": float(tp / truth.sum()) if truth.any() else None,
            "fpr": float(fp / (~truth).sum()) if (~truth).any() else None,
            "n_zi": int(truth.sum()), "n_not_zi": int((~truth).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--theta", type=float, nargs=2, default=[5.0, 50.0],
                        help="range of the genes' inverse dispersions (log-uniform)")
    parser.add_argument("--overdispersion", choices=["gamma", "lognormal"], default="gamma",
                        help="NB counts (gamma) or Poisson log-normal counts with the same variance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scvi-tools", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "autozi_simulation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fitters = {"mini_scvi": fit_mini}
    if not args.no_scvi_tools:
        try:
            import scvi  # noqa: F401

            fitters["scvi_tools"] = fit_scvi_tools
        except ImportError:
            print("scvi-tools is not installed: mini_scvi only (run `make bench` for the comparison)")

    per_share, pooled = [], {name: {"prob": [], "truth": [], "expressed": []} for name in fitters}
    for i, share in enumerate(args.shares):
        adata = simulate(share, args.cells, args.genes, tuple(args.theta), args.seed + i, args.overdispersion)
        truth = adata.var["zero_inflated"].to_numpy()
        means = np.asarray(adata.X.mean(axis=0)).ravel()
        expressed = means > 1.0
        row = {"share": share, "n_genes_mean_gt_1": int(expressed.sum())}
        for name, fit in fitters.items():
            prob, seconds = fit(adata.copy(), args.epochs, args.seed)
            called = prob > 0.5
            row[name] = {"all": rates(called, truth), "mean_gt_1": rates(called[expressed], truth[expressed]),
                         "seconds_per_epoch": seconds}
            # the non-ZI genes with mean > 1 called ZI: how expressed, how overdispersed, how sure
            false_pos = np.flatnonzero(called & ~truth & expressed)
            row[name]["false_positives_mean_gt_1"] = [
                {"gene": adata.var_names[g], "mean": round(float(means[g]), 3),
                 "theta": round(float(adata.var["theta"].iloc[g]), 2), "q": round(float(prob[g]), 3)}
                for g in false_pos
            ]
            if truth.any() and (~truth).any():
                row[name]["auc"] = float(roc_auc_score(truth, prob))
            for key, value in (("prob", prob), ("truth", truth), ("expressed", expressed)):
                pooled[name][key].append(value)
            print(f"share {share:.2f} {name:>10}: {json.dumps(row[name])}", flush=True)
        per_share.append(row)

    summary = {}
    for name, p in pooled.items():
        prob, truth, expressed = (np.concatenate(p[k]) for k in ("prob", "truth", "expressed"))
        summary[name] = {
            "all": rates(prob > 0.5, truth),
            "mean_gt_1": rates(prob[expressed] > 0.5, truth[expressed]),
            "auc_all": float(roc_auc_score(truth, prob)),
            "auc_mean_gt_1": float(roc_auc_score(truth[expressed], prob[expressed])),
            "seconds_per_epoch": float(np.mean([r[name]["seconds_per_epoch"] for r in per_share])),
        }
    result = {"settings": vars(args), "per_share": per_share, "pooled": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    counts = "NB" if args.overdispersion == "gamma" else "Poisson log-normal"
    lines = [f"Pooled over ZI shares {args.shares}; {args.cells} cells x {args.genes} genes per share, {counts} counts, "
             f"{args.epochs} epochs, lr 1e-2, inverse dispersions theta in {args.theta}, {args.threads} CPU threads.", "",
             "| implementation | TPR (mean>1) | FPR (mean>1) | TPR (all) | FPR (all) | AUC (mean>1) | AUC (all) | s / epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['mean_gt_1']['tpr']:.3f} | {s['mean_gt_1']['fpr']:.3f} | {s['all']['tpr']:.3f} | "
                     f"{s['all']['fpr']:.3f} | {s['auc_mean_gt_1']:.3f} | {s['auc_all']:.3f} | {s['seconds_per_epoch']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
