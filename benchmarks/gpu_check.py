"""GPU check: every model trains and runs its toolkit on a CUDA device, agrees with the CPU, and is timed.

For AE, VAE, SCVI (gene_likelihood "zinb", "nb", "poisson", each with use_observed_lib_size True
and False) and AUTOZI (zero_inflation "gene", "gene-batch", "gene-label"), each trained from dense
and from sparse (CSR) simulated counts (``mini_scvi.data.simulate_counts``: 1,000 cells x 300
genes, 2 batches, 4 cell types), and SCVI zinb on pbmc3k (``pbmc3k_hvg``) as a real-size point,
it checks that:

1. training on the device gives finite losses in ``model.history``;
2. ``get_latent_representation`` runs and is finite; SCVI and AUTOZI also run
   ``get_normalized_expression``, a small ``differential_expression``, ``get_marginal_ll`` (few
   Monte Carlo samples) and ``posterior_predictive_sample``, AUTOZI ``get_zero_inflation``, AE and
   VAE ``get_reconstruction``, VAE ``sample``;
3. a model saved after training on the device and loaded with ``Model.load(dir, adata, device="cpu")``
   gives the device model's latent representation (rtol 1e-3, atol 1e-4);
4. one seeded training epoch gives the same loss on the device as on the CPU (rtol 1e-3; see
   ``training_noise_on_cpu`` for how the two runs are made comparable, and ``EPOCH_RTOL`` for why);

and prints a table of seconds per epoch on the device beside the CPU for each model. Each check
prints PASS or FAIL; the last line counts them, and the exit status is 1 when any failed.

Run: ``.venv/bin/python benchmarks/gpu_check.py [--epochs 5] [--threads N] [--out benchmarks/results/gpu_check]``.
Without a CUDA GPU it says so, runs nothing and exits 0. A smoke test of the whole flow on the
CPU (small data, one CPU thread, the device-vs-CPU comparison then trivially holds; about 30 s):
``.venv/bin/python benchmarks/gpu_check.py --device cpu --epochs 1 --quick``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import mini_scvi
from mini_scvi.model import AE, AUTOZI, SCVI, VAE

# One seeded epoch, device against CPU. With the random draws made common (training_noise_on_cpu),
# the two runs differ only by float32 rounding: cuBLAS GEMMs, cuDNN BatchNorm and CUDA reductions
# add in another order than the CPU kernels, each op off by ~1e-7 relative (float32 eps 1.2e-7),
# so after a few hundred ops and ~10 Adam steps we expect ~1e-6 to 1e-5 on the epoch's mean loss.
# 1e-3 leaves two orders of margin for that, while a real device bug (a wrong gather of the
# non-zero counts, a term lost or counted twice, a library size on the wrong scale) moves a loss
# summed over hundreds of genes by far more than 0.1 %. TF32 matmuls (10-bit mantissa, ~1e-3 per
# product) would eat that margin: the header prints whether they are on (PyTorch's default: off).
EPOCH_RTOL = 1e-3
# Latent means of the saved-and-reloaded model (CPU) against the device model: the same float32
# rounding argument, on values of order 1; atol covers coordinates near 0.
LATENT_RTOL, LATENT_ATOL = 1e-3, 1e-4


# --------------------------------------------------------------------------- what is checked


@dataclass
class ModelCase:
    """One model configuration: a class and the constructor arguments that select it."""

    name: str
    model_cls: type
    kwargs: dict = field(default_factory=dict)


def model_cases() -> list[ModelCase]:
    cases = [ModelCase("AE", AE), ModelCase("VAE", VAE)]
    for likelihood in ("zinb", "nb", "poisson"):
        for observed in (True, False):
            library = "observed library" if observed else "latent library"
            cases.append(ModelCase(f"SCVI {likelihood}, {library}", SCVI,
                                   {"gene_likelihood": likelihood, "use_observed_lib_size": observed}))
    # every mode AutoZIModule accepts (mini_scvi/model/autozi.py)
    for mode in ("gene", "gene-batch", "gene-label"):
        cases.append(ModelCase(f"AUTOZI {mode}", AUTOZI, {"zero_inflation": mode}))
    return cases


@dataclass
class Sizes:
    """How big the data and the downstream calls are: full, or --quick for a CPU smoke test."""

    n_cells: int
    n_genes: int
    de_samples: int  # posterior samples per group in differential_expression
    marginal_cells: int  # cells whose marginal likelihood is estimated
    marginal_mc_samples: int
    pbmc_cells: int | None  # None: all 2,638 cells


FULL = Sizes(n_cells=1000, n_genes=300, de_samples=1000, marginal_cells=200, marginal_mc_samples=50, pbmc_cells=None)
QUICK = Sizes(n_cells=400, n_genes=100, de_samples=100, marginal_cells=50, marginal_mc_samples=5, pbmc_cells=400)


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Results:
    checks: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)

    def record(self, where: str, check: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"where": where, "check": check, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {where:<42} {check:<28} {detail}", flush=True)
        return bool(ok)

    def run(self, where: str, check: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        """Run one check; an exception is a FAIL with its message, and the next check still runs."""
        try:
            ok, detail = fn()
        except Exception as err:  # noqa: BLE001  (any error of the package is a finding, not a crash)
            traceback.print_exc(limit=3)
            ok, detail = False, f"raised {type(err).__name__}: {err}"
        return self.record(where, check, ok, detail)


def all_finite(values) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


def max_rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --------------------------------------------------------------------------- the same noise on every device


@contextmanager
def training_noise_on_cpu() -> Iterator[None]:
    """Draw the models' training noise from torch's CPU generator, whatever the device.

    ``mini_scvi.settings.seed`` seeds the CPU and the CUDA generators alike, but they are different
    generators (Mersenne Twister against Philox): the same seed gives other reparameterization
    noise and other dropout masks on the GPU than on the CPU. One epoch's mean loss then differs by
    its Monte Carlo error: changing only the noise seed on the CPU moved it by 0.07 % (VAE) to
    1.7 % (SCVI poisson, latent library), so a plain comparison would fail at rtol 1e-3 on a correct
    GPU, or need a tolerance that hides real bugs. So the epoch comparison builds its
    models with ``dropout_rate=0`` and, inside this context, the two noise sources of training (the
    Gaussian encoders' ``mini_scvi.nn.reparameterize`` and AutoZI's draw of delta from a Beta) draw
    on the CPU and move the draw to the device. The minibatch order and the train/validation split
    already come from the CPU generator (``torch.randperm``), so both runs see the same cells, the
    same noise and the same initial weights, and differ only by the device's arithmetic.
    """
    original_reparameterize = mini_scvi.nn.reparameterize
    original_beta_rsample = torch.distributions.Beta.rsample

    def reparameterize(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(mu.shape, dtype=mu.dtype).to(mu.device)
        return mu + var.sqrt() * eps

    def beta_rsample(self: torch.distributions.Beta, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        device = self.concentration1.device
        # .cpu() and .to() are differentiable, so gradients still reach alpha and beta on the device
        on_cpu = torch.distributions.Beta(self.concentration1.cpu(), self.concentration0.cpu())
        return original_beta_rsample(on_cpu, sample_shape).to(device)

    mini_scvi.nn.reparameterize = reparameterize  # Encoder.forward looks the name up at call time
    torch.distributions.Beta.rsample = beta_rsample
    try:
        yield
    finally:
        mini_scvi.nn.reparameterize = original_reparameterize
        torch.distributions.Beta.rsample = original_beta_rsample


def seeded_epoch(case: ModelCase, adata: ad.AnnData, device: torch.device, seed: int) -> dict[str, float]:
    """The losses of one seeded training epoch on ``device``, with common noise and no dropout."""
    mini_scvi.settings.seed = seed
    model = case.model_cls(adata, **{**case.kwargs, "dropout_rate": 0.0})
    with training_noise_on_cpu():
        model.train(max_epochs=1, device=device, progress_bar=False)
    return {key: float(model.history[key].iloc[0, 0]) for key in ("train_loss_epoch", "elbo_validation")}


# --------------------------------------------------------------------------- one model on one data set


def seconds_per_epoch(model, device: torch.device, epochs: int) -> float:
    """Train ``epochs`` epochs in one call and return the wall time per epoch.

    One untimed epoch runs first, to keep one-off costs out of the timed ones: CUDA loads kernels
    and allocates memory on first use, and even on the CPU the first training of a process took
    seconds longer than the next. ``train`` reads the loss with ``.item()`` at every step, so the
    device is synchronized when it returns.
    """
    model.train(max_epochs=1, device=device, progress_bar=False)
    start = time.perf_counter()
    model.train(max_epochs=epochs, device=device, progress_bar=False)
    return (time.perf_counter() - start) / epochs


def check_model(case: ModelCase, data_name: str, adata: ad.AnnData, device: torch.device, args, sizes: Sizes,
                results: Results) -> None:
    where = f"{case.name} [{data_name}]"
    cpu = torch.device("cpu")
    is_scvi = issubclass(case.model_cls, SCVI)  # AUTOZI is an SCVI and has the whole toolkit

    mini_scvi.settings.seed = args.seed
    model = case.model_cls(adata, **case.kwargs)
    timing: dict = {}

    def train() -> tuple[bool, str]:
        timing["device"] = seconds_per_epoch(model, device, args.epochs)
        return True, f"{timing['device']:.3f} s/epoch on {device}"

    if not results.run(where, "train", train):
        return  # nothing below means anything without a trained model

    def losses_finite() -> tuple[bool, str]:
        bad = [key for key, df in model.history.items() if not all_finite(df.to_numpy())]
        last = model.history["train_loss_epoch"].iloc[-1, 0]
        return not bad, f"non-finite: {bad}" if bad else f"{len(model.history)} curves, last train loss {last:.4g}"

    results.run(where, "history losses finite", losses_finite)

    latent: dict = {}

    def latent_finite() -> tuple[bool, str]:
        latent["device"] = model.get_latent_representation()
        z = latent["device"]
        expected = (adata.n_obs, model.module.n_latent)
        return z.shape == expected and all_finite(z), f"shape {z.shape}, expected {expected}"

    results.run(where, "get_latent_representation", latent_finite)

    if is_scvi:
        def normalized_expression() -> tuple[bool, str]:
            rho = model.get_normalized_expression().to_numpy()
            # library_size=1 returns frequencies: each cell's row is a softmax over genes
            row_sums = rho.sum(1)
            ok = (rho.shape == adata.shape and all_finite(rho) and (rho >= 0).all()
                  and np.allclose(row_sums, 1, atol=1e-3))
            return ok, f"shape {rho.shape}, row sums {row_sums.min():.5f}..{row_sums.max():.5f}"

        def differential_expression() -> tuple[bool, str]:
            group1 = str(adata.obs["cell_type"].cat.categories[0])
            de = model.differential_expression(groupby="cell_type", group1=group1, n_samples=sizes.de_samples)
            numeric = de.select_dtypes(include="number")
            ok = len(de) == adata.n_vars and all_finite(numeric) and de["proba_de"].between(0, 1).all()
            return ok, f"{group1} vs rest, {len(de)} genes, {numeric.shape[1]} numeric columns"

        def marginal_ll() -> tuple[bool, str]:
            n_mc = sizes.marginal_mc_samples
            value = model.get_marginal_ll(indices=np.arange(sizes.marginal_cells), n_mc_samples=n_mc)
            # a probability mass is at most 1, so log p(x) of counts must be negative
            return bool(np.isfinite(value) and value < 0), f"{value:.2f} per cell ({n_mc} MC samples)"

        def posterior_predictive() -> tuple[bool, str]:
            # draws counts with the device's Gamma, Poisson and uniform samplers
            counts = model.posterior_predictive_sample(indices=np.arange(sizes.marginal_cells))
            expected = (sizes.marginal_cells, adata.n_vars)
            ok = counts.shape == expected and all_finite(counts) and (counts >= 0).all() and (counts % 1 == 0).all()
            return ok, f"shape {counts.shape}, mean count {counts.mean():.3g}"

        results.run(where, "get_normalized_expression", normalized_expression)
        results.run(where, "differential_expression", differential_expression)
        results.run(where, "get_marginal_ll", marginal_ll)
        results.run(where, "posterior_predictive_sample", posterior_predictive)
    else:
        def reconstruction() -> tuple[bool, str]:
            x_hat = model.get_reconstruction().numpy()
            return x_hat.shape == adata.shape and all_finite(x_hat), f"shape {x_hat.shape}"

        results.run(where, "get_reconstruction", reconstruction)

    if case.model_cls is VAE:
        def generate() -> tuple[bool, str]:
            cells = model.sample(50, add_noise=True)  # z ~ N(0, I) drawn on the model's device
            return cells.shape == (50, adata.n_vars) and all_finite(cells), f"shape {cells.shape}"

        results.run(where, "sample", generate)

    if case.model_cls is AUTOZI:
        def zero_inflation() -> tuple[bool, str]:
            table = model.get_zero_inflation()
            ok = all_finite(table["zi_prob"]) and table["zi_prob"].between(0, 1).all()
            return ok, f"{len(table)} rows, {int(table['is_zi'].sum())} called zero-inflated"

        results.run(where, "get_zero_inflation", zero_inflation)

    def save_load() -> tuple[bool, str]:
        with tempfile.TemporaryDirectory() as folder:
            model.save(folder, overwrite=True)
            loaded = case.model_cls.load(folder, adata, device="cpu")
        z_loaded = loaded.get_latent_representation()
        z_device = latent.get("device")
        if z_device is None:
            z_device = model.get_latent_representation()
        diff = float(np.abs(z_loaded - z_device).max())
        ok = str(loaded.device) == "cpu" and np.allclose(z_loaded, z_device, rtol=LATENT_RTOL, atol=LATENT_ATOL)
        return ok, f"loaded on {loaded.device}, max |z diff| {diff:.2e}"

    results.run(where, "save on device, load on cpu", save_load)

    def device_vs_cpu() -> tuple[bool, str]:
        on_device = seeded_epoch(case, adata, device, args.seed)
        on_cpu = seeded_epoch(case, adata, cpu, args.seed)
        diffs = {key: max_rel_diff(on_device[key], on_cpu[key]) for key in on_device}
        ok = all(d <= EPOCH_RTOL for d in diffs.values())
        shown = ", ".join(f"{key} {on_device[key]:.6g} vs {on_cpu[key]:.6g} (rel {d:.1e})" for key, d in diffs.items())
        return ok, f"{shown}; rtol {EPOCH_RTOL:g}"

    results.run(where, f"seeded epoch {device.type} vs cpu", device_vs_cpu)

    if device.type == "cpu":
        timing["cpu"] = timing["device"]  # the device is the CPU: the same run
    else:
        def cpu_timing() -> tuple[bool, str]:
            mini_scvi.settings.seed = args.seed
            cpu_model = case.model_cls(adata, **case.kwargs)
            timing["cpu"] = seconds_per_epoch(cpu_model, cpu, args.epochs)
            return True, f"{timing['cpu']:.3f} s/epoch on cpu"

        results.run(where, "train on cpu (timing)", cpu_timing)
    results.timings.append({"model": case.name, "data": data_name, "cells": adata.n_obs, "genes": adata.n_vars,
                            "device_s_per_epoch": timing.get("device"), "cpu_s_per_epoch": timing.get("cpu")})


# --------------------------------------------------------------------------- data


def simulated(sizes: Sizes, sparse: bool, seed: int) -> ad.AnnData:
    """Counts with 2 batches (for gene-batch), 4 cell types (labels, for gene-label and DE) and a
    third of the genes zero-inflated (so AutoZI has something to find). The same seed gives the
    same counts dense or sparse, so the two formats differ only in the code path they take."""
    adata = mini_scvi.data.simulate_counts(
        n_cells=sizes.n_cells, n_genes=sizes.n_genes, n_cell_types=4, n_batches=2, zi_fraction=0.3,
        sparse=sparse, seed=seed,
    )
    # one registry serves every model: AE and VAE ignore batch and labels
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    return adata


def pbmc(sizes: Sizes, seed: int) -> ad.AnnData:
    adata = mini_scvi.data.pbmc3k_hvg()  # raw counts, CSR, in X and layers['counts']
    if sizes.pbmc_cells is not None and sizes.pbmc_cells < adata.n_obs:
        keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, sizes.pbmc_cells, replace=False))
        adata = adata[keep].copy()
    SCVI.setup_anndata(adata, layer="counts")
    return adata


# --------------------------------------------------------------------------- report


def timing_table(timings: list[dict], device: torch.device) -> list[str]:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"| model | data | cells x genes | {device} s / epoch | cpu s / epoch | cpu / {device.type} |",
             "|---|---|---|---|---|---|"]
    for t in timings:
        ratio = (f"{t['cpu_s_per_epoch'] / t['device_s_per_epoch']:.1f}x"
                 if t["device_s_per_epoch"] and t["cpu_s_per_epoch"] else "-")
        lines.append(f"| {t['model']} | {t['data']} | {t['cells']:,} x {t['genes']:,} | "
                     f"{seconds(t['device_s_per_epoch'])} | {seconds(t['cpu_s_per_epoch'])} | {ratio} |")
    return lines


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "mini_scvi": mini_scvi.__version__, "device": str(device),
            "cpu_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="device to check against the CPU (default: cuda)")
    parser.add_argument("--epochs", type=int, default=5, help="timed training epochs per model and device")
    parser.add_argument("--quick", action="store_true",
                        help="small data and few samples (400 cells x 100 genes, 400 pbmc3k cells): a smoke test")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's own choice; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the checks and timings to OUT.json and the table to OUT.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU found (torch.cuda.is_available() is False): nothing was run. "
              "For a CPU smoke test of this script: --device cpu --epochs 1 --quick")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # tiny models gain nothing from more threads, and on a shared machine idle threads that
        # spin at every parallel region made the smoke test ~10x slower (5 min instead of 30 s)
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)  # create the CUDA context before timing
    sizes = QUICK if args.quick else FULL
    env = environment(device)
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)

    results = Results()
    start = time.perf_counter()
    for data_name, sparse in (("dense", False), ("sparse", True)):
        adata = simulated(sizes, sparse, args.seed)
        for case in model_cases():
            check_model(case, data_name, adata, device, args, sizes, results)
    # the real-size point: SCVI zinb on the course's pbmc3k (CSR counts in layers['counts'])
    pbmc_data = pbmc(sizes, args.seed)
    check_model(ModelCase("SCVI zinb, observed library", SCVI, {"gene_likelihood": "zinb"}), "pbmc3k", pbmc_data,
                device, args, sizes, results)

    table = timing_table(results.timings, device)
    print(f"\nSeconds per epoch ({args.epochs} epoch(s) timed per model; CPU with {torch.get_num_threads()} threads"
          + ("; the device is the CPU, so both columns are the same run" if device.type == "cpu" else "") + "):")
    print("\n".join(table))
    failed = [c for c in results.checks if not c["ok"]]
    if failed:
        print("\nFailed checks:")
        for c in failed:
            print(f"  {c['where']}: {c['check']}: {c['detail']}")
    n_passed = len(results.checks) - len(failed)
    print(f"\n{n_passed} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(
            {"environment": env, "epochs": args.epochs, "quick": args.quick, "checks": results.checks,
             "timings": results.timings}, indent=2) + "\n")
        out.with_suffix(".md").write_text("\n".join(table) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
