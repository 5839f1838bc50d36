"""Checks for exercises/ex05_scvi.ipynb (chapter 5: scVI)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from mini_scvi import distributions as _dist

from ._common import (add_questions, _call, _check_array, _check_pair, _check_tensor, _check_unchanged,
                      _clone, _compare, _compare_np, _deterministic, _fail, _pass, _rng, _SEED)

__all__ = ["check_library_prior", "check_kl_library", "check_scvi_generative", "check_scvi_loss",
           "check_kl_weight_at"]

add_questions({
    "ex05-warmup": (
        "abcd",
        "97ff8b523c7aac37f8f014b79e42bb2a0565bd6f1af4e87559665d1e663c439d",
        "ask what each KL pulls its posterior towards: N(0, I), which carries no information about the cell, "
        "or a prior fitted to the observed log totals of the cell's batch?",
    ),
})


def _ref_library_prior(counts: np.ndarray, batch: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """mini_scvi's own library_log_stats, run on an AnnData built from the inputs."""
    import anndata as ad
    import pandas as pd

    from mini_scvi import _adata

    adata = ad.AnnData(X=np.asarray(counts, dtype=np.float32))
    adata.obs["batch"] = pd.Categorical([f"b{int(b):03d}" for b in batch])
    _adata.setup_anndata(adata, batch_key="batch")
    registry = _adata.get_registry(adata)
    assert registry["batch_categories"] == [f"b{b:03d}" for b in range(n_batch)]
    return _adata.library_log_stats(adata, registry)


@_deterministic
def check_library_prior(library_prior: Callable) -> None:
    """``library_prior(counts, batch, n_batch) -> (means, variances)``, each (n_batch,), against
    ``mini_scvi._adata.library_log_stats``."""
    name = "library_prior"
    hint = ("the prior of a batch is fitted to the log library sizes of that batch's cells alone (an "
            "empirical Bayes prior, chapter 5, 'Library size: observed or learned'); the statement's "
            "variance divides by the number of cells, and its two rules cover a one-cell batch and the floor.")
    rs = np.random.default_rng(_SEED)

    def counts_for(n, g, depth):
        return rs.poisson(rs.gamma(0.5, 2.0, size=(n, g)) * depth).astype(np.float64) + np.eye(n, g)

    cases = []
    cases.append(("for two batches of different depth",
                  np.vstack([counts_for(60, 30, 1.0), counts_for(40, 30, 4.0)]), np.repeat([0, 1], [60, 40]), 2))
    x = counts_for(50, 20, 2.0)
    cases.append(("for a single batch", x, np.zeros(50, dtype=int), 1))
    codes = rs.integers(0, 5, size=120)
    codes[:5] = np.arange(5)
    cases.append(("for five interleaved batches", counts_for(120, 25, 1.5), codes, 5))
    x = counts_for(31, 15, 2.0)
    cases.append(("when a batch has a single cell", x, np.r_[np.zeros(30, dtype=int), 1], 2))
    same = np.zeros((10, 8))
    same[:, 0] = 7.0
    same[:, 3] = 5.0  # every cell has total 12
    cases.append(("when every cell of a batch has the same total", np.vstack([same, counts_for(10, 8, 3.0)]),
                  np.repeat([0, 1], 10), 2))
    cases.append(("as float32 counts", counts_for(40, 10, 5.0).astype(np.float32), np.repeat([0, 1], 20), 2))
    for where, counts, batch, n_batch in cases:
        orig = counts.copy()
        out = _call(library_prior, name, counts, batch, n_batch)
        if not np.array_equal(orig, counts):
            _fail(name, "the function modified the counts in place.")
        means, variances = _check_pair(name, out, "(means, variances)")
        means = _check_array(name, means, (n_batch,), "means")
        variances = _check_array(name, variances, (n_batch,), "variances")
        ref_m, ref_v = _ref_library_prior(orig, batch, n_batch)
        _compare_np(name, means, ref_m, f"in the means {where}",
                    "the prior is on the log of each cell's library size: the mean of the logs is not the log "
                    "of the mean (Jensen).", rtol=1e-5, atol=1e-5)
        h = hint
        if "single cell" in where:
            h = "one cell has no spread to measure: re-read the statement's rule for such a batch."
        elif "same total" in where:
            h = "a variance of 0 would make the prior a point mass: re-read the statement's floor."
        _compare_np(name, variances, ref_v, f"in the variances {where}", h, rtol=1e-4, atol=1e-6)
    _pass(name, f"matches mini_scvi's library_log_stats on {len(cases)} data sets (1 to 5 batches, a one-cell "
          "batch, equal totals, float32).")


@_deterministic
def check_kl_library(kl_library: Callable) -> None:
    """``kl_library(ql_m, ql_v, batch_index, prior_means, prior_vars) -> (n_cells,)``, against
    ``SCVIModule.kl_library`` (and ``kl_normal`` in float64)."""
    from mini_scvi.model.scvi import SCVIModule

    name = "kl_library"
    hint = ("this is chapter 3's Gaussian KL with a prior that is no longer standard: each cell is compared "
            "with the prior of its own batch (index the priors by batch_index), and the result is summed "
            "over the last axis. Derive it from E_q[log q - log p] if the closed form is not at hand.")
    g = _rng()
    n_batch = 3
    prior_m = torch.tensor([6.5, 8.0, 7.2])
    prior_v = torch.tensor([0.2, 0.05, 1.3])
    module = SCVIModule(n_input=5, n_batch=n_batch, use_observed_lib_size=False, library_log_means=prior_m.numpy(),
                        library_log_vars=prior_v.numpy())
    n = 40
    cases = [
        ("on random inputs with 3 batches", torch.randn(n, 1, generator=g) + 7, torch.rand(n, 1, generator=g) * 0.5 + 0.01,
         torch.randint(0, n_batch, (n,), generator=g), prior_m, prior_v),
        ("when q equals the cell's prior", prior_m[[0, 1, 2, 1]].unsqueeze(-1), prior_v[[0, 1, 2, 1]].unsqueeze(-1),
         torch.tensor([0, 1, 2, 1]), prior_m, prior_v),
        ("for a very narrow q (variance 1e-6)", torch.full((6, 1), 7.0), torch.full((6, 1), 1e-6),
         torch.tensor([0, 1, 2, 0, 1, 2]), prior_m, prior_v),
        ("for a single batch", torch.randn(10, 1, generator=g) + 7, torch.rand(10, 1, generator=g) + 0.1,
         torch.zeros(10, dtype=torch.long), prior_m[:1], prior_v[:1]),
    ]
    d = torch.float64
    cases.append(("in float64", cases[0][1].to(d), cases[0][2].to(d), cases[0][3], prior_m.to(d), prior_v.to(d)))
    for where, m, v, b, pm, pv in cases:
        orig = _clone(m, v, b, pm, pv)
        out = _call(kl_library, name, m, v, b, pm, pv)
        _check_unchanged(name, orig, [m, v, b, pm, pv])
        _check_tensor(name, out, (m.shape[0],), m.dtype)
        if m.dtype == torch.float32 and len(pm) == n_batch:
            expected = module.kl_library({"qz_m": torch.zeros(m.shape[0], 2), "ql_m": orig[0], "ql_v": orig[1]}, orig[2])
        else:
            expected = _dist.kl_normal(orig[0], orig[1], orig[3][orig[2]].unsqueeze(-1),
                                       orig[4][orig[2]].unsqueeze(-1)).sum(-1)
        h = hint
        if "equals" in where:
            h = "KL(q || p) must vanish when q = p: is each cell compared with its own batch's prior?"
        _compare(name, out, expected, where, h, rtol=1e-5, atol=1e-5)
    _pass(name, f"matches SCVIModule.kl_library on {len(cases)} inputs (3 batches, q = prior, narrow q, "
          "one batch, float64).")


@_deterministic
def check_scvi_generative(scvi_generative: Callable) -> None:
    """``scvi_generative(scale_logits, px_r, library) -> (rho, mu, theta)``, against
    ``SCVIModule.generative`` on a real (untrained) module."""
    from mini_scvi.model.scvi import SCVIModule

    name = "scvi_generative"
    cases = []
    module = SCVIModule(n_input=30, n_batch=2, n_hidden=16, n_latent=3).eval()
    z = torch.randn(12, 3)
    batch = torch.randint(0, 2, (12,))
    library = torch.log(torch.randint(200, 5000, (12, 1)).float())
    with torch.no_grad():
        h = module.decoder.px_decoder(z, batch)
        logits = module.decoder.px_scale_decoder(h)
        ref = module.generative(z, library, batch)
    cases.append(("on the decoder outputs of a real SCVIModule", logits, module.px_r.detach().clone(), library,
                  (ref["px_scale"], ref["px_rate"], ref["px_r"])))

    def manual(lg, pr, lib):
        rho = torch.softmax(lg.double(), -1)
        return rho, torch.exp(lib.double()) * rho, torch.exp(pr.double())

    g = _rng()
    big = torch.randn(8, 20, generator=g) * 40  # logits of +-100: exp overflows float32
    cases.append(("for large decoder logits (up to +-100, float32)", big, torch.randn(20, generator=g),
                  torch.full((8, 1), 8.0), None))
    cases.append(("for a library of 1 (log library 0)", torch.randn(5, 7, generator=g), torch.zeros(7),
                  torch.zeros(5, 1), None))
    cases.append(("in float64", torch.randn(4, 9, generator=g, dtype=torch.float64),
                  torch.randn(9, generator=g, dtype=torch.float64),
                  torch.rand(4, 1, generator=g, dtype=torch.float64) * 3 + 5, None))
    for where, lg, pr, lib, expected in cases:
        orig = _clone(lg, pr, lib)
        out = _call(scvi_generative, name, lg, pr, lib)
        _check_unchanged(name, orig, [lg, pr, lib])
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            _fail(name, "should return a tuple (rho, mu, theta).")
        rho, mu, theta = out
        _check_tensor(name, rho, lg.shape, lg.dtype, "rho")
        _check_tensor(name, mu, lg.shape, lg.dtype, "mu")
        _check_tensor(name, theta, pr.shape, pr.dtype, "theta")
        if expected is None:
            expected = manual(*orig)
        if torch.isnan(rho.detach()).any():
            _fail(name, f"rho contains nan {where}.",
                  "exponentiating large logits overflows: use a softmax that stays finite for large inputs.")
        if not torch.allclose(rho.detach().double().sum(-1), torch.ones(lg.shape[0], dtype=torch.float64), atol=1e-4):
            _fail(name, f"the rows of rho do not sum to 1 {where}.",
                  "rho holds expression frequencies, one vector per cell: along which axis must they sum to 1?")
        _compare(name, rho, expected[0], f"in rho {where}", "rho turns the decoder's logits into frequencies over genes (chapter 5, 'The generative model').",
                 rtol=1e-4, atol=1e-7)
        _compare(name, mu, expected[1], f"in mu {where}",
                 "library holds the LOG of the library size, one value per cell: the mean count scales the "
                 "frequencies by the library size itself.", rtol=1e-4, atol=1e-6)
        _compare(name, theta, expected[2], f"in theta {where}",
                 "px_r is a free parameter on the log scale, so that theta stays positive whatever its value.",
                 rtol=1e-5, atol=1e-7)
    _pass(name, f"matches SCVIModule.generative on {len(cases)} inputs (a real decoder, huge logits, "
          "library 1, float64).")


@_deterministic
def check_scvi_loss(scvi_loss: Callable) -> None:
    """``scvi_loss(x, mu, theta, zi_logits, qz_m, qz_v, kl_l, kl_weight) -> (n_cells,)``, the per-cell
    loss whose mean is ``SCVIModule.loss(...).loss``, on real (untrained) modules."""
    from mini_scvi.model.scvi import SCVIModule

    name = "scvi_loss"
    n, g_ = 16, 30
    rate = torch.distributions.Gamma(0.5, 0.1).sample((n, g_))
    x = torch.poisson(rate)
    x[:, 0] += 1
    batch = torch.arange(n) % 2
    tensors = {"X": x, "batch": batch, "labels": torch.zeros(n, dtype=torch.long),
               "log_x_factorial": torch.lgamma(x + 1).sum(-1)}
    lib = torch.log(x.sum(-1))
    means = np.array([lib[batch == 0].mean().item(), lib[batch == 1].mean().item()], dtype=np.float32)
    modules = [
        ("latent library", SCVIModule(n_input=g_, n_batch=2, n_hidden=16, n_latent=3, use_observed_lib_size=False,
                                      library_log_means=means, library_log_vars=np.array([0.3, 0.5], dtype=np.float32))),
        ("observed library", SCVIModule(n_input=g_, n_batch=2, n_hidden=16, n_latent=3)),
    ]
    n_checked = 0
    for label, module in reversed(modules):  # the observed library first: its kl_weight=0 case tests the reconstruction alone
        module.eval()
        with torch.no_grad():
            inf = module.inference(x, batch)
            gen = module.generative(inf["z"], inf["library"], batch)
            kl_l = module.kl_library(inf, batch)
        for kl_weight in (0.0, 1.0, 0.3):
            where = f"with the {label}, kl_weight={kl_weight}"
            with torch.no_grad():
                ref = module.loss(tensors, inf, gen, kl_weight=kl_weight)
            expected = ref.reconstruction_loss + kl_weight * (ref.kl_local - kl_l) + kl_l
            args = [x, gen["px_rate"], gen["px_r"], gen["px_dropout"], inf["qz_m"], inf["qz_v"], kl_l]
            orig = _clone(*args)
            out = _call(scvi_loss, name, *args, kl_weight)
            _check_unchanged(name, orig, args)
            _check_tensor(name, out, (n,), x.dtype, "the loss per cell")
            if kl_weight == 0.0 and label == "observed library":
                hint = ("with kl_weight=0 and an observed library only the reconstruction is left: the negative "
                        "ZINB log-likelihood of all the cell's counts, normalizing constant included.")
            elif kl_weight == 0.0:
                hint = ("the reconstruction passed with the observed library: re-read which KL term the warm-up "
                        "weighs and which one always counts in full (chapter 5, 'Training: the ELBO with KL "
                        "warm-up').")
            else:
                hint = ("which term, and only that one, does kl_weight multiply, and is that KL taken over all "
                        "latent dimensions? (chapter 5, 'Training: the ELBO with KL warm-up')")
            _compare(name, out, expected, where, hint, rtol=1e-5, atol=1e-3)
            if not torch.allclose(out.detach().mean(), ref.loss, rtol=1e-5, atol=1e-3):
                _fail(name, f"the mean over cells is not SCVIModule.loss {where}.", hint)
            n_checked += 1
    _pass(name, f"matches SCVIModule.loss cell by cell on {n_checked} cases (latent and observed library, "
          "kl_weight 0, 0.3, 1).")


@_deterministic
def check_kl_weight_at(kl_weight_at: Callable) -> None:
    """``kl_weight_at(epoch, n_epochs_kl_warmup) -> float``, against ``mini_scvi.train.kl_weight_at``."""
    from mini_scvi.train import kl_weight_at as ref

    name = "kl_weight_at"
    n_checked = 0
    for n_warm in (None, 0, 1, 4, 10, 400):
        epochs = list(range(0, (n_warm or 3) + 4)) + [10_000]
        for epoch in epochs:
            out = _call(kl_weight_at, name, epoch, n_warm)
            try:
                value = float(out)
            except (TypeError, ValueError):
                _fail(name, f"should return a number, got {type(out).__name__}.")
            expected = ref(epoch, n_warm)
            if not math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12):
                if n_warm is None or n_warm == 0:
                    hint = "no warm-up (None or 0) means the full KL from the first epoch: weight 1."
                elif epoch >= n_warm:
                    hint = "after the warm-up the weight stays at 1: clip it."
                else:
                    hint = "the weight grows linearly from 0 at epoch 0 to 1 at epoch n_epochs_kl_warmup."
                _fail(name, f"wrong weight at epoch {epoch} with n_epochs_kl_warmup={n_warm}.", hint)
            n_checked += 1
    _pass(name, f"matches mini_scvi.train.kl_weight_at at {n_checked} (epoch, warm-up) pairs, "
          "no warm-up included.")
