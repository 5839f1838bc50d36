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
