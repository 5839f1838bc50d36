"""Checks for exercises/ex03_vae.ipynb (chapter 3: variational autoencoders)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mini_scvi import distributions as _dist
from mini_scvi.model.vae import VAEModule

from ._common import (add_questions, _call, _check_tensor, _check_unchanged, _clone, _compare, _deterministic,
                      _fail, _pass, _rng)

__all__ = ["check_reparameterize", "check_kl_standard_normal", "check_vae_loss"]

add_questions({
    "ex03-obs-var": (
        "abcd",
        "926c40887ffd4c2e53563012440f0832343c872abc20178365ad77e7a2736e31",
        "multiply the whole loss by obs_var (which does not move its minimum) and read off the weight "
        "that the KL term now carries relative to the squared error.",
    ),
    "ex03-collapse": (
        "abcd",
        "f77febf60ee3f960002bcbf2449b420dcb478011b7a9cc826cd1f10a2e800388",
        "KL(q(z | x) || N(0, I)) is zero exactly when q(z | x) is N(0, I). What does z then tell the decoder "
        "about x?",
    ),
})


@_deterministic
def check_reparameterize(reparameterize: Callable) -> None:
    """``reparameterize(mu, var) -> z``: a differentiable draw from N(mu, var). Checked by its law
    (mean, variance, independence) and its gradients, the properties of
    ``mini_scvi.nn.reparameterize``."""
    name = "reparameterize"
    n, d = 4000, 6
    mu = (torch.rand(n, d) * 6 - 3).requires_grad_()
    log_var = torch.rand(n, d) * 8 - 4  # var from e^-4 to e^4
    var = log_var.exp().requires_grad_()
    orig = _clone(mu, var)
    z = _call(reparameterize, name, mu, var)
    _check_unchanged(name, orig, [mu, var])
    _check_tensor(name, z, (n, d), mu.dtype, "z")
    if not z.requires_grad:
        _fail(name, "z does not depend on mu and var through the autograd graph.",
              "the randomness must enter through noise that does not depend on mu and var, so that z stays "
              "a differentiable function of them; a sampler's .sample() or torch.normal(...) cuts the graph "
              "(chapter 3, 'The reparameterization trick').")
    eps = ((z - mu) / var.sqrt()).detach()
    if not torch.isfinite(eps).all():
        _fail(name, "z contains nan or inf.")
    col_mean, col_std = eps.mean(0), eps.std(0)
    if (col_mean.abs() > 5 / math.sqrt(n)).any() or ((col_std - 1).abs() > 0.06).any():
        _fail(name, "z does not have mean mu and variance var.",
              "standard normal noise must be shifted and scaled into N(mu, var): is the second argument a "
              "variance, a standard deviation or a log-variance, and which of them scales the noise?")
    corr = torch.corrcoef(eps.T) - torch.eye(d)
    if corr.abs().max() > 0.1:
        _fail(name, "the noise is correlated across latent dimensions.",
              "every cell and every latent dimension needs noise of its own, independent of the rest.")
    if (eps[: n // 2] - eps[n // 2 :]).abs().max() < 1e-6 or eps.std(1).mean() < 0.5:
        _fail(name, "the noise is shared between cells or dimensions.",
              "every cell and every latent dimension needs noise of its own, independent of the rest.")
    z.sum().backward()
    if mu.grad is None or var.grad is None:
        _fail(name, "no gradient reaches mu or var.", "z must be computed from mu and var, not from detached copies or a sampler.")
    if not torch.allclose(mu.grad, torch.ones_like(mu), atol=1e-5):
        _fail(name, "dz/dmu should be 1 for every entry.", "mu only shifts z.")
    expected_grad = ((z - mu) / (2 * var)).detach()  # d/dvar sqrt(var) * eps = eps / (2 sqrt(var))
    if not torch.allclose(var.grad, expected_grad, rtol=1e-3, atol=1e-5):
        _fail(name, "dz/dvar is wrong.", "var should enter only through the standard deviation, and the noise must not depend on var.")
    z2 = _call(reparameterize, name, mu.detach(), var.detach())
    if torch.equal(z2, z.detach()):
        _fail(name, "two calls return the same z.", "draw fresh noise on every call (no fixed seed inside).")
    # float64 in, float64 out; a tiny variance gives z close to mu
    mu64 = torch.randn(50, 3, dtype=torch.float64)
    z64 = _call(reparameterize, name, mu64, torch.full((50, 3), 1e-12, dtype=torch.float64))
    _check_tensor(name, z64, (50, 3), torch.float64, "z (float64 inputs)")
    if not torch.allclose(z64, mu64, atol=1e-4):
        _fail(name, "with var close to 0, z should be close to mu.")
    _pass(name, "z ~ N(mu, var) with independent noise per entry, and gradients dz/dmu, dz/dvar are right "
          "(the properties of mini_scvi.nn.reparameterize).")


@_deterministic
def check_kl_standard_normal(kl_standard_normal: Callable) -> None:
    """``kl_standard_normal(mu, var) -> (...,)``: KL(N(mu, var) || N(0, I)) summed over the last axis,
    against ``mini_scvi.distributions.kl_normal(mu, var).sum(-1)``."""
    name = "kl_standard_normal"
    hint = ("derive the KL of one latent dimension from E_q[log q(z) - log p(z)], as the statement outlines "
            "(chapter 3, 'The KL term in closed form'); the dimensions are independent, so their KLs add up "
            "over the last axis.")
    g = _rng()
    cases = [
        ("on random inputs", torch.randn(32, 10, generator=g), torch.rand(32, 10, generator=g) * 3 + 0.05),
        ("in float64", torch.randn(8, 4, generator=g, dtype=torch.float64),
         torch.rand(8, 4, generator=g, dtype=torch.float64) + 0.5),
        ("for a tiny variance (1e-6)", torch.randn(5, 3, generator=g), torch.full((5, 3), 1e-6)),
        ("for a huge variance (1e4)", torch.randn(5, 3, generator=g), torch.full((5, 3), 1e4)),
        ("for a huge mean (1e3)", torch.full((4, 2), 1e3), torch.ones(4, 2)),
        ("for a batch of shape (3, 7, 4)", torch.randn(3, 7, 4, generator=g), torch.rand(3, 7, 4, generator=g) + 0.1),
        ("for one latent dimension", torch.randn(6, 1, generator=g), torch.rand(6, 1, generator=g) + 0.1),
    ]
    # q equal to the prior: the KL must be exactly zero
    zero_mu, one_var = torch.zeros(3, 5), torch.ones(3, 5)
    out = _call(kl_standard_normal, name, zero_mu, one_var)
    _check_tensor(name, out, (3,), torch.float32)
    if not torch.allclose(out.detach(), torch.zeros(3), atol=1e-6):
        _fail(name, "KL(q || p) is not 0 when q = p (mu = 0, var = 1).",
              "a KL is zero when q = p: check the constant terms of your derivation at mu = 0, var = 1.")
    for where, mu, var in cases:
        orig = _clone(mu, var)
        out = _call(kl_standard_normal, name, mu, var)
        _check_unchanged(name, orig, [mu, var])
        _check_tensor(name, out, mu.shape[:-1], mu.dtype)
        if (out.detach() < -1e-6).any():
            _fail(name, f"negative values {where}.", "a KL divergence is never negative: check the signs.")
        expected = _dist.kl_normal(*orig).sum(-1)
        _compare(name, out, expected, where, hint, rtol=1e-5, atol=1e-5)
    _pass(name, f"matches mini_scvi.distributions.kl_normal(mu, var).sum(-1) on {len(cases) + 1} inputs "
          "(q = prior, tiny and huge variances, huge means, batch shapes, float64).")


@_deterministic
def check_vae_loss(vae_loss: Callable) -> None:
    """``vae_loss(x_log, x_hat, qz_m, qz_v, obs_var=1.0, kl_weight=1.0) -> scalar``, against
    ``mini_scvi.model.vae.VAEModule.loss(...).loss``."""
    name = "vae_loss"
    cases = []
    for obs_var, kl_weight, n, dtype in [
        (1.0, 0.0, 16, torch.float32), (1.0, 1.0, 16, torch.float32), (1.0, 0.3, 16, torch.float32),
        (0.1, 1.0, 10, torch.float32), (10.0, 0.3, 10, torch.float32), (2.0, 1.0, 5, torch.float64),
        (1.0, 1.0, 1, torch.float32),
    ]:
        g_, d_ = 30, 4
        x_log = torch.rand(n, g_, dtype=dtype) * 4
        x_hat = torch.randn(n, g_, dtype=dtype)
        qz_m = torch.randn(n, d_, dtype=dtype)
        qz_v = torch.rand(n, d_, dtype=dtype) + 0.05
        cases.append((obs_var, kl_weight, x_log, x_hat, qz_m, qz_v))
    # a real forward pass of an (untrained) mini_scvi VAEModule on counts
    module = VAEModule(n_input=40, n_latent=3, hidden_sizes=(16,), obs_var=0.5).eval()
    counts = torch.poisson(torch.full((12, 40), 2.0)) + torch.eye(12, 40)
    with torch.no_grad():
        inf = module.inference(counts)
        gen = module.generative(inf["z"])
    cases.append((0.5, 1.0, inf["x_log"], gen["x_hat"], inf["qz_m"], inf["qz_v"]))

    for obs_var, kl_weight, x_log, x_hat, qz_m, qz_v in cases:
        where = (f"for obs_var={obs_var}, kl_weight={kl_weight}, {x_log.shape[0]} cell(s), "
                 f"{str(x_log.dtype).replace('torch.', '')}")
        module = VAEModule(n_input=x_log.shape[1], n_latent=qz_m.shape[1], hidden_sizes=(4,), obs_var=obs_var)
        orig = _clone(x_log, x_hat, qz_m, qz_v)
        out = _call(vae_loss, name, x_log, x_hat, qz_m, qz_v, obs_var=obs_var, kl_weight=kl_weight)
        _check_unchanged(name, orig, [x_log, x_hat, qz_m, qz_v])
        _check_tensor(name, out, (), x_log.dtype, "the loss")
        ref = module.loss({}, {"x_log": orig[0], "qz_m": orig[2], "qz_v": orig[3]}, {"x_hat": orig[1]},
                          kl_weight=kl_weight).loss
        if kl_weight == 0.0:
            hint = ("with kl_weight=0 only the reconstruction term is left: the negative log-density of a "
                    "Gaussian with mean x_hat and variance obs_var, normalizing constant included, for every "
                    "gene of a cell; then the mean over cells (chapter 3, 'The Gaussian VAE in mini_scvi').")
        elif obs_var == 1.0 and kl_weight == 1.0:
            hint = ("the reconstruction term passed (the kl_weight=0 case), so look at the KL term: which sign "
                    "does it carry in the negative ELBO, and is it taken per cell, like the reconstruction, "
                    "before the mean over cells? (chapter 3, 'The ELBO, step by step')")
        elif obs_var == 1.0:
            hint = "kl_weight=0 and kl_weight=1 passed: which term, and only that one, does kl_weight weigh?"
        else:
            hint = ("obs_var=1 passed, other values fail: the variance of a Gaussian appears in two places of "
                    "its log-density, the scale of the squared error and the normalizing constant.")
        _compare(name, out, ref, where, hint, rtol=1e-5, atol=1e-5)
    _pass(name, f"matches mini_scvi's VAEModule.loss on {len(cases)} inputs (obs_var 0.1 .. 10, kl_weight 0 .. 1, "
          "one cell, float64, a real forward pass).")
