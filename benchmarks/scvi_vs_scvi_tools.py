"""mini_scvi and scvi-tools 1.4.2 trained side by side, at three sizes, over paired seeds (issue 16).

Data (``sizes.py``): ``pbmc700`` (700 pbmc3k cells x 765 HVGs), ``pbmc3k`` (2,638 x 1,200, the course's
data set) and ``sim6000`` (6,000 x 200 simulated counts, half of the genes zero-inflated). SCVI on
the first two, AUTOZI on the third. Both implementations: default architecture (n_hidden 128,
n_latent 10, 1 layer, ZINB, gene dispersion, observed library), batch size 128, Adam (lr 1e-3 for
SCVI with KL warm-up over 400 epochs, 1e-2 for AUTOZI as in its tutorial), no early stopping, and
``train_size=1.0``: every epoch is the same work in both (scvi-tools skips its validation pass
without early stopping; mini_scvi would run one with ``train_size < 1``, see ``step_profile.py``).

On pbmc3k the models train on the cells of ``obs['split'] == 'train'`` (the course's seeded 90%,
the split every stored model uses) and are scored on the held-out 10%: marginal log-likelihood
(importance sampling, ``--mc`` samples) and KMeans ARI / NMI of the latent mean against the cell
types. The smaller and the AutoZI sizes are timed only.

Paired runs: for every seed in ``--seeds`` each size is trained by both implementations with that
seed, one after the other in the same process (the order alternates between seeds), so machine
load hits both alike; ratios and paired differences are per seed. Seconds per epoch are wall time
of ``train()`` divided by the epochs.

Run: ``make bench`` (creates .venv-bench with scvi-tools), or
``.venv-bench/bin/python benchmarks/scvi_vs_scvi_tools.py [--seeds 0 1 2] [--threads 1]``.
Without scvi-tools installed it runs mini_scvi alone. Results: benchmarks/results/scvi_vs_scvi_tools.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sizes  # noqa: E402

import mini_scvi  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = {"pbmc700": "SCVI", "pbmc3k": "SCVI", "sim6000": "AUTOZI"}
PLAN = {"SCVI": {"lr": 1e-3, "n_epochs_kl_warmup": 400}, "AUTOZI": {"lr": 1e-2}}


def clustering_scores(latent: np.ndarray, labels, seed: int = 0) -> dict:
    """KMeans with k = number of cell types on the labelled cells; ARI and NMI against the labels."""
    keep = ~np.asarray(labels.isna())
    truth = np.asarray(labels[keep].astype(str))
    pred = KMeans(n_clusters=len(set(truth)), n_init=10, random_state=seed).fit_predict(latent[keep])
    return {"ari": adjusted_rand_score(truth, pred), "nmi": normalized_mutual_info_score(truth, pred)}


def run_mini(model_name, train, test, full, epochs: int, seed: int, mc: int) -> dict:
    from mini_scvi import model as models

    cls = getattr(models, model_name)
    mini_scvi.settings.seed = seed
    cls.setup_anndata(train, layer="counts")
    model = cls(train)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, device="cpu", progress_bar=False,
                plan_kwargs=PLAN[model_name])
    out = {"seconds_per_epoch": (time.perf_counter() - start) / epochs,
           "train_elbo_last_epoch": -float(model.history["elbo_train"].iloc[-1, 0])}
    if test is not None:
        cls.setup_anndata(test, layer="counts")
        cls.setup_anndata(full, layer="counts")
        out["heldout_marginal_ll"] = model.get_marginal_ll(test, n_mc_samples=mc)
        out.update(clustering_scores(model.get_latent_representation(full), full.obs["cell_type"], seed))
    return out


def run_scvi_tools(model_name, train, test, full, epochs: int, seed: int, mc: int) -> dict:
    import scvi

    cls = getattr(scvi.model, model_name)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    cls.setup_anndata(train, layer="counts")
    model = cls(train)
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, train_size=1.0, accelerator="cpu", enable_progress_bar=False,
                plan_kwargs=PLAN[model_name], early_stopping=False)
    out = {"seconds_per_epoch": (time.perf_counter() - start) / epochs,
           "train_elbo_last_epoch": -float(model.history["elbo_train"].iloc[-1, 0])}
    if test is not None:
        mll = model.get_marginal_ll(test, n_mc_samples=mc, return_mean=False)
        out["heldout_marginal_ll"] = float(np.mean(np.asarray(mll)))
        out.update(clustering_scores(model.get_latent_representation(full), full.obs["cell_type"], seed))
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a - b and a t 95% interval (None with one pair)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = {"n": len(d), "mean": float(d.mean()), "low": None, "high": None}
    if len(d) > 1:
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        out.update(low=float(d.mean() - half), high=float(d.mean() + half))
    return out


def summarize(runs: list[dict]) -> dict:
    """Per size: per-seed speed ratios (scvi-tools s/epoch over mini_scvi's), their mean with a t
    interval on the log scale (a ratio is a difference of logs), and paired metric differences."""
    summary = {}
    for size in sorted({r["size"] for r in runs}, key=sizes.SIZES.index):
        rs = [r for r in runs if r["size"] == size and "scvi_tools" in r]
        if not rs:
            continue
        log_ratio = paired([np.log(r["scvi_tools"]["seconds_per_epoch"]) for r in rs],
                           [np.log(r["mini_scvi"]["seconds_per_epoch"]) for r in rs])
        s = {"model": MODEL[size], "seeds": [r["seed"] for r in rs],
             "speedup_per_seed": [r["scvi_tools"]["seconds_per_epoch"] / r["mini_scvi"]["seconds_per_epoch"] for r in rs],
             "speedup_geomean": float(np.exp(log_ratio["mean"])),
             "speedup_low": None if log_ratio["low"] is None else float(np.exp(log_ratio["low"])),
             "speedup_high": None if log_ratio["high"] is None else float(np.exp(log_ratio["high"])),
             "seconds_per_epoch": {k: float(np.mean([r[k]["seconds_per_epoch"] for r in rs]))
                                   for k in ("mini_scvi", "scvi_tools")}}
        for key in ("heldout_marginal_ll", "ari", "nmi"):
            if key in rs[0]["mini_scvi"]:
                s[key] = {k: float(np.mean([r[k][key] for r in rs])) for k in ("mini_scvi", "scvi_tools")}
                s[key]["difference"] = paired([r["mini_scvi"][key] for r in rs], [r["scvi_tools"][key] for r in rs])
        summary[size] = s
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(sizes.SIZES), choices=sizes.SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, nargs=3, default=[100, 200, 100], metavar=("PBMC700", "PBMC3K", "SIM6000"),
                        help="epochs per size, in the order pbmc700 pbmc3k sim6000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mc", type=int, default=1000, help="importance samples for the marginal likelihood")
    parser.add_argument("--out", default=str(RESULTS / "scvi_vs_scvi_tools"))
    parser.add_argument("--append", action="store_true",
                        help="add these runs to those already in the --out JSON (more seeds for some sizes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = dict(zip(sizes.SIZES, args.epochs))

    impls = {"mini_scvi": run_mini}
    try:
        import scvi  # noqa: F401

        impls["scvi_tools"] = run_scvi_tools
    except ImportError:
        print("scvi-tools is not installed: mini_scvi only (run `make bench` for the side-by-side comparison)")

    data = {}
    for size in args.sizes:
        full = sizes.load(size)
        if size == "pbmc3k":
            train = full[(full.obs["split"] == "train").to_numpy()].copy()
            test = full[(full.obs["split"] == "held out").to_numpy()].copy()
        else:
            train, test = full, None
        data[size] = (full, train, test)
        print(f"{size}: {full.n_obs} cells x {full.n_vars} genes, {MODEL[size]}, {epochs[size]} epochs", flush=True)

    load_before = os.getloadavg()
    runs, earlier = [], None
    if args.append and Path(args.out).with_suffix(".json").exists():
        earlier = json.loads(Path(args.out).with_suffix(".json").read_text())
        runs = earlier["runs"]
        if earlier["settings"]["torch_threads"] != args.threads:
            raise SystemExit("--append needs the same --threads as the runs already there")
        for size in args.sizes:
            if earlier["settings"]["epochs"].get(size, epochs[size]) != epochs[size]:
                raise SystemExit(f"--append: {size} was run with {earlier['settings']['epochs'][size]} epochs")
        epochs = {**earlier["settings"]["epochs"], **epochs}
    for seed in args.seeds:
        for size in args.sizes:
            full, train, test = data[size]
            order = list(impls) if seed % 2 == 0 else list(impls)[::-1]  # alternating with the seed
            run = {"seed": seed, "size": size, "model": MODEL[size], "epochs": epochs[size], "order": order,
                   "load_average_1min": round(os.getloadavg()[0], 2)}
            for name in order:
                run[name] = impls[name](MODEL[size], train.copy(), None if test is None else test.copy(),
                                        full.copy(), epochs[size], seed, args.mc)
                if name == "mini_scvi":
                    run[name]["version"] = mini_scvi.__version__
                else:
                    import scvi

                    run[name]["version"] = scvi.__version__
            if "scvi_tools" in run:
                run["speedup"] = run["scvi_tools"]["seconds_per_epoch"] / run["mini_scvi"]["seconds_per_epoch"]
            runs.append(run)
            print(json.dumps(run), flush=True)
            out = Path(args.out)  # written after every run, so a stopped benchmark keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            seeds = sorted({r["seed"] for r in runs})
            all_sizes = [z for z in sizes.SIZES if any(r["size"] == z for r in runs)]
            results = {
                "settings": {"sizes": all_sizes, "seeds": seeds, "epochs": epochs, "batch_size": 128,
                             "plan": PLAN, "train_size": 1.0, "torch_threads": args.threads, "n_mc_samples": args.mc},
                "data": {**(earlier["data"] if earlier else {}),
                         **{s: {"n_cells": d[0].n_obs, "n_genes": d[0].n_vars, "model": MODEL[s],
                                "n_train": d[1].n_obs, "n_test": None if d[2] is None else d[2].n_obs}
                            for s, d in data.items()}},
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "load_average_before": [round(x, 2) for x in load_before],
                            "load_average_now": [round(x, 2) for x in os.getloadavg()]},
                "appended_to": earlier["machine"] if earlier else None,
                "runs": runs, "summary": summarize(runs),
            }
            out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

    lines = [f"Paired runs over seeds {results['settings']['seeds']} (pairs per size below), {args.threads} torch thread(s), train_size 1.0, batch 128; "
             f"load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores.",
             "Speed-up: scvi-tools' seconds per epoch over mini_scvi's, geometric mean over seeds with a t 95% interval "
             "(on log ratios); metric differences: mini_scvi - scvi-tools, mean and t 95% interval over seeds.", "",
             "| data | model | epochs | pairs | s/epoch mini_scvi | s/epoch scvi-tools | speed-up | 95% interval |",
             "|---|---|---|---|---|---|---|---|"]
    summary = results["summary"]
    for size, s in summary.items():
        d = results["data"][size]
        ci = "" if s["speedup_low"] is None else f"{s['speedup_low']:.2f} to {s['speedup_high']:.2f}"
        lines.append(f"| {size} ({d['n_cells']} x {d['n_genes']}) | {s['model']} | {epochs[size]} | {len(s['seeds'])} | "
                     f"{s['seconds_per_epoch']['mini_scvi']:.3f} | {s['seconds_per_epoch']['scvi_tools']:.3f} | "
                     f"**{s['speedup_geomean']:.2f}x** | {ci} |")
    for size, s in summary.items():
        if "ari" not in s:
            continue
        lines += ["", f"{size}, held out {results['data'][size]['n_test']} cells:", "",
                  "| metric | mini_scvi | scvi-tools | difference | 95% interval |", "|---|---|---|---|---|"]
        for key, label, fmt in (("heldout_marginal_ll", "held-out marginal LL", "{:.2f}"), ("ari", "KMeans ARI", "{:.3f}"),
                                ("nmi", "KMeans NMI", "{:.3f}")):
            m, diff = s[key], s[key]["difference"]
            ci = "" if diff["low"] is None else f"{fmt.format(diff['low'])} to {fmt.format(diff['high'])}"
            lines.append(f"| {label} | {fmt.format(m['mini_scvi'])} | {fmt.format(m['scvi_tools'])} | "
                         f"{fmt.format(diff['mean'])} | {ci} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
