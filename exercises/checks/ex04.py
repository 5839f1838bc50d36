"""Checks for exercises/ex04_count_likelihoods.ipynb (chapter 4: count likelihoods)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mini_scvi import distributions as _dist

from ._common import (add_questions, _call, _check_tensor, _check_unchanged, _clone, _compare, _deterministic,
                      _fail, _pass, _rng)

__all__ = ["check_log_poisson", "check_log_nb", "check_log_zinb", "check_sample_nb"]

add_questions({
    "ex04-zeros": (
        "abcd",
        "4275929a87a11abf84826f0a44550d13f0b17c739f2586b533bc137082ed0feb",
        "work out the probability of a zero that each model gives at this mean (chapter 1, 'Zeros: more "
        "than a Poisson model predicts') and compare both with the observed fraction.",
    ),
})


def _random_counts_params(g: torch.Generator, shape, dtype=torch.float64):
    mu = torch.exp(torch.rand(shape, generator=g, dtype=dtype) * 13 - 5)  # 7e-3 .. 3e3
    theta = torch.exp(torch.rand(shape, generator=g, dtype=dtype) * 11 - 3)  # 5e-2 .. 3e3
    rate = torch.distributions.Gamma(theta, theta / mu).sample()
    x = torch.poisson(rate, generator=g)
    x[..., :3] = 0.0  # always some zeros
    return x, mu, theta


_EPS32 = torch.finfo(torch.float32).eps


def _compare_cases(name: str, fn: Callable, ref: Callable, args_list, hint_by_case: dict[str, str], generic: str,
                   rtol: float, atol: float, float32_scale: Callable | None = None) -> int:
    """Compare fn with ref on each (where, args). float32 inputs are compared with the float64
    reference, allowing a rounding error of a few float32 ulps of ``float32_scale(*args)``, the
    size of the largest terms of the formula (so any sensible order of operations passes)."""
    n = 0
    for where, args in args_list:
        orig = _clone(*args)
        out = _call(fn, name, *args)
        _check_unchanged(name, orig, args)
        shape = torch.broadcast_shapes(*[a.shape for a in args])
        _check_tensor(name, out, shape, args[0].dtype)
        tol = atol
        if args[0].dtype == torch.float32 and float32_scale is not None:
            orig = [a.double() for a in orig]
            tol = atol + 64 * _EPS32 * float32_scale(*orig)
        _compare(name, out, ref(*orig), where, hint_by_case.get(where, generic), rtol=rtol, atol=tol)
        n += 1
    return n


def _poisson_scale(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return (x * mu.log()).abs() + mu + torch.lgamma(x + 1)


def _nb_scale(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (torch.lgamma(x + theta).abs() + torch.lgamma(theta).abs() + torch.lgamma(x + 1)
            + theta * torch.log1p(mu / theta) + (x * torch.log(mu / (theta + mu))).abs())


@_deterministic
def check_log_poisson(log_poisson: Callable) -> None:
    """``log_poisson(x, mu)``: elementwise log Poisson(x; mu), constant included, against
    ``mini_scvi.distributions.poisson_log_prob``."""
    name = "log_poisson"
    generic = ("take the log of the Poisson probability term by term, normalizing constant included "
               "(chapter 4, 'Poisson'); compute the log of a factorial with a log-Gamma function, never the "
               "factorial itself.")
    g = _rng()
    mu = torch.exp(torch.rand(20, 30, generator=g, dtype=torch.float64) * 13 - 5)
    x = torch.poisson(mu, generator=g)
    x_small = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    mu_small = torch.tensor([0.5, 3.0, 0.5, 3.0], dtype=torch.float64)
    cases = [
        ("for x in {0, 1}", (x_small, mu_small)),
        ("on random counts (float64)", (x, mu)),
        ("at x = 0 with mu = 1e-8 and mu = 1e5", (torch.zeros(2, dtype=torch.float64),
                                                  torch.tensor([1e-8, 1e5], dtype=torch.float64))),
        ("for large counts (x ~ 1e5)", (torch.tensor([99_000.0, 1e5, 101_000.0], dtype=torch.float64),
                                        torch.full((3,), 1e5, dtype=torch.float64))),
        ("with mu of shape (n_genes,) broadcast over cells", (x[:, :5], mu[0, :5])),
        ("in float32", (x.float(), mu.float())),
    ]
    n = _compare_cases(name, log_poisson, _dist.poisson_log_prob, cases,
                       {"on random counts (float64)": "x in {0, 1} passed, larger counts fail: look at the term "
                        "that vanishes at x = 0 and x = 1, and at how you compute it."}, generic, rtol=1e-6, atol=1e-6,
                       float32_scale=_poisson_scale)
    _pass(name, f"matches mini_scvi.distributions.poisson_log_prob on {n} inputs "
          "(random, tiny and huge means, large counts, broadcasting, float32).")


@_deterministic
def check_log_nb(log_nb: Callable) -> None:
    """``log_nb(x, mu, theta)``: elementwise log NB(x; mean mu, inverse dispersion theta), constant
    included, against ``mini_scvi.distributions.nb_log_prob``, including float32 at theta >> mu."""
    name = "log_nb"
    generic = ("take the log of the NB probability term by term, Gamma functions as log-Gamma (chapter 4, "
               "'Negative binomial'). Is mu the mean and theta the inverse dispersion (not swapped, not "
               "inverted)?")
    g = _rng()
    x, mu, theta = _random_counts_params(g, (25, 40))
    d = torch.float64
    grid_mu = torch.tensor([1e-6, 1e-6, 1e5, 1e5, 1.0, 1.0, 50.0], dtype=d)
    grid_theta = torch.tensor([1e-3, 1e5, 1e-3, 1e5, 1e-3, 1e5, 2.0], dtype=d)
    cases = [
        ("at x = 0 (float64)", (torch.zeros(7, dtype=d), grid_mu, grid_theta)),
        ("on random counts (float64)", (x, mu, theta)),
        ("at extreme mu (1e-6, 1e5) and theta (1e-3, 1e5)", (torch.tensor([0.0, 1, 1e5, 0, 3, 0, 40], dtype=d),
                                                          grid_mu, grid_theta)),
        ("with theta of shape (n_genes,) (one per gene, as in scVI)", (x[:, :6], mu[:, :6], theta[0, :6])),
        ("in float32 for moderate parameters", (x.clamp_max(1e3).float(), mu.clamp_max(1e3).float(),
                                                theta.clamp_max(1e2).float())),
    ]
    n = _compare_cases(name, log_nb, _dist.nb_log_prob, cases[:4],
                       {"on random counts (float64)": "x = 0 passed, x > 0 fails: check the terms that depend "
                        "on x (the ones that vanish at x = 0)."},
                       generic, rtol=1e-7, atol=1e-7)
    n += _compare_cases(name, log_nb, _dist.nb_log_prob, cases[4:], {}, generic, rtol=1e-5, atol=1e-5,
                        float32_scale=_nb_scale)
    # the numerically hard case: float32, x = 0, theta >> mu. The exact value is about -mu.
    mu32 = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 1e-3, 0.1], dtype=torch.float32)
    theta32 = torch.tensor([1e4, 1e5, 1e5, 1e6, 1e6, 1e4], dtype=torch.float32)
    x32 = torch.zeros(6)
    out = _call(log_nb, name, x32, mu32, theta32)
    _check_tensor(name, out, (6,), torch.float32)
    expected = _dist.nb_log_prob(x32.double(), mu32.double(), theta32.double())
    _compare(name, out, expected, "in float32 at x = 0 when theta >> mu (theta up to 1e6, mu down to 1e-3)",
             "here the exact value is about -mu, a small number, and float32 loses it in two ways: cancellation "
             "when theta + mu rounds to theta, and a small term added to a huge one before the huge ones cancel. "
             "Chapter 4, 'Trap 2: cancellation', shows the stable form.", rtol=1e-3, atol=0.0)
    _pass(name, f"matches mini_scvi.distributions.nb_log_prob on {n + 1} inputs (random, extreme mu and theta, "
          "per-gene theta, float32 including theta >> mu).")


@_deterministic
def check_log_zinb(log_zinb: Callable) -> None:
    """``log_zinb(x, mu, theta, zi_logits)``: elementwise log ZINB, against
    ``mini_scvi.distributions.zinb_log_prob``, including extreme logits in float32."""
    name = "log_zinb"
    generic = ("a ZINB count is an extra zero with probability sigmoid(zi_logits), and an NB draw otherwise: "
               "a zero can come from either source, a positive count only from the NB (chapter 4, "
               "'Zero-inflated negative binomial').")
    g = _rng()
    x, mu, theta = _random_counts_params(g, (25, 40))
    logits = torch.rand(25, 40, generator=g, dtype=torch.float64) * 10 - 5
    d = torch.float64
    cases = [
        ("at x > 0 (float64)", (x.clamp_min(1.0), mu, theta, logits)),
        ("at x = 0 (float64)", (torch.zeros_like(x), mu, theta, logits)),
        ("on random counts (float64)", (x, mu, theta, logits)),
        ("with zi_logits = -30 (almost no zero inflation)", (x, mu, theta, torch.full_like(x, -30.0))),
        ("with zi_logits of shape (n_genes,)", (x[:, :6], mu[:, :6], theta[:, :6], logits[0, :6])),
    ]
    hints = {
        "at x > 0 (float64)": "for x > 0 only the NB source can have produced the count: how likely was it "
                              "not to be an extra zero?",
        "at x = 0 (float64)": "x > 0 passed; at x = 0 the two sources of zeros add up.",
    }
    n = _compare_cases(name, log_zinb, _dist.zinb_log_prob, cases, hints, generic, rtol=1e-7, atol=1e-7)
    # extremes in float32: |logits| up to 100, NB(0) down to exp(-700)
    l32 = torch.tensor([-100.0, -60.0, 60.0, 100.0, -100.0, 100.0, 60.0, -60.0, 0.0])
    x32 = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 200.0, 200.0, 0.0])
    mu32 = torch.tensor([1e5, 1e5, 1e5, 10.0, 4.0, 4.0, 1e3, 1e3, 1e5])
    th32 = torch.tensor([100.0, 100.0, 10.0, 1.0, 2.0, 2.0, 10.0, 10.0, 100.0])
    out = _call(log_zinb, name, x32, mu32, th32, l32)
    _check_tensor(name, out, (9,), torch.float32)
    expected = _dist.zinb_log_prob(x32.double(), mu32.double(), th32.double(), l32.double())
    _compare(name, out, expected, "in float32 for extreme zi_logits (+-60, +-100) and tiny NB(0)",
             "at large |zi_logits| the sigmoid rounds to 0 or 1 and its log to -inf: work with the logits in "
             "log space (softplus) and never form the probabilities (chapter 4, 'Trap 3: the zero case of "
             "the ZINB').", rtol=1e-4,
             atol=1e-4 + 64 * _EPS32 * (_nb_scale(x32.double(), mu32.double(), th32.double()) + l32.double().abs()))
    _pass(name, f"matches mini_scvi.distributions.zinb_log_prob on {n + 1} inputs (both branches, "
          "per-gene logits, float32 with extreme logits).")


def _nb_moments(mu: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    var = mu + mu**2 / theta
    p0 = torch.exp(_dist.nb_log_prob(torch.zeros_like(mu), mu, theta))
    return mu, var, p0


@_deterministic
def check_sample_nb(sample_nb: Callable) -> None:
    """``sample_nb(mu, theta, n_samples) -> (n_samples, *mu.shape)``, checked statistically against the
    NB(mu, theta) law used by ``mini_scvi.distributions.NegativeBinomial``: mean, variance and P(x = 0)."""
    name = "sample_nb"
    mu = torch.tensor([0.5, 5.0, 5.0, 50.0, 2.0, 200.0, 0.05])
    theta = torch.tensor([0.5, 0.5, 10.0, 2.0, 1000.0, 5.0, 1.0])
    n = 20000
    orig = _clone(mu, theta)
    x = _call(sample_nb, name, mu, theta, n)
    _check_unchanged(name, orig, [mu, theta])
    if not isinstance(x, torch.Tensor):
        _fail(name, f"should return a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape) != (n, *mu.shape):
        _fail(name, f"returned shape {tuple(x.shape)}, expected (n_samples, *mu.shape) = {(n, *mu.shape)}.",
              "draw all samples at once: a Gamma sample of shape (n_samples, *mu.shape), then Poisson.")
    x = x.detach().double()
    if not torch.isfinite(x).all() or (x < 0).any() or not torch.equal(x, x.round()):
        _fail(name, "samples must be finite, non-negative whole numbers (counts).")
    exp_mean, exp_var, exp_p0 = _nb_moments(mu.double(), theta.double())
    mean, var = x.mean(0), x.var(0)
    p0 = (x == 0).double().mean(0)
    se_mean = (exp_var / n).sqrt()
    centred = x - mean
    se_var = (((centred**4).mean(0) - var**2).clamp_min(0) / n).sqrt()
    se_p0 = (exp_p0 * (1 - exp_p0) / n).sqrt()
    bad_mean = ((mean - exp_mean).abs() > 5 * se_mean + 1e-3).nonzero().flatten().tolist()
    if bad_mean:
        pairs = ", ".join(f"(mu={mu[i].item():g}, theta={theta[i].item():g})" for i in bad_mean)
        _fail(name, f"the sample mean is not mu for {pairs}.",
              "the Gamma-distributed rate must have mean mu and shape theta: check how torch's Gamma is "
              "parameterized (a rate, where numpy takes a scale) and what its mean is.")
    bad_var = ((var - exp_var).abs() > 6 * se_var + 0.02 * exp_var).nonzero().flatten().tolist()
    if bad_var:
        pairs = ", ".join(f"(mu={mu[i].item():g}, theta={theta[i].item():g})" for i in bad_var)
        _fail(name, f"the sample variance is not the NB's variance for {pairs}.",
              "a Poisson alone has variance mu: the extra variance comes from letting the rate itself vary "
              "from draw to draw (chapter 1, 'How noisy is a count?').")
    bad_p0 = ((p0 - exp_p0).abs() > 5 * se_p0 + 1e-3).nonzero().flatten().tolist()
    if bad_p0:
        pairs = ", ".join(f"(mu={mu[i].item():g}, theta={theta[i].item():g})" for i in bad_p0)
        _fail(name, f"the fraction of zeros is not NB(0; mu, theta) for {pairs}.",
              "the NB is a Gamma-Poisson mixture: a random rate first, then a count given that rate.")
    m2 = torch.tensor([[1.0, 10.0], [100.0, 0.3]])
    x2 = _call(sample_nb, name, m2, torch.tensor([[2.0, 2.0], [2.0, 2.0]]), 3)
    if not isinstance(x2, torch.Tensor) or tuple(x2.shape) != (3, 2, 2):
        _fail(name, "for mu and theta of shape (2, 2) and n_samples=3 the result should have shape (3, 2, 2).")
    _pass(name, f"{n} samples for {len(mu)} (mu, theta) pairs have the NB mean, variance and fraction of zeros.")
