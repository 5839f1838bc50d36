"""Count distributions and closed-form KL divergences (chapter 4; the KLs in chapters 3 and 7).

Parameterization follows scvi-tools: a negative binomial has mean ``mu`` and inverse dispersion
``theta`` (variance ``mu + mu**2 / theta``); zero inflation enters through logits ``zi_logits``
with ``sigmoid(zi_logits)`` the probability of an extra zero.

Everything is computed in log space. Two details matter for accuracy over the whole range
(mu 1e-6..1e5, theta 1e-3..1e5):

* ``theta * (log theta - log(theta + mu))`` is written ``-theta * log1p(mu / theta)``: the
  difference of two nearly equal logs loses every digit when theta >> mu.
* ``mu`` and ``theta`` are clamped at the smallest positive float rather than shifted by an
  ``eps``: ``log(mu + 1e-8)`` would be 1% off at mu = 1e-6.

``lgamma(x + 1)`` depends on the data alone. The ``*_log_prob`` functions include it by default
(so they equal scipy's ``logpmf``); the models pass ``include_constant=False`` and subtract a
per-cell sum computed once per minibatch instead, which saves a full pass of ``lgamma`` over the
count matrix every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, constraints


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def poisson_log_prob(x: torch.Tensor, mu: torch.Tensor, include_constant: bool = True) -> torch.Tensor:
    """log Poisson(x; mu), elementwise. x, mu: (n_cells, n_genes) (or broadcastable)."""
    res = torch.xlogy(x, mu.clamp_min(_tiny(mu))) - mu
    return res - torch.lgamma(x + 1) if include_constant else res


def nb_log_prob(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, include_constant: bool = True
) -> torch.Tensor:
    """log NB(x; mu, theta), elementwise; equals ``scipy.stats.nbinom(n=theta, p=theta/(theta+mu))``."""
    mu = mu.clamp_min(_tiny(mu))
    theta = theta.clamp_min(_tiny(theta))
    log_theta_mu = torch.log(theta + mu)
    # the two large lgammas are differenced first: adding a small log p(0) to lgamma(theta) ~ 1e6
    # before subtracting it again would round away its digits (at x = 0 this difference is exactly 0)
    res = (
        (torch.lgamma(x + theta) - torch.lgamma(theta))
        - theta * torch.log1p(mu / theta)  # theta * log(theta / (theta + mu)): log p(0) of the NB
        + x * (torch.log(mu) - log_theta_mu)
    )
    return res - torch.lgamma(x + 1) if include_constant else res


def zinb_log_prob(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor,
    include_constant: bool = True,
) -> torch.Tensor:
    """log ZINB(x; mu, theta, pi) with pi = sigmoid(zi_logits), elementwise.

    p(0) = pi + (1 - pi) NB(0) and p(x > 0) = (1 - pi) NB(x), written with softplus so that
    neither branch over- or underflows.
    """
    mu = mu.clamp_min(_tiny(mu))
    theta = theta.clamp_min(_tiny(theta))
    log_nb0 = -theta * torch.log1p(mu / theta)  # log NB(0)
    softplus_neg_pi = F.softplus(-zi_logits)  # -log(pi), with pi = sigmoid(zi_logits)
    case_zero = F.softplus(log_nb0 - zi_logits) - softplus_neg_pi
    case_nonzero = -softplus_neg_pi - zi_logits + nb_log_prob(x, mu, theta, include_constant)
    # at x == 0 lgamma(x + 1) == 0, so the constant needs no special case
    return torch.where(x < 0.5, case_zero, case_nonzero)


class _CountDistribution(Distribution):
    arg_constraints: dict = {}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu: torch.Tensor, validate_args: bool = False) -> None:
        self.mu = mu
        super().__init__(batch_shape=mu.shape, validate_args=validate_args)


class Poisson(_CountDistribution):
    """Poisson with mean ``mu``; the same interface as the NB classes below."""

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return poisson_log_prob(x, self.mu)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return torch.poisson(self.mu.expand(torch.Size(sample_shape) + self.mu.shape))


class NegativeBinomial(_CountDistribution):
    """NB with mean ``mu`` and inverse dispersion ``theta``: variance ``mu + mu^2 / theta``."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, validate_args: bool = False) -> None:
        mu, theta = torch.broadcast_tensors(mu, theta)
        self.theta = theta
        super().__init__(mu, validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        return self.mu + self.mu**2 / self.theta

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return nb_log_prob(x, self.mu, self.theta)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        # NB is a Gamma-Poisson mixture: rate ~ Gamma(shape theta, rate theta / mu)
        shape = torch.Size(sample_shape) + self.mu.shape
        rate = torch.distributions.Gamma(self.theta, self.theta / self.mu.clamp_min(_tiny(self.mu))).sample(
            sample_shape
        )
        return torch.poisson(rate.expand(shape))


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB with an extra point mass at zero of probability ``sigmoid(zi_logits)``."""

    def __init__(
        self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, validate_args: bool = False
    ) -> None:
        mu, theta, zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
        self.zi_logits = zi_logits
        super().__init__(mu, theta, validate_args)

    @property
    def zi_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        pi = self.zi_probs
        return (1 - pi) * (self.mu + self.mu**2 / self.theta) + pi * (1 - pi) * self.mu**2

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return zinb_log_prob(x, self.mu, self.theta, self.zi_logits)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        counts = super().sample(sample_shape)
        extra_zero = torch.rand_like(counts) < self.zi_probs.expand_as(counts)
        return counts.masked_fill(extra_zero, 0.0)


def kl_normal(
    mu_q: torch.Tensor, var_q: torch.Tensor, mu_p: torch.Tensor | float = 0.0, var_p: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)), elementwise (chapter 3). Sum over latent dims yourself.

    With the standard normal prior this is ``-1/2 (1 + log var_q - mu_q^2 - var_q)``.
    """
    mu_p = torch.as_tensor(mu_p, dtype=mu_q.dtype, device=mu_q.device)
    var_p = torch.as_tensor(var_p, dtype=mu_q.dtype, device=mu_q.device)
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0)


def kl_beta(
    a_q: torch.Tensor, b_q: torch.Tensor, a_p: torch.Tensor | float, b_p: torch.Tensor | float
) -> torch.Tensor:
    """KL(Beta(a_q, b_q) || Beta(a_p, b_p)), elementwise (chapter 7: AutoZI's global term)."""
    a_p = torch.as_tensor(a_p, dtype=a_q.dtype, device=a_q.device)
    b_p = torch.as_tensor(b_p, dtype=a_q.dtype, device=a_q.device)

    def log_beta_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    dig_sum = torch.digamma(a_q + b_q)
    return (
        log_beta_fn(a_p, b_p)
        - log_beta_fn(a_q, b_q)
        + (a_q - a_p) * (torch.digamma(a_q) - dig_sum)
        + (b_q - b_p) * (torch.digamma(b_q) - dig_sum)
    )


# ---------------------------------------------------------------------------------------------
# The training path: the same log-likelihoods with hand-written gradients (chapter 5).
#
# On a CPU, one training step of scVI spends most of its time not in the networks but in the
# ~40 elementwise operations autograd records for the ZINB above: each one a pass over the
# (cells x genes) minibatch, and backward doubles them. Two facts make a faster version easy:
# most counts are zero (over 90% in pbmc3k), and at x = 0 the NB reduces to
# log NB(0) = -theta log1p(mu / theta); the lgamma / digamma terms are needed only where x > 0.
# So the function below computes the zero case for every entry, the rest only at the non-zero
# entries, and writes the gradients out by hand. Its values and gradients are tested against
# ``zinb_log_prob`` / ``nb_log_prob`` and autograd (tests/test_distributions.py).


def _at(a: torch.Tensor, shape: torch.Size, nz: torch.Tensor) -> torch.Tensor:
    """``a`` broadcast to ``shape``, flattened, at the positions ``nz``: (len(nz),)."""
    return a.expand(shape).reshape(-1).take(nz)


class _NBMixtureLogProb(torch.autograd.Function):
    """log ZINB(x; mu, theta, sigmoid(zi)) elementwise, or log NB(x; mu, theta) when ``zi`` is None,
    without the data-only term ``lgamma(x + 1)``. Gradients for mu, theta and zi (not x).

    ``nonzero``: the positions of the non-zero counts in the flattened broadcast shape, when the
    caller already knows them (the data layer reads them off a sparse matrix); else found here.
    ``with_nb``: also return log NB(x) from the same terms, ``(log ZINB, log NB)``: AutoZI needs both
    (chapter 7), and they share log NB(0), the lgammas and the gathers.
    """

    @staticmethod
    def forward(ctx, x, mu, theta, zi, nonzero, with_nb=False):
        shape = torch.broadcast_shapes(x.shape, mu.shape, theta.shape, *(() if zi is None else (zi.shape,)))
        mu = mu.clamp_min(_tiny(mu))
        theta = theta.clamp_min(_tiny(theta))
        log_nb0 = torch.log1p(mu / theta).mul_(-theta)  # log NB(0), every entry
        if zi is None:
            out = log_nb0.expand(shape).clone()
            w = one_minus_pi = None
        else:
            # p(0) = pi + (1 - pi) NB(0) as it is written: two sigmoids, an exp and a log cost half
            # of chapter 4's two softplus, and are as exact unless both terms underflow
            one_minus_pi = torch.sigmoid(-zi)
            nb_zero = torch.exp(log_nb0) * one_minus_pi
            p_zero = torch.sigmoid(zi) + nb_zero
            if p_zero.min() > _tiny(p_zero) / torch.finfo(p_zero.dtype).eps:
                out = torch.log(p_zero).expand(shape).contiguous()
                w = nb_zero.div_(p_zero)  # P(an observed zero came from the NB), for backward
            else:  # somewhere p(0) is below float precision: the softplus form, slower but exact
                t = log_nb0 - zi
                out = (F.softplus(t) - F.softplus(-zi)).expand(shape).contiguous()
                w = torch.sigmoid(t)
        # where x > 0: log(1 - pi) + log NB(x); lgamma and log only at these entries
        nz = torch.nonzero(x.expand(shape).reshape(-1)).squeeze(1) if nonzero is None else nonzero
        xs, ms, ts = (_at(a, shape, nz) for a in (x, mu, theta))
        # with one theta per gene, lgamma(theta) on the genes and look it up: fewer entries
        per_gene = theta.numel() < nz.numel()
        lgamma_ts = _at(torch.lgamma(theta), shape, nz) if per_gene else torch.lgamma(ts)
        log_nb = (torch.lgamma(xs + ts) - lgamma_ts) + xs * (torch.log(ms) - torch.log(ts + ms)) + _at(log_nb0, shape, nz)
        rest = log_nb if zi is None else log_nb - F.softplus(_at(zi, shape, nz))  # + log(1 - pi)
        out.view(-1).index_put_((nz,), rest)
        ctx.save_for_backward(nz, xs, ms, ts, mu, theta, log_nb0, w, one_minus_pi)
        ctx.shapes = (shape, mu.shape, theta.shape, None if zi is None else zi.shape, per_gene)
        if not with_nb:
            return out
        out_nb = log_nb0.expand(shape).clone()  # the NB alone: log NB(0) at the zeros, log_nb elsewhere
        out_nb.view(-1).index_put_((nz,), log_nb)
        return out, out_nb

    @staticmethod
    def backward(ctx, grad, grad_nb=None):
        nz, xs, ms, ts, mu, theta, log_nb0, w, one_minus_pi = ctx.saved_tensors
        shape, mu_shape, theta_shape, zi_shape, per_gene = ctx.shapes
        grad = grad.expand(shape)
        g_nz = _at(grad, shape, nz)
        # d out / d log NB(0): w at the zeros of a ZINB, 1 at the zeros of an NB and where x > 0
        d_nb0 = (grad.clone() if w is None else grad * w).expand(shape).contiguous()
        g_nb_nz = g_nz  # gradient reaching the x > 0 terms log NB(x)
        if grad_nb is not None:  # with_nb: the NB output adds its own gradient, 1 x grad_nb everywhere
            d_nb0 += grad_nb
            g_nb_nz = g_nz + _at(grad_nb, shape, nz)
        d_nb0.view(-1).index_put_((nz,), g_nb_nz)
        # log NB(0) = -theta log1p(mu / theta):
        # d/dmu = -theta / (theta + mu), d/dtheta = mu / (theta + mu) + log NB(0) / theta
        q = torch.reciprocal(theta + mu)
        d_mu = (d_nb0 * q).mul_(-theta)
        d_theta = d_nb0 * q.mul_(mu).add_(log_nb0 / theta)
        # the x > 0 entries add x (log mu - log(theta + mu)) + lgamma(x + theta) - lgamma(theta)
        inv = 1.0 / (ts + ms)
        d_mu.view(-1).index_put_((nz,), g_nb_nz * (xs / ms - xs * inv), accumulate=True)
        digamma_ts = _at(torch.digamma(theta), shape, nz) if per_gene else torch.digamma(ts)
        d_theta.view(-1).index_put_((nz,), g_nb_nz * (torch.digamma(xs + ts) - digamma_ts - xs * inv), accumulate=True)
        grads = [None, d_mu.sum_to_size(mu_shape), d_theta.sum_to_size(theta_shape), None, None, None]
        if w is not None:
            d_zi = (one_minus_pi - w) * grad  # at zeros: (1 - pi) - w
            d_zi.view(-1).index_put_((nz,), g_nz * (_at(one_minus_pi, shape, nz) - 1.0))  # x > 0: -pi
            grads[3] = d_zi.sum_to_size(zi_shape)
        return tuple(grads)


def nb_log_prob_fast(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """``nb_log_prob(x, mu, theta, include_constant=False)``, faster to train with (chapter 5).

    ``nonzero``: optional int64 positions of the non-zero counts in the flattened broadcast shape."""
    return _NBMixtureLogProb.apply(x, mu, theta, None, nonzero)


def zinb_log_prob_fast(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, nonzero: torch.Tensor | None = None
) -> torch.Tensor:
    """``zinb_log_prob(x, mu, theta, zi_logits, include_constant=False)``, faster to train with (chapter 5).

    ``nonzero``: optional int64 positions of the non-zero counts in the flattened broadcast shape."""
    return _NBMixtureLogProb.apply(x, mu, theta, zi_logits, nonzero)


def nb_and_zinb_log_prob_fast(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, nonzero: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(zinb_log_prob_fast(...), nb_log_prob_fast(...))`` in one pass (chapter 7: AutoZI's two branches).

    The NB terms both need (log NB(0), the lgammas at the non-zero counts) are computed once."""
    return _NBMixtureLogProb.apply(x, mu, theta, zi_logits, nonzero, True)
