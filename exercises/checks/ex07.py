"""Checks for exercises/ex07_autozi.ipynb (chapter 7: AutoZI)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mini_scvi import distributions as _dist

from ._common import (add_questions, _call, _check_array, _check_pair, _check_tensor, _check_unchanged,
                      _clone, _compare, _compare_np, _deterministic, _fail, _pass, _rng, _SEED)

__all__ = ["check_kl_beta", "check_autozi_log_likelihood", "check_minimal_dropout_logits", "check_zi_call"]

add_questions({
    "ex07-low-mean": (
        "abcd",
        "bba0bd8bfedb07d70e894c02324230ccd402da9044f418c039469970bbaf4e39",
        "at a mean of 0.2, what fraction of zeros do the NB and the ZINB predict, and how different are their "
        "likelihoods for a column of mostly zeros and a few ones?",
    ),
})


@_deterministic
def check_kl_beta(kl_beta: Callable) -> None:
    """``kl_beta(a_q, b_q, a_p, b_p)``: elementwise KL(Beta(a_q, b_q) || Beta(a_p, b_p)), against
    ``mini_scvi.distributions.kl_beta``."""
    name = "kl_beta"
    hint = ("write the KL as E_q[log q(delta) - log p(delta)] for two Beta densities: the expectations of "
            "log delta and log(1 - delta) are taken under q (the statement gives them), and log B must come from "
            "log-Gamma functions (chapter 7, 'The ELBO and its global term').")
    g = _rng()
    d = torch.float64

    def u(*shape, lo=0.0, hi=1.0, dtype=d):
        return torch.rand(*shape, generator=g, dtype=dtype) * (hi - lo) + lo

    half = torch.tensor([0.5], dtype=d)
    cases = [
        ("for parameters in (0, 1), as in AutoZI", (u(30, lo=0.01, hi=0.99), u(30, lo=0.01, hi=0.99),
                                                    u(30, lo=0.01, hi=0.99), u(30, lo=0.01, hi=0.99))),
        ("against the prior Beta(0.5, 0.5) broadcast over genes", (u(20, lo=0.02), u(20, lo=0.02), half, half)),
        ("for large parameters (up to 500)", (u(10, lo=1, hi=500), u(10, lo=1, hi=500), u(10, lo=0.1, hi=5),
                                              u(10, lo=0.1, hi=5))),
        ("for tiny parameters (1e-3)", (torch.full((3,), 1e-3, dtype=d), torch.tensor([1e-3, 0.5, 2.0], dtype=d),
                                        torch.full((3,), 0.5, dtype=d), torch.full((3,), 0.5, dtype=d))),
        ("for a (n_genes, n_batch) table", (u(6, 3, lo=0.05), u(6, 3, lo=0.05), half, half)),
    ]
    same = u(8, lo=0.05, hi=3)
    out = _call(kl_beta, name, same, same.flip(0), same, same.flip(0))
    _check_tensor(name, out, (8,), d)
    if not torch.allclose(out.detach(), torch.zeros(8, dtype=d), atol=1e-9):
        _fail(name, "KL(q || p) is not 0 when q = p.", hint)
    for where, args in cases:
        orig = _clone(*args)
        out = _call(kl_beta, name, *args)
        _check_unchanged(name, orig, args)
        _check_tensor(name, out, torch.broadcast_shapes(*[a.shape for a in args]), d)
        ref = _dist.kl_beta(*orig)
        if (out.detach() < -1e-8).any():
            _fail(name, f"negative values {where}.", "a KL divergence is never negative: check signs and direction.")
        _compare(name, out, ref, where, hint, rtol=1e-7, atol=1e-8)
    a32 = [a.float() for a in cases[0][1]]
    out = _call(kl_beta, name, *a32)
    _check_tensor(name, out, (30,), torch.float32)
    _compare(name, out, _dist.kl_beta(*cases[0][1]), "in float32", hint, rtol=1e-4, atol=1e-4)
    _pass(name, f"matches mini_scvi.distributions.kl_beta on {len(cases) + 2} inputs (q = p, AutoZI's (0, 1) "
          "range, broadcast prior, large and tiny parameters, float32).")


@_deterministic
def check_autozi_log_likelihood(autozi_log_likelihood: Callable) -> None:
    """``autozi_log_likelihood(x, mu, theta, zi_logits, delta) -> (n_cells,)``, against
    ``AutoZIModule.log_likelihood`` on a real (untrained) module's generative outputs."""
    from mini_scvi.model.autozi import AutoZIModule

    name = "autozi_log_likelihood"
    hint = ("the mixture weighs the two likelihoods themselves (not their logs) by delta and 1 - delta, "
            "but the sum must be formed in log space: log-probabilities of large counts underflow when "
            "exponentiated (chapter 7, 'Summing out the switch'). Genes are independent given delta.")
    n, G = 12, 25
    rate = torch.distributions.Gamma(0.4, 0.1).sample((n, G))
    x = torch.poisson(rate)
    x[:, 0] += 1
    batch = torch.zeros(n, dtype=torch.long)
    module = AutoZIModule(n_input=G, n_hidden=16, n_latent=3)
    cases = []
    for training in (False, True):
        module.train(training)
        with torch.no_grad():
            inf = module.inference(x, batch)
            gen = module.generative(inf["z"], inf["library"], batch)
        where = "on a real AutoZIModule " + ("(training: a sampled delta)" if training else "(evaluation: mean delta)")
        cases.append((where, (x, gen["px_rate"], gen["px_r"], gen["px_dropout"], gen["delta"])))
    g = _rng()
    d = torch.float64
    mu = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=d)
    theta = torch.tensor([10.0, 2.0, 5.0, 0.5], dtype=d)
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=d)
    big_x = torch.tensor([[600.0, 0.0, 400.0, 900.0], [0.0, 0.0, 3.0, 1.0]], dtype=d)
    cases.append(("for large counts at small means (log NB below -1000), float32",
                  (big_x.float(), mu.float(), theta.float(), logits.float(), torch.tensor([0.3, 0.9, 0.5, 0.01]))))
    cases.append(("for delta close to 0 and 1", (big_x[1:], mu, theta, logits,
                                                torch.tensor([1e-6, 1 - 1e-6, 1e-6, 1 - 1e-6], dtype=d))))
    cases.append(("for delta of shape (n_genes,), float64", (x.double()[:4, :6], torch.rand(4, 6, generator=g, dtype=d) * 5,
                                                           torch.rand(6, generator=g, dtype=d) * 3 + 0.1,
                                                           torch.randn(4, 6, generator=g, dtype=d),
                                                           torch.rand(6, generator=g, dtype=d))))
    for where, args in cases:
        orig = _clone(*args)
        out = _call(autozi_log_likelihood, name, *args)
        _check_unchanged(name, orig, args)
        _check_tensor(name, out, (args[0].shape[0],), args[0].dtype)
        o = [a.double() for a in orig]
        ref = module.log_likelihood(o[0], {"px_rate": o[1], "px_r": o[2], "px_dropout": o[3], "delta": o[4]})
        if torch.isinf(out.detach()).any():
            _fail(name, f"-inf {where}.", hint)
        h = hint
        if "delta close" in where:
            h = ("delta is the probability that the gene is NOT zero-inflated: which of the two components "
                 "should it weigh?")
        tol = 1e-3 if args[0].dtype == torch.float32 else 1e-6
        _compare(name, out, ref, where, h, rtol=1e-5, atol=tol)
    _pass(name, f"matches AutoZIModule.log_likelihood on {len(cases)} inputs (a real module in training and "
          "evaluation mode, huge counts in float32, delta near 0 and 1, per-gene delta).")


def _ref_min_dropout(h: torch.Tensor, tau: float) -> torch.Tensor:
    h = h.double()
    # logit(tau + (1 - tau) s) with s = sigmoid(h), without rounding 1 - s to 0
    return torch.log(tau + (1 - tau) * torch.sigmoid(h)) - math.log1p(-tau) + F.softplus(h)


@_deterministic
def check_minimal_dropout_logits(minimal_dropout_logits: Callable) -> None:
    """``minimal_dropout_logits(h, tau) -> logits`` of pi = tau + (1 - tau) sigmoid(h), against
    ``AutoZIModule.generative`` and, for extreme h, a float64 reference."""
    from mini_scvi.model.autozi import AutoZIModule
    from mini_scvi.model.scvi import SCVIModule

    name = "minimal_dropout_logits"
    hint = ("the result is the logit of the rescaled probability, in a form that survives float32: the "
            "trouble is 1 - pi, which rounds to 0 once sigmoid(h) rounds to 1. The identity in the statement "
            "gives log(1 - pi) without ever forming 1 - sigmoid(h) (the same idea as chapter 4, 'Trap 3').")
    module = AutoZIModule(n_input=20, n_hidden=16, n_latent=3, minimal_dropout=0.01).eval()
    z = torch.randn(10, 3)
    batch = torch.zeros(10, dtype=torch.long)
    lib = torch.full((10, 1), 7.0)
    with torch.no_grad():
        raw = SCVIModule.generative(module, z, lib, batch)["px_dropout"]
        expected = module.generative(z, lib, batch)["px_dropout"]
    g = _rng()
    cases = [("on the decoder output of a real AutoZIModule (tau = 0.01)", raw, 0.01, expected)]
    h = torch.randn(8, 10, generator=g, dtype=torch.float64) * 5
    for tau in (0.01, 0.2, 0.5, 0.0):
        cases.append((f"for tau = {tau} (float64)", h, tau, None))
    ext = torch.tensor([-50.0, -20.0, -5.0, 0.0, 5.0, 17.0, 20.0, 30.0, 50.0])
    cases.append(("for extreme h (+-50) in float32, tau = 0.01", ext, 0.01, None))
    for where, hh, tau, ref in cases:
        (orig,) = _clone(hh)
        out = _call(minimal_dropout_logits, name, hh, tau)
        _check_unchanged(name, [orig], [hh])
        _check_tensor(name, out, hh.shape, hh.dtype)
        if ref is None:
            ref = _ref_min_dropout(orig, tau)
        if ((torch.sigmoid(out.detach().double()) < tau - 1e-6)).any():
            _fail(name, f"the zero-inflation probability falls below tau {where}.", hint)
        atol = 1e-4 if hh.dtype == torch.float32 else 1e-9
        _compare(name, out, ref, where, hint, rtol=1e-5, atol=atol)
    _pass(name, f"matches AutoZIModule.generative's rescaled logits and a float64 reference on {len(cases)} "
          "inputs (tau 0 .. 0.5, h up to +-50 in float32).")


@_deterministic
def check_zi_call(zi_call: Callable) -> None:
    """``zi_call(alpha, beta, threshold) -> (zi_prob, is_zi)``: q(delta < 0.5) by scipy's Beta cdf and the
    call zi_prob > threshold, as in ``AUTOZI.get_zero_inflation``."""
    from scipy.stats import beta as beta_dist

    name = "zi_call"
    rs = np.random.default_rng(_SEED)
    a = rs.uniform(0.01, 0.99, size=50)
    b = rs.uniform(0.01, 0.99, size=50)
    keep = np.abs(a - b) > 1e-3  # alpha = beta puts q(delta < 0.5) at 0.5 up to rounding
    a, b = a[keep], b[keep]
    cases = [("for alpha, beta in (0, 1), threshold 0.5", a, b, 0.5),
             ("with threshold 0.9", a, b, 0.9), ("with threshold 0.2", a, b, 0.2),
             ("for large alpha, beta", rs.uniform(1, 300, 20), rs.uniform(1, 300, 20), 0.5),
             ("for a (n_genes, n_batch) table", a[:12].reshape(6, 2), b[:12].reshape(6, 2), 0.5)]
    for where, aa, bb, thr in cases:
        oa, ob = aa.copy(), bb.copy()
        out = _call(zi_call, name, aa, bb, thr)
        p, call = _check_pair(name, out, "(zi_prob, is_zi)")
        p = _check_array(name, p, aa.shape, "zi_prob")
        call = _check_array(name, call, aa.shape, "is_zi")
        ref = beta_dist.cdf(0.5, oa, ob)
        _compare_np(name, p, ref, f"in zi_prob {where}",
                    "delta is the probability of NOT being zero-inflated, so zero inflation is delta < 0.5: "
                    "zi_prob is the posterior mass below 0.5, a value of the Beta distribution function "
                    "(chapter 7, 'A Beta posterior per gene').", rtol=1e-7, atol=1e-9)
        if call.dtype != bool or not np.array_equal(call, ref > thr):
            _fail(name, f"wrong is_zi {where}.",
                  "the call thresholds the posterior probability zi_prob, not the posterior mean of delta.")
        if thr == 0.5 and not np.array_equal(call, oa < ob):
            _fail(name, f"at threshold 0.5 the call should agree with alpha < beta {where}.")
    _pass(name, f"matches scipy's Beta cdf and AUTOZI.get_zero_inflation's rule on {len(cases)} inputs "
          "(thresholds 0.2, 0.5, 0.9; (0, 1) and large parameters; a per-batch table).")
