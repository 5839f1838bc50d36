"""Tests for mini_scvi.distributions against independent references.

* log-likelihoods against scipy.stats (and, for the NB, against mpmath at 50 digits),
* include_constant=False against the full value,
* gradients: finite on the whole grid, equal to finite differences at moderate points,
* sample moments against .mean/.variance, and those against scipy,
* kl_normal against torch.distributions, kl_beta against numerical integration.

Run with: python -m pytest -q tests/test_distributions.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sc
import scipy.stats as st
import torch
from scipy.integrate import quad

from mini_scvi.distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    kl_beta,
    kl_normal,
    nb_log_prob,
    nb_log_prob_fast,
    poisson_log_prob,
    zinb_log_prob,
    zinb_log_prob_fast,
)

# ---------------------------------------------------------------------------------------------
# The grid: log-spaced mu, theta and counts over the range the models meet, plus x = 0.
# ---------------------------------------------------------------------------------------------
MUS = np.logspace(-6, 5, 12)  # 1e-6 .. 1e5
THETAS = np.logspace(-3, 5, 9)  # 1e-3 .. 1e5
XS = np.concatenate([[0.0], np.round(np.logspace(0, 4, 9))])  # 0, 1, 3, 10, 32, ..., 1e4
ZI_LOGITS = np.array([-20.0, -3.0, 0.0, 2.0, 20.0])  # pi from 2e-9 to 1 - 2e-9

# The comparisons use rtol 1e-6. scipy's nbinom takes p = theta / (theta + mu), which rounds
# towards 1 when theta >> mu: at mu = 1e-6, theta = 1e5 it keeps only ~5 correct digits of
# log p(0) = -theta * log1p(mu / theta) ~ -1e-6 (see test_nb_log_prob_matches_mpmath). Those
# true values are near 0, so a tiny absolute tolerance on the log-probability is legitimate.
RTOL, ATOL = 1e-6, 1e-8


def _grid(*axes: np.ndarray) -> list[np.ndarray]:
    """Every combination of the given axes, as flat arrays."""
    return [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]


def _t(*arrays: np.ndarray, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=dtype) for a in arrays]


def _scipy_nb_logpmf(x, mu, theta):
    return st.nbinom.logpmf(x, theta, theta / (theta + mu))


def _scipy_zinb_logpmf(x, mu, theta, zi_logits):
    """ZINB assembled from scipy: p(0) = pi + (1 - pi) NB(0), p(x > 0) = (1 - pi) NB(x)."""
    log_pi, log_one_minus_pi = sc.log_expit(zi_logits), sc.log_expit(-zi_logits)
    log_nb = _scipy_nb_logpmf(x, mu, theta)
    return np.where(x == 0, np.logaddexp(log_pi, log_one_minus_pi + log_nb), log_one_minus_pi + log_nb)


# ---------------------------------------------------------------------------------------------
# Log-likelihoods
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["function", "class"])
def test_poisson_log_prob_matches_scipy(api):
    x, mu = _grid(XS, MUS)
    xt, mut = _t(x, mu)
    ours = poisson_log_prob(xt, mut) if api == "function" else Poisson(mut).log_prob(xt)
    np.testing.assert_allclose(ours.numpy(), st.poisson.logpmf(x, mu), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("api", ["function", "class"])
def test_nb_log_prob_matches_scipy(api):
    x, mu, theta = _grid(XS, MUS, THETAS)
    xt, mut, thetat = _t(x, mu, theta)
    ours = nb_log_prob(xt, mut, thetat) if api == "function" else NegativeBinomial(mut, thetat).log_prob(xt)
    np.testing.assert_allclose(ours.numpy(), _scipy_nb_logpmf(x, mu, theta), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("api", ["function", "class"])
def test_zinb_log_prob_matches_scipy(api):
    x, mu, theta, zi = _grid(XS, MUS, THETAS, ZI_LOGITS)
    xt, mut, thetat, zit = _t(x, mu, theta, zi)
    if api == "function":
        ours = zinb_log_prob(xt, mut, thetat, zit)
    else:
        ours = ZeroInflatedNegativeBinomial(mut, thetat, zit).log_prob(xt)
    np.testing.assert_allclose(ours.numpy(), _scipy_zinb_logpmf(x, mu, theta, zi), rtol=RTOL, atol=ATOL)


def test_nb_log_prob_matches_mpmath():
    """50-digit reference, no absolute tolerance: ours is far more accurate than scipy here.

    This is the test that catches summation-order and cancellation errors near log p = 0,
    which the scipy comparison has to forgive.
    """
    mp = pytest.importorskip("mpmath")
    x, mu, theta = _grid(np.array([0.0, 1.0, 100.0, 1e4]), MUS, THETAS)
    ours = nb_log_prob(*_t(x, mu, theta)).numpy()
    with mp.workdps(50):

        def ref(k, m, t):
            k, m, t = mp.mpf(k), mp.mpf(m), mp.mpf(t)
            return float(
                mp.loggamma(k + t) - mp.loggamma(t) - mp.loggamma(k + 1)
                + t * mp.log(t / (t + m)) + k * mp.log(m / (t + m))
            )

        expected = np.array([ref(*args) for args in zip(x, mu, theta)])
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("fn", ["poisson", "nb", "zinb"])
def test_zero_mean_is_finite(fn):
    """A decoder's softmax can underflow to mu = 0: clamping keeps log p finite, p(0 | mu = 0) = 1."""
    x = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    theta = torch.full((3,), 2.0, dtype=torch.float64)
    out = {
        "poisson": lambda: poisson_log_prob(x, mu),
        "nb": lambda: nb_log_prob(x, mu, theta),
        "zinb": lambda: zinb_log_prob(x, mu, theta, torch.full_like(theta, -30.0)),
    }[fn]()
    (grad,) = torch.autograd.grad(out.sum(), mu)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert abs(out[0].item()) < 1e-12


@pytest.mark.parametrize("fn", ["poisson", "nb", "zinb"])
def test_include_constant_false_drops_exactly_lgamma(fn):
    x, mu, theta, zi = _grid(XS, MUS, THETAS, ZI_LOGITS)
    xt, mut, thetat, zit = _t(x, mu, theta, zi)
    call = {
        "poisson": lambda c: poisson_log_prob(xt, mut, include_constant=c),
        "nb": lambda c: nb_log_prob(xt, mut, thetat, include_constant=c),
        "zinb": lambda c: zinb_log_prob(xt, mut, thetat, zit, include_constant=c),
    }[fn]
    full, partial = call(True).numpy(), call(False).numpy()
    const = sc.gammaln(x + 1)
    # equal up to the rounding of one subtraction: a few ulps of the largest term involved
    bound = 4 * np.finfo(np.float64).eps * (np.abs(partial) + const)
    assert np.all(np.abs(full - (partial - const)) <= bound)
    assert np.array_equal(full[x == 0], partial[x == 0])  # lgamma(1) = 0


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn", ["poisson", "nb", "zinb"])
def test_gradients_finite_on_grid(fn, dtype):
    x, mu, theta, zi = _t(*_grid(XS, MUS, THETAS, ZI_LOGITS), dtype=dtype)
    params = {"mu": mu, "theta": theta, "zi_logits": zi}
    wrt = {"poisson": ["mu"], "nb": ["mu", "theta"], "zinb": ["mu", "theta", "zi_logits"]}[fn]
    for name in wrt:
        params[name].requires_grad_(True)
    out = {
        "poisson": lambda: poisson_log_prob(x, mu),
        "nb": lambda: nb_log_prob(x, mu, theta),
        "zinb": lambda: zinb_log_prob(x, mu, theta, zi),
    }[fn]()
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), [params[name] for name in wrt])
    for name, grad in zip(wrt, grads):
        assert torch.isfinite(grad).all(), f"non-finite d/d{name} at {(~torch.isfinite(grad)).sum()} points"


# moderate points, x = 0 included so both ZINB branches are checked
_GC_X = torch.tensor([0.0, 0.0, 1.0, 3.0, 10.0, 25.0], dtype=torch.float64)
_GC_MU = torch.tensor([0.5, 4.0, 2.0, 7.0, 20.0, 3.0], dtype=torch.float64)
_GC_THETA = torch.tensor([0.7, 5.0, 1.3, 12.0, 100.0, 0.2], dtype=torch.float64)
_GC_ZI = torch.tensor([-2.0, 1.0, 0.0, 1.5, -0.5, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("fn", ["poisson", "nb", "zinb"])
def test_gradients_match_finite_differences(fn):
    inputs = {
        "poisson": (lambda mu: poisson_log_prob(_GC_X, mu), (_GC_MU,)),
        "nb": (lambda mu, theta: nb_log_prob(_GC_X, mu, theta), (_GC_MU, _GC_THETA)),
        "zinb": (lambda mu, theta, zi: zinb_log_prob(_GC_X, mu, theta, zi), (_GC_MU, _GC_THETA, _GC_ZI)),
    }
    func, args = inputs[fn]
    assert torch.autograd.gradcheck(func, tuple(a.clone().requires_grad_(True) for a in args))


def test_kl_gradients_match_finite_differences():
    mu_q = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64, requires_grad=True)
    var_q = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, v: kl_normal(m, v, 0.5, 2.0), (mu_q, var_q))
    a_q = torch.tensor([0.06, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    b_q = torch.tensor([0.9, 0.2, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kl_beta(a, b, 0.5, 0.5), (a_q, b_q))


# ---------------------------------------------------------------------------------------------
# Moments: sampling agrees with .mean/.variance, which agree with scipy
# ---------------------------------------------------------------------------------------------
_MOM_MU = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
_MOM_THETA = torch.tensor([0.3, 2.0, 10.0], dtype=torch.float64)
_MOM_ZI = torch.tensor([-1.0, 0.0, 1.5], dtype=torch.float64)  # pi = 0.27, 0.5, 0.82
_DISTS = {
    "poisson": lambda: Poisson(_MOM_MU),
    "nb": lambda: NegativeBinomial(_MOM_MU, _MOM_THETA),
    "zinb": lambda: ZeroInflatedNegativeBinomial(_MOM_MU, _MOM_THETA, _MOM_ZI),
}


@pytest.mark.parametrize("name", list(_DISTS))
def test_sample_moments_match_mean_and_variance(name):
    dist = _DISTS[name]()
    n = 200_000
    torch.manual_seed(0)
    samples = dist.sample((n,))
    assert samples.shape == (n, 3)
    assert torch.all(samples >= 0) and torch.all(samples == samples.round())

    # Standard errors estimated from the sample itself (independent of the formulas under test):
    # SE(mean) = sqrt(s^2 / n), SE(s^2) = sqrt((m4 - s^4) / n), m4 the 4th central moment.
    # 5 SE: a correct formula fails with probability ~1e-6 per check; the seed is fixed anyway.
    mean, var = samples.mean(0), samples.var(0)
    m4 = ((samples - mean) ** 4).mean(0)
    se_mean, se_var = (var / n).sqrt(), ((m4 - var**2) / n).sqrt()
    assert torch.all((mean - dist.mean).abs() < 5 * se_mean), (mean, dist.mean, se_mean)
    assert torch.all((var - dist.variance).abs() < 5 * se_var), (var, dist.variance, se_var)


@pytest.mark.parametrize("name", list(_DISTS))
def test_mean_and_variance_match_scipy(name):
    dist = _DISTS[name]()
    mu, theta, zi = _MOM_MU.numpy(), _MOM_THETA.numpy(), _MOM_ZI.numpy()
    if name == "poisson":
        mean, var = st.poisson.stats(mu, moments="mv")
    else:
        mean, var = st.nbinom.stats(theta, theta / (theta + mu), moments="mv")
        if name == "zinb":  # mixture with a point mass at 0: E[X^2] = (1 - pi) E_NB[X^2]
            keep = 1 - sc.expit(zi)
            mean, var = keep * mean, keep * (var + mean**2) - (keep * mean) ** 2
    np.testing.assert_allclose(dist.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(dist.variance.numpy(), var, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# KL divergences
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["default", "standard", "wide", "narrow", "per-element"])
def test_kl_normal_matches_torch(prior):
    g = torch.Generator().manual_seed(0)
    mu_q = torch.randn(50, 4, generator=g, dtype=torch.float64) * 2
    var_q = torch.exp(torch.randn(50, 4, generator=g, dtype=torch.float64) * 2)
    mu_p, var_p = {
        "default": (0.0, 1.0),
        "standard": (0.0, 1.0),
        "wide": (0.5, 2.0),
        "narrow": (-3.0, 0.01),
        "per-element": (torch.randn(4, generator=g, dtype=torch.float64),
                        torch.exp(torch.randn(4, generator=g, dtype=torch.float64))),
    }[prior]
    ours = kl_normal(mu_q, var_q) if prior == "default" else kl_normal(mu_q, var_q, mu_p, var_p)
    q = torch.distributions.Normal(mu_q, var_q.sqrt())
    p = torch.distributions.Normal(torch.as_tensor(mu_p, dtype=torch.float64),
                                   torch.as_tensor(var_p, dtype=torch.float64).sqrt())
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p), rtol=1e-12, atol=1e-12)


def _kl_beta_quad(a_q: float, b_q: float, a_p: float, b_p: float) -> float:
    """KL(q || p) = int_0^1 q(t) log(q(t) / p(t)) dt by scipy.integrate.quad on scipy.stats.beta.

    Two things make plain quad on [0, 1] fail for the a, b < 1 that AutoZI produces:
    * q is singular at both ends, and for b_q = 0.05 a sixth of its mass lies within 1e-16 of
      t = 1, where doubles cannot resolve it. So integrate [0, 1/2] for (q, p) and for the
      mirrored (Beta(b, a) is Beta(a, b) under t -> 1 - t): every singularity then sits at 0.
    * the t^(a - 1) singularity: substitute t = e^s, dt = t ds; the integrand q(t) t log(q/p)
      then decays like e^(a s) and is smooth. Truncate at e^(a s) ~ e^-40 (or s = -700).
    """

    def half(a_q, b_q, a_p, b_p):
        q, p = st.beta(a_q, b_q), st.beta(a_p, b_p)

        def integrand(s):
            t = math.exp(s)
            log_q = q.logpdf(t)
            return math.exp(log_q + s) * (log_q - p.logpdf(t))

        lower = max(-700.0, -40.0 / a_q)
        value, abserr = quad(integrand, lower, math.log(0.5), limit=100, epsabs=1e-12, epsrel=1e-9)
        assert abserr < 1e-8
        return value

    return half(a_q, b_q, a_p, b_p) + half(b_q, a_q, b_p, a_p)


@pytest.mark.parametrize(
    "a_q, b_q, a_p, b_p",
    [
        (2.0, 3.0, 1.0, 1.0),  # moderate q, uniform prior
        (0.2, 0.7, 0.3, 0.7),  # non-symmetric prior (0.3, 0.7)
        (3.0, 0.4, 0.3, 0.7),
        (0.06, 0.9, 0.5, 0.5),  # AutoZI: a_q, b_q in (0.05, 1), prior 0.5 / 0.5
        (0.95, 0.06, 0.5, 0.5),
        (0.3, 0.3, 0.5, 0.5),
        (0.7, 0.1, 0.5, 0.5),
    ],
)
def test_kl_beta_matches_quadrature(a_q, b_q, a_p, b_p):
    ours = kl_beta(torch.tensor(a_q, dtype=torch.float64), torch.tensor(b_q, dtype=torch.float64), a_p, b_p)
    assert ours.item() == pytest.approx(_kl_beta_quad(a_q, b_q, a_p, b_p), rel=1e-7, abs=1e-10)


def test_kl_beta_zero_iff_equal():
    a = torch.tensor([0.5, 0.06, 2.0], dtype=torch.float64)
    b = torch.tensor([0.5, 0.9, 7.0], dtype=torch.float64)
    torch.testing.assert_close(kl_beta(a, b, a, b), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(kl_beta(a, b, 0.3, 0.7) > 0)


# ---------------------------------------------------------------------------------------------
# The training path (hand-written gradients) against the readable functions and autograd
# ---------------------------------------------------------------------------------------------
def _fast_and_reference(fn):
    if fn == "nb":
        return (lambda x, mu, theta, zi: nb_log_prob_fast(x, mu, theta),
                lambda x, mu, theta, zi: nb_log_prob(x, mu, theta, include_constant=False), 2)
    return zinb_log_prob_fast, lambda x, mu, theta, zi: zinb_log_prob(x, mu, theta, zi, include_constant=False), 3


@pytest.mark.parametrize("fn", ["nb", "zinb"])
def test_fast_log_prob_equals_readable_on_grid(fn):
    fast, ref, n_params = _fast_and_reference(fn)
    x, mu, theta, zi = _t(*_grid(XS, MUS, THETAS, ZI_LOGITS))
    params = [t.requires_grad_(True) for t in (mu, theta, zi)[:n_params]]
    a, b = fast(x, mu, theta, zi), ref(x, mu, theta, zi)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for g_fast, g_ref in zip(torch.autograd.grad(a.sum(), params), torch.autograd.grad(b.sum(), params)):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)


# the shapes the models pass: theta per gene (G,) or per cell (n, G); zero-inflation per cell or per gene
_SHAPES = [((6, 5), (5,), (6, 5)), ((6, 5), (6, 5), (5,)), ((6, 5), (6, 5), (6, 5)), ((6, 1), (5,), (6, 5)),
           ((5,), (5,), (5,))]  # the last: only the counts have a cell axis


@pytest.mark.parametrize("fn", ["nb", "zinb"])
@pytest.mark.parametrize("shapes", _SHAPES)
def test_fast_log_prob_gradients_match_finite_differences(fn, shapes):
    fast, ref, n_params = _fast_and_reference(fn)
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((6, 5), 2.0, dtype=torch.float64), generator=gen)
    x[0] = 0.0  # a cell with no counts and entries on both sides of zero
    mu_shape, theta_shape, zi_shape = shapes
    mu = torch.rand(mu_shape, dtype=torch.float64, generator=gen) * 5 + 0.05
    theta = torch.rand(theta_shape, dtype=torch.float64, generator=gen) * 3 + 0.1
    zi = torch.randn(zi_shape, dtype=torch.float64, generator=gen)
    args = tuple(t.requires_grad_(True) for t in (mu, theta, zi)[:n_params])
    assert torch.autograd.gradcheck(lambda *p: fast(x, *p, *(zi,) * (3 - n_params)), args)
    torch.testing.assert_close(fast(x, mu, theta, zi), ref(x, mu, theta, zi).expand(6, 5))


@pytest.mark.parametrize("fn", ["nb", "zinb"])
@pytest.mark.parametrize("fill", [0.0, 3.0])
def test_fast_log_prob_all_zero_and_all_nonzero(fn, fill):
    fast, ref, n_params = _fast_and_reference(fn)
    x = torch.full((4, 3), fill)
    mu, theta, zi = torch.full((4, 3), 2.0), torch.full((3,), 0.5), torch.zeros(4, 3)
    params = [t.requires_grad_(True) for t in (mu, theta, zi)[:n_params]]
    a, b = fast(x, mu, theta, zi), ref(x, mu, theta, zi)
    torch.testing.assert_close(a, b)
    for g_fast, g_ref in zip(torch.autograd.grad(a.sum(), params), torch.autograd.grad(b.sum(), params)):
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_zinb_where_p_zero_underflows(dtype):
    # p(0) = pi + (1 - pi) NB(0) below the smallest float: a very negative zero-inflation logit and
    # a highly expressed gene with a zero count. The fast path switches to the softplus form there.
    x = torch.tensor([0.0, 0.0, 4.0, 0.0], dtype=dtype)
    mu = torch.tensor([1e5, 2.0, 3.0, 1e5], dtype=dtype, requires_grad=True)
    theta = torch.tensor([1e3, 1.0, 2.0, 1e3], dtype=dtype, requires_grad=True)
    zi = torch.tensor([-2000.0, 0.5, -1.0, 3.0], dtype=dtype, requires_grad=True)
    a = zinb_log_prob_fast(x, mu, theta, zi)
    b = zinb_log_prob(x, mu, theta, zi, include_constant=False)
    assert torch.isfinite(a).all() and a[0].item() == pytest.approx(-2000.0)  # log(pi), as NB(0) ~ e^-4615
    torch.testing.assert_close(a, b)
    for g_fast, g_ref in zip(torch.autograd.grad(a.sum(), (mu, theta, zi)), torch.autograd.grad(b.sum(), (mu, theta, zi))):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref)


@pytest.mark.parametrize("fn", ["nb", "zinb"])
def test_fast_log_prob_with_given_nonzero_positions(fn):
    # the data layer passes the positions of the non-zero counts; the result must not change
    gen = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((7, 9), 0.4, dtype=torch.float64), generator=gen)
    mu = (torch.rand(7, 9, dtype=torch.float64, generator=gen) * 4 + 0.1).requires_grad_(True)
    theta = (torch.rand(9, dtype=torch.float64, generator=gen) + 0.2).requires_grad_(True)
    zi = torch.randn(7, 9, dtype=torch.float64, generator=gen).requires_grad_(True)
    nonzero = torch.nonzero(x.reshape(-1)).squeeze(1)
    assert 0 < len(nonzero) < x.numel()
    if fn == "nb":
        given, found, params = nb_log_prob_fast(x, mu, theta, nonzero), nb_log_prob_fast(x, mu, theta), (mu, theta)
    else:
        given, found, params = zinb_log_prob_fast(x, mu, theta, zi, nonzero), zinb_log_prob_fast(x, mu, theta, zi), (mu, theta, zi)
    torch.testing.assert_close(given, found, rtol=0, atol=0)
    for g1, g2 in zip(torch.autograd.grad(given.sum(), params), torch.autograd.grad(found.sum(), params)):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda *p: (nb_log_prob_fast(x, *p[:2], nonzero) if fn == "nb"
                                                else zinb_log_prob_fast(x, *p, nonzero)), params)


def test_nb_and_zinb_in_one_pass_equal_the_two_separate_calls():
    """AutoZI's two branches from one pass (chapter 7): same values, and gradients of any mixture of
    the two outputs equal the readable functions' (a wrong NB gradient term would fail here)."""
    from mini_scvi.distributions import nb_and_zinb_log_prob_fast

    x, mu, theta, zi = _t(*_grid(XS, MUS, THETAS, ZI_LOGITS))
    params = [t.requires_grad_(True) for t in (mu, theta, zi)]
    zinb, nb = nb_and_zinb_log_prob_fast(x, mu, theta, zi)
    zinb_ref = zinb_log_prob(x, mu, theta, zi, include_constant=False)
    nb_ref = nb_log_prob(x, mu, theta, include_constant=False)
    torch.testing.assert_close(zinb, zinb_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nb, nb_ref, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.1, 0.9, x.numel(), dtype=x.dtype).reshape(x.shape)
    fast = torch.autograd.grad((weights * zinb + (1 - weights) * 2 * nb).sum(), params)
    ref = torch.autograd.grad((weights * zinb_ref + (1 - weights) * 2 * nb_ref).sum(), params)
    for g_fast, g_ref in zip(fast, ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)
