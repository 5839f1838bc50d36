"""Checks for exercises/ex06_scvi_downstream.ipynb (chapter 6: using a trained scVI model)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._common import (add_questions, _call, _check_array, _check_pair, _check_tensor, _check_unchanged,
                      _clone, _compare, _compare_np, _deterministic, _fail, _pass, _rng, _SEED)

__all__ = ["check_de_probabilities", "check_log_marginal", "check_fdr_select", "check_zero_fraction_ppc"]

add_questions({
    "ex06-nb-vs-zinb": (
        "abcd",
        "22be3a91dd05b23a1e84e97d1b614fcd53f238df7892eddc08c0c379b4b6ca99",
        "compare the difference between the models with the spread between seeds, and remember which model "
        "contains the other as a special case.",
    ),
})


DE_EPS = 1e-8  # as in SCVI.differential_expression


def _ref_de(rho1: np.ndarray, rho2: np.ndarray, mode: str, delta: float, pseudocount: float):
    """The formulas of SCVI.differential_expression (mini_scvi/model/scvi.py), restated."""
    if mode == "vanilla":
        p = (rho1 > rho2).mean(0)
    else:
        lfc = np.log2(rho1 + pseudocount) - np.log2(rho2 + pseudocount)
        p = (np.abs(lfc) >= delta).mean(0)
    return p, np.log(p + DE_EPS) - np.log(1 - p + DE_EPS)


@_deterministic
def check_de_probabilities(de_probabilities: Callable) -> None:
    """``de_probabilities(rho1, rho2, mode, delta, pseudocount) -> (proba, bayes_factor)``, against the
    formulas of ``SCVI.differential_expression`` (vanilla and change modes)."""
    name = "de_probabilities"
    rs = np.random.default_rng(_SEED)
    S, G = 500, 12
    base = rs.dirichlet(np.ones(G), size=1)[0]
    shift = np.exp(rs.normal(0, 0.6, size=G))
    rho1 = base * np.exp(rs.normal(0, 0.3, size=(S, G))) * shift
    rho2 = base * np.exp(rs.normal(0, 0.3, size=(S, G)))
    cases = [
        ("vanilla, on random samples", rho1, rho2, "vanilla", 0.25, 1e-4),
        ("vanilla, when rho1 > rho2 in every sample (or in none)", np.c_[rho1[:, :3] + 1, rho1[:, 3:6]],
         np.c_[rho1[:, :3], rho1[:, 3:6] + 1], "vanilla", 0.25, 1e-4),
        ("vanilla, when rho1 = rho2 exactly", rho1[:, :4], rho1[:, :4].copy(), "vanilla", 0.25, 1e-4),
        ("change, on random samples (delta 0.25)", rho1, rho2, "change", 0.25, 1e-4),
        ("change, with delta 1", rho1, rho2, "change", 1.0, 1e-4),
        ("change, for tiny rho (1e-6) where the pseudocount matters", rho1[:, :4] * 1e-5, rho2[:, :4] * 0.5e-5,
         "change", 0.25, 1e-4),
        ("change, with pseudocount 1e-2", rho1, rho2, "change", 0.5, 1e-2),
        ("vanilla, for one posterior sample", rho1[:1], rho2[:1], "vanilla", 0.25, 1e-4),
    ]
    hints = {
        "vanilla": "the probability of H1 is estimated by how often H1 holds among the paired posterior "
                   "samples (they run along axis 0), one value per gene; the Bayes factor is the log posterior "
                   "odds, kept finite as the statement says (chapter 6, 'Two hypotheses, decided by posterior "
                   "samples').",
        "change": "the change hypothesis is about the size of the log2 fold change, sample by sample: how often "
                  "is it at least delta? The Bayes factor is the log posterior odds, kept finite as the "
                  "statement says (chapter 6, 'Change mode, the FDR, and a volcano plot').",
    }
    for where, r1, r2, mode, delta, pc in cases:
        o1, o2 = r1.copy(), r2.copy()
        out = _call(de_probabilities, name, r1, r2, mode=mode, delta=delta, pseudocount=pc)
        if not (np.array_equal(o1, r1) and np.array_equal(o2, r2)):
            _fail(name, "the function modified its inputs in place.")
        p, bf = _check_pair(name, out, "(proba, bayes_factor)")
        p = _check_array(name, p, (r1.shape[1],), "proba")
        bf = _check_array(name, bf, (r1.shape[1],), "bayes_factor")
        ref_p, ref_bf = _ref_de(o1, o2, mode, delta, pc)
        hint = hints[mode]
        if "pseudocount" in where:
            hint = "tiny frequencies make the log fold change explode: re-read where the pseudocount goes."
        _compare_np(name, p, ref_p, f"in proba ({where})", hint, rtol=1e-9, atol=1e-9)
        if not np.isfinite(bf).all():
            _fail(name, f"bayes_factor is infinite ({where}).",
                  "when all samples agree (p = 0 or 1) the log odds are infinite: re-read how the statement "
                  "keeps them finite.")
        _compare_np(name, bf, ref_bf, f"in bayes_factor ({where})", hints[mode], rtol=1e-6, atol=1e-6)
    _pass(name, f"matches the formulas of SCVI.differential_expression on {len(cases)} inputs (vanilla and "
          "change modes, p = 0 and 1, ties, tiny rho, other delta and pseudocount).")


@_deterministic
def check_log_marginal(log_marginal: Callable) -> None:
    """``log_marginal(log_w) -> (n_cells,)``: the importance-sampling estimate logsumexp_s(log_w) - log S,
    against a direct float64 computation; also checks that it is >= the mean log-weight."""
    name = "log_marginal"
    hint = ("importance sampling averages the weights over the samples (axis 0), and with weights like "
            "e^-1000, which are 0 in floating point, that average has to be taken without leaving log space "
            "(chapter 6, 'Estimating log p(x) by importance sampling').")
    g = _rng()
    cases = [
        ("on random log-weights", torch.randn(100, 8, generator=g) * 3 - 50),
        ("for log-weights around -5000 (float32)", torch.randn(200, 5, generator=g) * 10 - 5000),
        ("for log-weights around +500", torch.randn(50, 5, generator=g) + 500),
        ("for a single sample (S = 1)", torch.randn(1, 6, generator=g) - 20),
        ("for equal log-weights", torch.full((30, 4), -7.5)),
        ("in float64", torch.randn(64, 3, generator=g, dtype=torch.float64) * 5 - 1200),
    ]
    for where, log_w in cases:
        (orig,) = _clone(log_w)
        out = _call(log_marginal, name, log_w)
        _check_unchanged(name, [orig], [log_w])
        _check_tensor(name, out, (log_w.shape[1],), log_w.dtype)
        ref = torch.logsumexp(orig.double(), 0) - math.log(orig.shape[0])
        if (out.detach().double() < orig.double().mean(0) - 1e-3).any():
            _fail(name, f"the estimate is below the mean log-weight (the ELBO) {where}.",
                  "the average of the log-weights is the ELBO, a lower bound (Jensen): the estimate averages "
                  "the weights themselves.")
        h = hint
        if "equal" in where or "single" in where:
            h = ("with equal weights the average weight equals each weight: check how a sum of S weights "
                 "becomes their average.")
        _compare(name, out, ref, where, h, rtol=1e-6, atol=2e-3 if log_w.dtype == torch.float32 else 1e-8)
    _pass(name, f"matches logsumexp - log S on {len(cases)} inputs (log-weights from -5000 to +500, S = 1, "
          "equal weights, float64), and is never below the ELBO.")


def _ref_fdr(proba_de: np.ndarray, target: float) -> np.ndarray:
    order = np.argsort(-proba_de, kind="stable")
    fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    keep = np.zeros(len(order), dtype=bool)
    keep[order] = fdr <= target
    return keep


@_deterministic
def check_fdr_select(fdr_select: Callable) -> None:
    """``fdr_select(proba_de, fdr_target) -> bool (n_genes,)``: the posterior-expected-FDR rule of
    ``SCVI.differential_expression``, in the input's gene order."""
    name = "fdr_select"
    hint = ("a list's posterior expected FDR follows from each gene's posterior probability of not being DE, "
            "and it grows as the list takes in weaker genes: keep the longest list of top-ranked genes that "
            "stays within the target (chapter 6, 'Change mode, the FDR, and a volcano plot'), as a mask in the "
            "input's gene order.")
    rs = np.random.default_rng(_SEED)
    p = rs.uniform(size=200)
    mostly = np.r_[1 - rs.uniform(0, 0.02, size=40), rs.uniform(0.3, 0.99, size=60)]
    rs.shuffle(mostly)
    cases = [
        ("on uniform proba_de, target 0.05", p, 0.05),
        ("on uniform proba_de, target 0.2", p, 0.2),
        ("with 40 strong genes among 100, target 0.05", mostly, 0.05),
        ("with 40 strong genes among 100, target 0.1", mostly, 0.1),
        ("when every proba_de is 1", np.ones(10), 0.05),
        ("when no gene qualifies", rs.uniform(0, 0.5, size=20), 0.05),
    ]
    for where, pr, target in cases:
        orig = pr.copy()
        out = _call(fdr_select, name, pr, target)
        if not np.array_equal(orig, pr):
            _fail(name, "the function modified proba_de in place (e.g. with .sort()).", "rank the genes without sorting the input itself.")
        out = _check_array(name, out, pr.shape, "the mask")
        if out.dtype != bool:
            _fail(name, f"the mask should be boolean, got dtype {out.dtype}.")
        ref = _ref_fdr(orig, target)
        if not np.array_equal(out, ref):
            if out.sum() == ref.sum():
                h = "the right number of genes, but not the right ones: return the mask in the original gene order."
            else:
                h = hint
            _fail(name, f"wrong selection {where}.", h)
    _pass(name, f"matches the posterior expected FDR rule of SCVI.differential_expression on {len(cases)} inputs.")


@_deterministic
def check_zero_fraction_ppc(zero_fraction_ppc: Callable) -> None:
    """``zero_fraction_ppc(x_obs, x_rep) -> (observed, replicated, ppp)``, each (n_genes,): fraction of
    zeros per gene in the data and (averaged) in the replicates, and the posterior predictive p-value."""
    name = "zero_fraction_ppc"
    rs = np.random.default_rng(_SEED)
    n, G, S = 80, 15, 25
    mu = np.exp(rs.normal(0, 1.2, size=G))
    x_obs = rs.negative_binomial(1.0, 1.0 / (1.0 + mu), size=(n, G)).astype(np.float64)
    x_obs[: n // 2, :3] = 0  # some genes with extra zeros
    x_rep = rs.poisson(np.broadcast_to(mu[None, :, None], (n, G, S))).astype(np.float64)
    x_rep[:, 5] = x_obs[:, 5, None]  # a gene replicated exactly: ties between observed and replicated
    cases = [("on simulated data", x_obs, x_rep), ("for one replicate", x_obs, x_rep[..., :1]),
             ("for one cell", x_obs[:1], x_rep[:1])]
    for where, xo, xr in cases:
        oo, orr = xo.copy(), xr.copy()
        out = _call(zero_fraction_ppc, name, xo, xr)
        if not (np.array_equal(oo, xo) and np.array_equal(orr, xr)):
            _fail(name, "the function modified its inputs in place.")
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            _fail(name, "should return a tuple (observed, replicated, ppp).")
        obs, rep, ppp = (_check_array(name, o, (xo.shape[1],), w) for o, w in
                         zip(out, ("observed", "replicated", "ppp")))
        ref_obs = (oo == 0).mean(0)
        rep_each = (orr == 0).mean(0)  # (G, S)
        _compare_np(name, obs, ref_obs, f"in observed ({where})",
                    "a fraction over cells (axis 0): one value per gene.")
        _compare_np(name, rep, rep_each.mean(-1), f"in replicated ({where})",
                    "compute the observed statistic again in each replicate data set, then average over the "
                    "replicates.")
        _compare_np(name, ppp, (rep_each >= ref_obs[:, None]).mean(-1), f"in ppp ({where})",
                    "the p-value is a tail probability over the replicates: re-read which tail, and what the "
                    "statement says about ties (chapter 6, 'Posterior predictive checks').")
    _pass(name, f"matches the zero-fraction statistic and its posterior predictive p-value on {len(cases)} inputs.")
