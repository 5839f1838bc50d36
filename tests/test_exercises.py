"""Tests of the exercise system (exercises/): checkers, student versions, grading, notebooks.

* every checker accepts a correct implementation and rejects plausible wrong ones;
* ``make_student.py`` removes every solution and hidden test, and clears outputs;
* an untouched student notebook fails exactly at the exercise check cells, with NotImplementedError;
* every check cell of the instructor notebooks is stored with PASS and compared by nbval
  (``make test`` runs nbval over exercises/, which re-executes them);
* ``make_student.py --grade`` puts a student's answers into the instructor notebook and reports them;
* ``make_student.py --book`` writes book sources with no solutions.

The notebook tests execute notebooks with nbclient (a few seconds to half a minute each).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy import stats as _scipy_stats
from scipy.stats import beta as _beta_dist

from mini_scvi.distributions import nb_log_prob as _nb_lp, zinb_log_prob as _zinb_lp

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "exercises"
NOTEBOOKS = [
    "ex01_counts.ipynb", "ex02_autoencoders.ipynb", "ex03_vae.ipynb", "ex04_count_likelihoods.ipynb",
    "ex05_scvi.ipynb", "ex06_scvi_downstream.ipynb", "ex07_autozi.ipynb", "ex08_comparing.ipynb",
]
MARKERS = ["### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"]


def _load(name: str, path: Path):
    """Import a module, or a package when ``path`` is a folder, from its file(s)."""
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


checks = _load("checks", EX / "checks")
make_student = _load("make_student", EX / "make_student.py")
CHECK_FILES = sorted((EX / "checks").glob("*.py"))


# --------------------------------------------------------------------------- correct implementations


def log_normalize(x, target_sum=1e4):
    return torch.log1p(x / x.sum(dim=-1, keepdim=True) * target_sum)


def _mlp(h, layers, act=torch.relu, last=None):
    for i, layer in enumerate(layers):
        h = layer(h)
        if i < len(layers) - 1:
            h = act(h)
        elif last is not None:
            h = last(h)
    return h


def ae_forward(x_log, encoder_layers, decoder_layers):
    z = _mlp(x_log, encoder_layers)
    return z, _mlp(z, decoder_layers)


def reconstruction_loss(x_log, x_hat):
    return ((x_log - x_hat) ** 2).sum(dim=-1)


def pca_reconstruction(x, k):
    mean = x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    v = vh[:k].T
    return (x - mean) @ v @ v.T + mean


def reparameterize(mu, var):
    return mu + var.sqrt() * torch.randn_like(mu)


def kl_standard_normal(mu, var):
    return 0.5 * (mu**2 + var - 1.0 - torch.log(var)).sum(dim=-1)


def vae_loss(x_log, x_hat, qz_m, qz_v, obs_var=1.0, kl_weight=1.0):
    rec = 0.5 * ((x_log - x_hat) ** 2 / obs_var + math.log(2 * math.pi * obs_var)).sum(-1)
    return (rec + kl_weight * kl_standard_normal(qz_m, qz_v)).mean()


def log_poisson(x, mu):
    return x * torch.log(mu) - mu - torch.lgamma(x + 1)


def log_nb(x, mu, theta):
    return (
        (torch.lgamma(x + theta) - torch.lgamma(theta))  # difference of two large numbers first
        - theta * torch.log1p(mu / theta)
        + x * (torch.log(mu) - torch.log(theta + mu))
        - torch.lgamma(x + 1)
    )


def log_zinb(x, mu, theta, zi_logits):
    log_nb0 = -theta * torch.log1p(mu / theta)
    zero = F.softplus(log_nb0 - zi_logits) - F.softplus(-zi_logits)
    nonzero = -F.softplus(zi_logits) + log_nb(x, mu, theta)
    return torch.where(x == 0, zero, nonzero)


def sample_nb(mu, theta, n_samples):
    rate = torch.distributions.Gamma(theta, theta / mu).sample((n_samples,))
    return torch.poisson(rate)


# --------------------------------------------------------------------------- plausible wrong ones


def _naive_nb(x, mu, theta):  # theta * log(theta / (theta + mu)): cancels in float32 when theta >> mu
    return (
        (torch.lgamma(x + theta) - torch.lgamma(theta))
        + theta * (torch.log(theta) - torch.log(theta + mu))
        + x * (torch.log(mu) - torch.log(theta + mu))
        - torch.lgamma(x + 1)
    )


def _nb_small_plus_large(x, mu, theta):  # log1p form, but the small log p(0) is added to lgamma(theta) ~ 1e6
    return (
        -theta * torch.log1p(mu / theta)
        + x * (torch.log(mu) - torch.log(theta + mu))
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def _naive_zinb(x, mu, theta, zi_logits):  # log of sigmoid probabilities: -inf at large |logits|
    pi = torch.sigmoid(zi_logits)
    nb = log_nb(x, mu, theta)
    return torch.where(x == 0, torch.log(pi + (1 - pi) * torch.exp(nb)), torch.log(1 - pi) + nb)


def _reparam_shared_noise(mu, var):
    return mu + var.sqrt() * torch.randn(mu.shape[-1])


def _reparam_fixed_seed(mu, var):
    g = torch.Generator().manual_seed(0)
    return mu + var.sqrt() * torch.randn(mu.shape, generator=g, dtype=mu.dtype)


WRONG = {
    "check_log_normalize": [
        lambda x, target_sum=1e4: torch.log(x / x.sum(-1, keepdim=True) * target_sum),  # log, not log1p
        lambda x, target_sum=1e4: torch.log1p(x / x.sum(0, keepdim=True) * target_sum),  # per gene
        lambda x, target_sum=1e4: torch.log1p(x / x.sum(-1, keepdim=True)),  # target_sum forgotten
        lambda x, target_sum=1e4: torch.log1p(x * target_sum / 1e4),  # no per-cell scaling
    ],
    "check_ae_forward": [
        lambda x, e, d: (_mlp(x, e, last=torch.relu), _mlp(_mlp(x, e, last=torch.relu), d)),  # ReLU on z
        lambda x, e, d: (_mlp(x, e), _mlp(_mlp(x, e), d, last=torch.relu)),  # ReLU on x_hat
        lambda x, e, d: (_mlp(x, e, act=lambda t: t), _mlp(_mlp(x, e, act=lambda t: t), d, act=lambda t: t)),
        lambda x, e, d: (_mlp(x, e, act=torch.sigmoid), _mlp(_mlp(x, e, act=torch.sigmoid), d, act=torch.sigmoid)),
        lambda x, e, d: (_mlp(x, e), _mlp(_mlp(x, e), d[::-1])) if len(d) == 1 else (_mlp(x, e), None),
        lambda x, e, d: tuple(t.detach() for t in ae_forward(x, e, d)),  # cuts the graph
    ],
    "check_reconstruction_loss": [
        lambda a, b: ((a - b) ** 2).mean(-1),  # averaged over genes
        lambda a, b: ((a - b) ** 2).sum(),  # a scalar
        lambda a, b: (a - b).abs().sum(-1),  # absolute error
        lambda a, b: ((a - b) ** 2).sum(0),  # summed over cells
        lambda a, b: (a - b).sum(-1) ** 2,  # square of the sum
    ],
    "check_pca_reconstruction": [
        lambda x, k: (lambda v: x @ v @ v.T)(torch.linalg.svd(x, full_matrices=False)[2][:k].T),  # no centring
        lambda x, k: (lambda m: (lambda v: (x - m) @ v @ v.T)(torch.linalg.svd(x - m, full_matrices=False)[2][:k].T))(
            x.mean(0)),  # mean not added back
        lambda x, k: (lambda m: (lambda v: (x - m) @ v @ v.T + m)(torch.linalg.svd(x - m, full_matrices=False)[2][-k:].T))(
            x.mean(0)),  # smallest components
    ],
    "check_reparameterize": [
        lambda mu, var: mu + var * torch.randn_like(mu),  # var instead of std
        lambda mu, var: torch.normal(mu.detach(), var.detach().sqrt()),  # no gradient
        lambda mu, var: torch.distributions.Normal(mu, var.sqrt()).sample(),  # .sample(), not .rsample()
        lambda mu, var: mu + torch.exp(var) * torch.randn_like(mu),  # var read as log-variance
        _reparam_shared_noise,
        _reparam_fixed_seed,
    ],
    "check_kl_standard_normal": [
        lambda mu, var: -kl_standard_normal(mu, var),  # wrong sign
        lambda mu, var: 0.5 * (mu**2 + var - torch.log(var)).sum(-1),  # missing -1
        lambda mu, var: 0.5 * (mu**2 + var - 1 - 0.5 * torch.log(var)).sum(-1),  # log sigma, not log var
        lambda mu, var: 0.5 * (mu**2 + var - 1 - torch.log(var)),  # not summed
        lambda mu, var: 0.5 * (mu**2 + var - 1 - torch.log(var)).mean(-1),  # averaged
        lambda mu, var: (mu**2 + var - 1 - torch.log(var)).sum(-1),  # missing 1/2
    ],
    "check_vae_loss": [
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (  # no log(2 pi obs_var)
            0.5 * ((a - b) ** 2 / obs_var).sum(-1) + kl_weight * kl_standard_normal(m, v)).mean(),
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (  # KL subtracted
            0.5 * ((a - b) ** 2 / obs_var + math.log(2 * math.pi * obs_var)).sum(-1)
            - kl_weight * kl_standard_normal(m, v)).mean(),
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (  # summed over cells
            0.5 * ((a - b) ** 2 / obs_var + math.log(2 * math.pi * obs_var)).sum(-1)
            + kl_weight * kl_standard_normal(m, v)).sum(),
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (  # obs_var ignored
            0.5 * ((a - b) ** 2 + math.log(2 * math.pi)).sum(-1) + kl_weight * kl_standard_normal(m, v)).mean(),
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (  # kl_weight on the wrong term
            kl_weight * 0.5 * ((a - b) ** 2 / obs_var + math.log(2 * math.pi * obs_var)).sum(-1)
            + kl_standard_normal(m, v)).mean(),
    ],
    "check_log_poisson": [
        lambda x, mu: x * torch.log(mu) - mu,  # no log(x!)
        lambda x, mu: x * torch.log(mu) - mu - torch.lgamma(x),  # lgamma(x), not lgamma(x + 1)
        lambda x, mu: x * torch.log(mu) + mu - torch.lgamma(x + 1),  # sign of mu
    ],
    "check_log_nb": [
        lambda x, mu, theta: log_nb(x, mu, theta) + torch.lgamma(x + 1),  # no log(x!)
        lambda x, mu, theta: log_nb(x, theta, mu),  # mu and theta swapped
        _naive_nb,  # unstable when theta >> mu
        _nb_small_plus_large,  # rounds away log p(0) next to lgamma(theta)
        lambda x, mu, theta: log_nb(x, mu, 1.0 / theta),  # theta read as the dispersion
        lambda x, mu, theta: log_nb(x, mu, theta) + torch.lgamma(theta) - torch.lgamma(x + theta),  # no Gammas
    ],
    "check_log_zinb": [
        lambda x, mu, theta, l: -F.softplus(l) + log_nb(x, mu, theta),  # no extra zeros at x = 0
        lambda x, mu, theta, l: log_zinb(x, mu, theta, -l),  # pi and 1 - pi swapped
        _naive_zinb,  # log of sigmoid: -inf at extreme logits
        lambda x, mu, theta, l: torch.where(x == 0, -F.softplus(-l), -F.softplus(l) + log_nb(x, mu, theta)),
    ],
    "check_sample_nb": [
        lambda mu, theta, n: torch.poisson(mu.expand(n, *mu.shape)),  # Poisson: no overdispersion
        lambda mu, theta, n: torch.poisson(torch.distributions.Gamma(theta, mu / theta).sample((n,))),  # scale as rate
        lambda mu, theta, n: torch.poisson(torch.distributions.Gamma(theta, 1 / mu).sample((n,))),  # rate 1/mu
        lambda mu, theta, n: torch.poisson(torch.distributions.Gamma(mu, mu / theta).sample((n,))),  # swapped
        lambda mu, theta, n: torch.distributions.Gamma(theta, theta / mu).sample((n,)),  # no Poisson: not counts
        lambda mu, theta, n: torch.normal(mu.expand(n, *mu.shape), (mu + mu**2 / theta).sqrt().expand(n, *mu.shape))
        .round()
        .clamp_min(0),  # a rounded normal with the right mean and variance
    ],
}

CORRECT = {
    "check_log_normalize": log_normalize,
    "check_ae_forward": ae_forward,
    "check_reconstruction_loss": reconstruction_loss,
    "check_pca_reconstruction": pca_reconstruction,
    "check_reparameterize": reparameterize,
    "check_kl_standard_normal": kl_standard_normal,
    "check_vae_loss": vae_loss,
    "check_log_poisson": log_poisson,
    "check_log_nb": log_nb,
    "check_log_zinb": log_zinb,
    "check_sample_nb": sample_nb,
}

# other correct ways of writing the same thing: a checker must not insist on one order of operations
Normal = torch.distributions.Normal
ALTERNATIVES = {
    "check_log_normalize": [lambda x, target_sum=1e4: torch.log1p(x * (target_sum / x.sum(1, keepdim=True)))],
    "check_ae_forward": [
        lambda x, e, d: (lambda z: (z, _mlp(z, d, act=F.relu)))(_mlp(x, e, act=F.relu)),
    ],
    "check_reconstruction_loss": [lambda a, b: F.mse_loss(b, a, reduction="none").sum(1)],
    "check_pca_reconstruction": [
        lambda x, k: (lambda m, usv: (usv[0][:, :k] * usv[1][:k]) @ usv[2][:k] + m)(
            x.mean(0), torch.linalg.svd(x - x.mean(0), full_matrices=True)),
    ],
    "check_reparameterize": [
        lambda mu, var: Normal(mu, var.sqrt()).rsample(),
        lambda mu, var: torch.randn_like(var) * torch.exp(0.5 * torch.log(var)) + mu,
    ],
    "check_kl_standard_normal": [
        lambda mu, var: torch.distributions.kl_divergence(Normal(mu, var.sqrt()), Normal(0.0, 1.0)).sum(-1),
    ],
    "check_vae_loss": [
        lambda a, b, m, v, obs_var=1.0, kl_weight=1.0: (
            -Normal(b, math.sqrt(obs_var)).log_prob(a).sum(-1)
            + kl_weight * torch.distributions.kl_divergence(Normal(m, v.sqrt()), Normal(0.0, 1.0)).sum(-1)
        ).mean(),
    ],
    "check_log_poisson": [
        lambda x, mu: torch.distributions.Poisson(mu).log_prob(x),
        lambda x, mu: -torch.lgamma(x + 1) - mu + x * torch.log(mu),
    ],
    "check_log_nb": [
        lambda x, mu, theta: (
            -theta * torch.log1p(mu / theta)
            + x * torch.log(mu)
            - x * torch.log(theta + mu)
            - torch.lgamma(x + 1)
            + (torch.lgamma(x + theta) - torch.lgamma(theta))
        ),
    ],
    "check_log_zinb": [
        lambda x, mu, theta, l: torch.where(
            x > 0.5,
            -F.softplus(-l) - l + log_nb(x, mu, theta),
            F.softplus(-theta * torch.log1p(mu / theta) - l) - F.softplus(-l),
        ),
    ],
    "check_sample_nb": [
        lambda mu, theta, n: torch.distributions.NegativeBinomial(theta, probs=mu / (theta + mu)).sample((n,)),
    ],
}

# the package's own functions, where their signature fits, must pass too
PACKAGE = {
    "check_log_normalize": "mini_scvi.model.ae.log_normalize",
    "check_reparameterize": "mini_scvi.nn.reparameterize",
    "check_log_poisson": "mini_scvi.distributions.poisson_log_prob",
    "check_log_nb": "mini_scvi.distributions.nb_log_prob",
    "check_log_zinb": "mini_scvi.distributions.zinb_log_prob",
}


# --------------------------------------------------------------------------- exercises 5-7: correct implementations

def library_prior(counts, batch, n_batch):
    log_totals = np.log(np.asarray(counts, dtype=np.float64).sum(1))
    means, variances = np.zeros(n_batch), np.ones(n_batch)
    for b in range(n_batch):
        lb = log_totals[batch == b]
        means[b] = lb.mean()
        variances[b] = lb.var() if len(lb) > 1 else 1.0
    return means, np.maximum(variances, 1e-4)


def kl_library(ql_m, ql_v, batch_index, prior_means, prior_vars):
    m_b = prior_means[batch_index].unsqueeze(-1)
    v_b = prior_vars[batch_index].unsqueeze(-1)
    return 0.5 * (torch.log(v_b / ql_v) + (ql_v + (ql_m - m_b) ** 2) / v_b - 1.0).sum(-1)


def scvi_generative(scale_logits, px_r, library):
    rho = torch.softmax(scale_logits, dim=-1)
    return rho, torch.exp(library) * rho, torch.exp(px_r)


def scvi_loss(x, mu, theta, zi_logits, qz_m, qz_v, kl_l, kl_weight):
    rec = -_zinb_lp(x, mu, theta, zi_logits).sum(-1)
    kl_z = kl_standard_normal(qz_m, qz_v)
    return rec + kl_weight * kl_z + kl_l


def kl_weight_at(epoch, n_epochs_kl_warmup):
    if not n_epochs_kl_warmup:
        return 1.0
    return min(1.0, epoch / n_epochs_kl_warmup)


def de_probabilities(rho1, rho2, mode="vanilla", delta=0.25, pseudocount=1e-4):
    eps = 1e-8
    if mode == "vanilla":
        p = (rho1 > rho2).mean(0)
    else:
        lfc = np.log2(rho1 + pseudocount) - np.log2(rho2 + pseudocount)
        p = (np.abs(lfc) >= delta).mean(0)
    return p, np.log(p + eps) - np.log(1 - p + eps)


def log_marginal(log_w):
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def fdr_select(proba_de, fdr_target=0.05):
    order = np.argsort(-proba_de, kind="stable")
    fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    keep = np.zeros(len(order), dtype=bool)
    keep[order] = fdr <= fdr_target
    return keep


def zero_fraction_ppc(x_obs, x_rep):
    obs = (x_obs == 0).mean(0)
    rep = (x_rep == 0).mean(0)  # (n_genes, n_samples)
    return obs, rep.mean(-1), (rep >= obs[:, None]).mean(-1)


def kl_beta(a_q, b_q, a_p, b_p):
    def log_b(a, b):
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    ds = torch.digamma(a_q + b_q)
    return (log_b(a_p, b_p) - log_b(a_q, b_q) + (a_q - a_p) * (torch.digamma(a_q) - ds)
            + (b_q - b_p) * (torch.digamma(b_q) - ds))


def autozi_log_likelihood(x, mu, theta, zi_logits, delta):
    log_nb_ = torch.log(delta) + _nb_lp(x, mu, theta)
    log_zinb_ = torch.log1p(-delta) + _zinb_lp(x, mu, theta, zi_logits)
    return torch.logaddexp(log_nb_, log_zinb_).sum(-1)


def minimal_dropout_logits(h, tau):
    return torch.log(tau + (1 - tau) * torch.sigmoid(h)) - math.log1p(-tau) + F.softplus(h)


def zi_call(alpha, beta, threshold=0.5):
    p = _beta_dist.cdf(0.5, alpha, beta)
    return p, p > threshold


# --------------------------------------------------------------------------- exercises 5-7: wrong ones


def _naive_softmax_generative(l, r, lib):
    e = torch.exp(l)
    rho = e / e.sum(-1, keepdim=True)
    return rho, torch.exp(lib) * rho, torch.exp(r)


def _naive_autozi(x, mu, theta, l, delta):
    p = delta * torch.exp(_nb_lp(x, mu, theta)) + (1 - delta) * torch.exp(_zinb_lp(x, mu, theta, l))
    return torch.log(p).sum(-1)


def _naive_min_dropout(h, tau):  # the textbook formula: inf once sigmoid(h) rounds to 1
    pi = tau + (1 - tau) * torch.sigmoid(h)
    return torch.log(pi) - torch.log1p(-pi)


def _fdr_unsorted(p, t=0.05):
    return np.cumsum(1 - p) / np.arange(1, len(p) + 1) <= t


def _fdr_sorted_mask(p, t=0.05):  # right count, but the mask is in sorted order
    order = np.argsort(-p, kind="stable")
    return np.cumsum(1 - p[order]) / np.arange(1, len(p) + 1) <= t


def _library_ddof1(c, b, n):
    m, v = library_prior(c, b, n)
    lt = np.log(np.asarray(c, dtype=np.float64).sum(1))
    v = np.array([lt[b == k].var(ddof=1) if (b == k).sum() > 1 else 1.0 for k in range(n)])
    return m, np.maximum(v, 1e-4)


def _library_log_of_mean(c, b, n):
    m, v = library_prior(c, b, n)
    tot = np.asarray(c, dtype=np.float64).sum(1)
    return np.array([np.log(tot[b == k].mean()) for k in range(n)]), v


def _library_no_rules(c, b, n):  # variance 0 for one cell, no floor
    lt = np.log(np.asarray(c, dtype=np.float64).sum(1))
    return np.array([lt[b == k].mean() for k in range(n)]), np.array([lt[b == k].var() for k in range(n)])


def _de_no_eps(r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4):
    p = de_probabilities(r1, r2, mode, delta, pseudocount)[0]
    with np.errstate(divide="ignore"):
        return p, np.log(p) - np.log(1 - p)


def _de_geq(r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4):
    if mode != "vanilla":
        return de_probabilities(r1, r2, mode, delta, pseudocount)
    p = (r1 >= r2).mean(0)
    return p, np.log(p + 1e-8) - np.log(1 - p + 1e-8)


def _de_ln(r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4):
    if mode == "vanilla":
        return de_probabilities(r1, r2, mode, delta, pseudocount)
    p = (np.abs(np.log(r1 + pseudocount) - np.log(r2 + pseudocount)) >= delta).mean(0)
    return p, np.log(p + 1e-8) - np.log(1 - p + 1e-8)


def _kl_beta_log_b_swapped(aq, bq, ap, bp):
    def log_b(a, b):
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    return kl_beta(aq, bq, ap, bp) - 2 * (log_b(ap, bp) - log_b(aq, bq))


def _alt_min_dropout(h, tau):
    # pi = (tau + e^h) / (1 + e^h) and 1 - pi = (1 - tau) / (1 + e^h), so logit(pi) = log(tau + e^h) - log(1 - tau)
    log_tau = torch.full_like(h, math.log(tau) if tau > 0 else -math.inf)
    return torch.logaddexp(log_tau, h) - math.log1p(-tau)


WRONG.update({
    "check_library_prior": [
        _library_ddof1,
        _library_log_of_mean,
        _library_no_rules,
        lambda c, b, n: (lambda m, v: (m, np.sqrt(v)))(*library_prior(c, b, n)),  # std, not variance
        lambda c, b, n: (lambda lt: (np.full(n, lt.mean()), np.full(n, max(lt.var(), 1e-4))))(
            np.log(np.asarray(c, dtype=np.float64).sum(1))),  # batches ignored
    ],
    "check_kl_library": [
        lambda m, v, b, pm, pv: kl_standard_normal(m, v),  # against N(0, 1)
        lambda m, v, b, pm, pv: kl_library(m, v, b, pm, pv.sqrt()),  # prior std as variance
        lambda m, v, b, pm, pv: 0.5 * (torch.log(v / pv[b].unsqueeze(-1)) + (pv[b].unsqueeze(-1)
                                       + (m - pm[b].unsqueeze(-1)) ** 2) / v - 1.0).sum(-1),  # KL(p || q)
        lambda m, v, b, pm, pv: kl_library(m, v, torch.zeros_like(b), pm, pv),  # first batch's prior for all
    ],
    "check_scvi_generative": [
        lambda l, r, lib: (lambda rho: (rho, lib * rho, torch.exp(r)))(torch.softmax(l, -1)),  # log library
        lambda l, r, lib: (lambda rho: (rho, torch.exp(lib) * rho, r))(torch.softmax(l, -1)),  # theta = px_r
        lambda l, r, lib: (lambda rho: (rho, torch.exp(lib) * rho, torch.exp(r)))(torch.softmax(l, 0)),  # cells
        lambda l, r, lib: (lambda rho: (rho, torch.exp(lib) * rho, torch.exp(r)))(torch.sigmoid(l)),
        _naive_softmax_generative,
    ],
    "check_scvi_loss": [
        lambda x, mu, th, zl, m, v, kl_l, w: scvi_loss(x, mu, th, zl, m, v, kl_l * w, w),  # warm-up on KL_l too
        lambda x, mu, th, zl, m, v, kl_l, w: scvi_loss(x, mu, th, zl, m, v, 0 * kl_l, w),  # KL_l forgotten
        lambda x, mu, th, zl, m, v, kl_l, w: (-_zinb_lp(x, mu, th, zl).mean(-1) + w * kl_standard_normal(m, v)
                                               + kl_l),  # mean over genes
        lambda x, mu, th, zl, m, v, kl_l, w: (-_nb_lp(x, mu, th).sum(-1) + w * kl_standard_normal(m, v)
                                               + kl_l),  # NB instead of ZINB
        lambda x, mu, th, zl, m, v, kl_l, w: (-_zinb_lp(x, mu, th, zl, include_constant=False).sum(-1)
                                               + w * kl_standard_normal(m, v) + kl_l),  # log x! dropped
    ],
    "check_kl_weight_at": [
        lambda e, n: e / n if n else 1.0,  # not clipped at 1
        lambda e, n: min(1.0, e / n) if n else 0.0,  # no warm-up read as "no KL"
        lambda e, n: min(1.0, (e + 1) / n) if n else 1.0,  # off by one epoch
        lambda e, n: min(1.0, e / n),  # crashes without warm-up
    ],
    "check_de_probabilities": [
        _de_no_eps,  # no eps: infinite Bayes factors
        _de_geq,  # rho1 >= rho2: ties count for H1
        _de_ln,  # natural log fold change compared with a log2 delta
        lambda r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4: de_probabilities(  # pseudocount ignored
            r1, r2, mode, delta, 0.0),
        lambda r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4: (  # Bayes factor as p / (1 - p), not its log
            lambda p, bf: (p, np.exp(bf)))(*de_probabilities(r1, r2, mode, delta, pseudocount)),
    ],
    "check_log_marginal": [
        lambda w: torch.log(torch.exp(w).mean(0)),  # naive: underflows
        lambda w: torch.logsumexp(w, 0),  # - log S forgotten
        lambda w: w.mean(0),  # the ELBO, not log p(x)
        lambda w: torch.logsumexp(w, 1)[: w.shape[1]] - math.log(w.shape[1]) if w.shape[0] >= w.shape[1]
        else torch.logsumexp(w, 0),  # wrong axis
        lambda w: w.max(0).values,  # the largest weight
    ],
    "check_fdr_select": [
        _fdr_unsorted,
        _fdr_sorted_mask,
        lambda p, t=0.05: 1 - p <= t,  # per-gene threshold
        lambda p, t=0.05: (lambda o: (lambda keep: (keep.__setitem__(o, np.cumsum(1 - p[o]) <= t), keep)[1])(
            np.zeros(len(p), dtype=bool)))(np.argsort(-p, kind="stable")),  # cumulative sum, not mean
    ],
    "check_zero_fraction_ppc": [
        lambda xo, xr: (lambda o, r: (o, r.mean(-1), (r > o[:, None]).mean(-1)))(
            (xo == 0).mean(0), (xr == 0).mean(0)),  # ties not counted
        lambda xo, xr: (lambda o, r: (o, r.mean(-1), (r <= o[:, None]).mean(-1)))(
            (xo == 0).mean(0), (xr == 0).mean(0)),  # the other tail
        lambda xo, xr: (lambda o, r: (o, r.mean(-1), (r >= o[:, None]).mean(-1)))(
            (xo > 0).mean(0), (xr > 0).mean(0)),  # fraction of non-zeros
    ],
    "check_kl_beta": [
        lambda aq, bq, ap, bp: kl_beta(ap, bp, aq, bq),  # KL(p || q)
        lambda aq, bq, ap, bp: (kl_beta(aq, bq, ap, bp) - (aq - ap) * (torch.digamma(aq) - torch.digamma(aq + bq))
                                + (aq - ap) * torch.digamma(aq)),  # psi(a + b) forgotten in one term
        lambda aq, bq, ap, bp: -kl_beta(aq, bq, ap, bp),  # sign
        _kl_beta_log_b_swapped,
    ],
    "check_autozi_log_likelihood": [
        _naive_autozi,
        lambda x, mu, th, l, d: autozi_log_likelihood(x, mu, th, l, 1 - d),  # delta weights the ZINB
        lambda x, mu, th, l, d: (d * _nb_lp(x, mu, th) + (1 - d) * _zinb_lp(x, mu, th, l)).sum(-1),  # Jensen
        lambda x, mu, th, l, d: torch.logaddexp(torch.log(d) + _nb_lp(x, mu, th),
                                                torch.log1p(-d) + _zinb_lp(x, mu, th, l)).mean(-1),  # mean
    ],
    "check_minimal_dropout_logits": [
        lambda h, tau: tau + (1 - tau) * torch.sigmoid(h),  # a probability, not logits
        lambda h, tau: h + math.log(tau / (1 - tau)) if tau > 0 else h,  # shifted logits
        lambda h, tau: (lambda pi: torch.log(pi) - torch.log1p(-pi))(tau + torch.sigmoid(h)),  # no (1 - tau)
        _naive_min_dropout,
    ],
    "check_zi_call": [
        lambda a, b, t=0.5: (lambda p: (p, p > t))(_beta_dist.sf(0.5, a, b)),  # q(delta > 0.5)
        lambda a, b, t=0.5: (lambda p: (p, a / (a + b) < 0.5))(_beta_dist.cdf(0.5, a, b)),  # threshold ignored
        lambda a, b, t=0.5: (lambda p: (p, p > t))(_beta_dist.cdf(t, a, b)),  # threshold used as the cut on delta
    ],
})

CORRECT.update({
    "check_library_prior": library_prior,
    "check_kl_library": kl_library,
    "check_scvi_generative": scvi_generative,
    "check_scvi_loss": scvi_loss,
    "check_kl_weight_at": kl_weight_at,
    "check_de_probabilities": de_probabilities,
    "check_log_marginal": log_marginal,
    "check_fdr_select": fdr_select,
    "check_zero_fraction_ppc": zero_fraction_ppc,
    "check_kl_beta": kl_beta,
    "check_autozi_log_likelihood": autozi_log_likelihood,
    "check_minimal_dropout_logits": minimal_dropout_logits,
    "check_zi_call": zi_call,
})

ALTERNATIVES.update({
    "check_library_prior": [
        lambda c, b, n: (lambda lt: (np.array([lt[b == k].mean() for k in range(n)]),
                                     np.array([max(np.mean((lt[b == k] - lt[b == k].mean()) ** 2), 1e-4)
                                               if (b == k).sum() > 1 else 1.0 for k in range(n)])))(
            np.log(c.sum(axis=1).astype(np.float64))),
    ],
    "check_kl_library": [
        lambda m, v, b, pm, pv: torch.distributions.kl_divergence(
            Normal(m, v.sqrt()), Normal(pm[b].unsqueeze(-1), pv[b].unsqueeze(-1).sqrt())).sum(-1),
    ],
    "check_scvi_generative": [
        lambda l, r, lib: (lambda rho: (rho, torch.exp(lib + torch.log_softmax(l, -1)), r.exp()))(F.softmax(l, dim=1)),
    ],
    "check_scvi_loss": [
        lambda x, mu, th, zl, m, v, kl_l, w: (
            -_zinb_lp(x, mu, th, zl, include_constant=False).sum(-1) + torch.lgamma(x + 1).sum(-1)
            + w * torch.distributions.kl_divergence(Normal(m, v.sqrt()), Normal(0.0, 1.0)).sum(-1) + kl_l),
    ],
    "check_kl_weight_at": [lambda e, n: 1.0 if n in (None, 0) else float(np.clip(e / n, 0.0, 1.0))],
    "check_de_probabilities": [
        lambda r1, r2, mode="vanilla", delta=0.25, pseudocount=1e-4: (lambda p: (p, np.log((p + 1e-8) / (1 - p + 1e-8))))(
            np.mean(r1 > r2, axis=0) if mode == "vanilla"
            else np.mean(np.abs(np.log2((r1 + pseudocount) / (r2 + pseudocount))) >= delta, axis=0)),
    ],
    "check_log_marginal": [
        lambda w: (lambda m: m + torch.log(torch.exp(w - m).mean(0)))(w.max(0).values),
    ],
    "check_fdr_select": [
        lambda p, t=0.05: (lambda s: p >= s[np.flatnonzero(np.cumsum(1 - s) / np.arange(1, len(s) + 1) <= t)[-1]]
                           if (np.cumsum(1 - s) / np.arange(1, len(s) + 1) <= t).any()
                           else np.zeros(len(p), dtype=bool))(np.sort(p)[::-1]),
    ],
    "check_zero_fraction_ppc": [
        lambda xo, xr: (lambda o, r: (o, r.mean(1), np.mean(r >= o[:, None], axis=1)))(
            1 - np.count_nonzero(xo, axis=0) / xo.shape[0], 1 - np.count_nonzero(xr, axis=0) / xr.shape[0]),
    ],
    "check_kl_beta": [
        lambda aq, bq, ap, bp: torch.distributions.kl_divergence(torch.distributions.Beta(aq, bq),
                                                                 torch.distributions.Beta(ap, bp)),
    ],
    "check_autozi_log_likelihood": [
        lambda x, mu, th, l, d: torch.stack([torch.log(d).expand_as(x) + _nb_lp(x, mu, th),
                                             torch.log1p(-d).expand_as(x) + _zinb_lp(x, mu, th, l)]).logsumexp(0).sum(1),
    ],
    "check_minimal_dropout_logits": [_alt_min_dropout],
    "check_zi_call": [lambda a, b, t=0.5: (lambda p: (p, np.greater(p, t)))(1 - _beta_dist.sf(0.5, a, b))],
})


PACKAGE.update({
    "check_kl_weight_at": "mini_scvi.train.kl_weight_at",
    "check_kl_beta": "mini_scvi.distributions.kl_beta",
})


# --------------------------------------------------------------------------- exercise 1: counts


def _n_entries(x):
    return x.shape[0] * x.shape[1]


def sparsity(x):
    nonzero = x != 0  # sparse, without the explicitly stored zeros
    return 1 - nonzero.sum() / _n_entries(x), int((nonzero.sum(axis=0) == 0).sum())


def library_size_and_genes(x):
    return np.asarray(x.sum(axis=1)).ravel(), np.asarray((x > 0).sum(axis=1)).ravel()


def gene_mean_var(x):
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    return mean, (mean_sq - mean**2) * n / (n - 1)


def poisson_zero_fraction(mean, library_size):
    return np.exp(-np.outer(mean, library_size / library_size.mean())).mean(axis=1)


def nb_theta_moments(mean, var):
    return np.sum(mean**4) / np.sum((var - mean) * mean**2)


CORRECT.update({
    "check_sparsity": sparsity,
    "check_library_size_and_genes": library_size_and_genes,
    "check_gene_mean_var": gene_mean_var,
    "check_poisson_zero_fraction": poisson_zero_fraction,
    "check_nb_theta_moments": nb_theta_moments,
})
ALTERNATIVES.update({
    "check_sparsity": [
        lambda x: (lambda c: (1 - c.count_nonzero() / _n_entries(x), int((np.diff(c.indptr) == 0).sum())))(
            sp.csc_matrix(x != 0)),  # per gene from the column pointers, once the stored zeros are gone
    ],
    "check_library_size_and_genes": [
        lambda x: (np.ravel(x.sum(1)), np.ravel(x.astype(bool).astype(np.int64).sum(1))),  # astype(bool) drops zeros
    ],
    "check_gene_mean_var": [
        lambda x: (lambda s, s2, n: (s / n, (s2 - s**2 / n) / (n - 1)))(  # from sums, the textbook way
            np.ravel(x.sum(0)).astype(float), np.ravel(x.power(2).sum(0)).astype(float), x.shape[0]),
    ],
    "check_poisson_zero_fraction": [
        lambda m, lib: np.array([np.mean(np.exp(-mg * lib * len(lib) / lib.sum())) for mg in m]),
    ],
    "check_nb_theta_moments": [
        lambda m, v: 1 / np.linalg.lstsq((m**2)[:, None], v - m, rcond=None)[0][0],  # least squares by numpy
    ],
})
WRONG.update({
    "check_sparsity": [
        lambda x: (1 - x.nnz / _n_entries(x), sparsity(x)[1]),  # stored zeros counted as counts
        lambda x: (sparsity(x)[0], int((np.diff(x.tocsc().indptr) == 0).sum())),  # stored zeros again
        lambda x: (sparsity(x)[0], int(((x != 0).sum(axis=1) == 0).sum())),  # cells, not genes
        lambda x: (lambda d: ((d == 0).mean(), int((d.sum(0) == 0).sum())))(x.toarray()),  # densified
        lambda x: ((x.data == 0).mean(), sparsity(x)[1]),  # zeros among the stored values only
    ],
    "check_library_size_and_genes": [
        lambda x: (x.sum(axis=1), library_size_and_genes(x)[1]),  # an (n, 1) matrix
        lambda x: (library_size_and_genes(x)[0], np.diff(x.indptr)),  # stored entries per cell
        lambda x: (np.asarray(x.sum(axis=0)).ravel(), library_size_and_genes(x)[1]),  # per gene
        lambda x: (lambda d: (d.sum(1), (d > 0).sum(1)))(x.toarray()),  # densified
    ],
    "check_gene_mean_var": [
        lambda x: (lambda m, v: (m, v * (x.shape[0] - 1) / x.shape[0]))(*gene_mean_var(x)),  # ddof = 0
        lambda x: (lambda m, v: (m, np.asarray(x.multiply(x).mean(axis=0)).ravel() - m))(*gene_mean_var(x)),
        lambda x: (np.asarray(x.mean(axis=1)).ravel(), gene_mean_var(x)[1]),  # per cell
        lambda x: (lambda d: (d.mean(0), d.var(0, ddof=1)))(x.todense()),  # densified
    ],
    "check_poisson_zero_fraction": [
        lambda m, lib: np.exp(-m),  # library sizes ignored
        lambda m, lib: np.exp(-np.outer(m, lib)).mean(1),  # library sizes, not size factors
        lambda m, lib: np.exp(-m * (lib / lib.mean()).mean()),  # the size factors averaged first (Jensen)
        lambda m, lib: np.exp(-np.outer(m, lib / lib.mean())).mean(0)[: len(m)],  # averaged over genes
    ],
    "check_nb_theta_moments": [
        lambda m, v: 1 / nb_theta_moments(m, v),  # the dispersion 1 / theta
        lambda m, v: np.sum(m**4) / np.sum(v * m**2),  # the Poisson part left in
        lambda m, v: np.mean(m**2 / (v - m)),  # the mean of per-gene estimates
        lambda m, v: np.median(m**2 / (v - m)),  # their median
    ],
})


# --------------------------------------------------------------------------- exercise 2: principal angles


def subspace_cosines(a, b):
    q_a, q_b = torch.linalg.qr(a)[0], torch.linalg.qr(b)[0]
    return torch.linalg.svdvals(q_a.T @ q_b).clamp(0.0, 1.0)


def _unit_columns(m):
    return m / m.norm(dim=0)


CORRECT["check_subspace_cosines"] = subspace_cosines
ALTERNATIVES["check_subspace_cosines"] = [
    # orthonormal bases from the SVD instead of QR
    lambda a, b: torch.linalg.svdvals(torch.linalg.svd(a, full_matrices=False)[0].T
                                      @ torch.linalg.svd(b, full_matrices=False)[0]).clamp(0, 1),
    # cos^2 are the largest eigenvalues of P_a P_b P_a, with P the orthogonal projections
    lambda a, b: (lambda pa, pb: torch.linalg.eigvalsh(pa @ pb @ pa).flip(0)[: min(a.shape[1], b.shape[1])]
                  .clamp(0, 1).sqrt())(*(m @ torch.linalg.pinv(m) for m in (a, b))),
]
WRONG["check_subspace_cosines"] = [
    lambda a, b: torch.linalg.svdvals(a.T @ b),  # bases not orthonormalized
    lambda a, b: torch.linalg.svdvals(_unit_columns(a).T @ _unit_columns(b)),  # unit but not orthogonal columns
    lambda a, b: (_unit_columns(a) * _unit_columns(b)).sum(0).abs(),  # column by column
    lambda a, b: torch.arccos(subspace_cosines(a, b)),  # the angles, not their cosines
    lambda a, b: subspace_cosines(a, b).flip(0),  # smallest first
    lambda a, b: torch.linalg.svdvals(torch.linalg.qr(a)[0].T @ b),  # only a orthonormalized
]


# --------------------------------------------------------------------------- exercise 8: comparing implementations


def paired_t_interval(a, b, level=0.95):
    d = a - b
    half = _scipy_stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def _resampled_means(d, n_boot, seed, statistic=np.mean):
    return statistic(d[np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))], axis=1)


def bootstrap_interval(a, b, level=0.95, n_boot=10_000, seed=0):
    low, high = np.quantile(_resampled_means(a - b, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return low, high


def welch_interval(a, b, level=0.95):
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = _scipy_stats.t.ppf((1 + level) / 2, df) * math.sqrt(va + vb)
    return a.mean() - b.mean(), a.mean() - b.mean() - half, a.mean() - b.mean() + half


def _with_multiplier(a, b, level, multiplier, ddof=1, scale=True):
    """The paired interval with another multiplier or spread: the mistakes of exercise 1."""
    d = a - b
    se = d.std(ddof=ddof) / (math.sqrt(len(d)) if scale else 1.0)
    return d.mean(), d.mean() - multiplier * se, d.mean() + multiplier * se


def _permuted_bootstrap(a, b, level=0.95, n_boot=10_000, seed=0):  # resamples without replacement
    rng, d = np.random.default_rng(seed), a - b
    return tuple(np.quantile([rng.permutation(d).mean() for _ in range(n_boot)], [(1 - level) / 2, (1 + level) / 2]))


def _unpaired_bootstrap(a, b, level=0.95, n_boot=10_000, seed=0):  # a and b resampled separately
    rng = np.random.default_rng(seed)
    means = (a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1))
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def _normal_bootstrap(a, b, level=0.95, n_boot=10_000, seed=0):  # mean +- z sd of the resampled means
    means = _resampled_means(a - b, n_boot, seed)
    z = _scipy_stats.norm.ppf((1 + level) / 2)
    return means.mean() - z * means.std(), means.mean() + z * means.std()


CORRECT.update({
    "check_paired_t_interval": paired_t_interval,
    "check_bootstrap_interval": bootstrap_interval,
    "check_welch_interval": welch_interval,
})
ALTERNATIVES.update({
    "check_paired_t_interval": [
        lambda a, b, level=0.95: (lambda ci: ((a - b).mean(), ci.low, ci.high))(
            _scipy_stats.ttest_rel(a, b).confidence_interval(confidence_level=level)),
    ],
    "check_bootstrap_interval": [
        lambda a, b, level=0.95, n_boot=10_000, seed=0: tuple(np.percentile(  # a loop and np.percentile
            [np.random.default_rng(seed + i).choice(a - b, len(a)).mean() for i in range(n_boot)],
            [50 * (1 - level), 50 * (1 + level)])),
    ],
    "check_welch_interval": [
        lambda a, b, level=0.95: (lambda ci: (a.mean() - b.mean(), ci.low, ci.high))(
            _scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=level)),
    ],
})
WRONG.update({
    "check_paired_t_interval": [
        lambda a, b, level=0.95: _with_multiplier(a, b, level, _scipy_stats.norm.ppf((1 + level) / 2)),  # normal
        lambda a, b, level=0.95: _with_multiplier(a, b, level, _scipy_stats.t.ppf((1 + level) / 2, len(a) - 1), ddof=0),
        lambda a, b, level=0.95: welch_interval(a, b, level),  # the pairing ignored
        lambda a, b, level=0.95: _with_multiplier(a, b, level, _scipy_stats.t.ppf(level, len(a) - 1)),  # one-sided
        lambda a, b, level=0.95: (lambda m, lo, hi: (-m, -hi, -lo))(*paired_t_interval(a, b, level)),  # b - a
        lambda a, b, level=0.95: _with_multiplier(a, b, level, _scipy_stats.t.ppf((1 + level) / 2, len(a) - 1),
                                                  scale=False),  # the spread, not the standard error
    ],
    "check_bootstrap_interval": [
        _permuted_bootstrap,
        _unpaired_bootstrap,
        _normal_bootstrap,
        lambda a, b, level=0.95, n_boot=10_000, seed=0: bootstrap_interval(a, b, level, n_boot, None),  # unseeded
        lambda a, b, level=0.95, n_boot=10_000, seed=0: tuple(np.quantile(  # quantiles at 1 - level and level
            _resampled_means(a - b, n_boot, seed), [1 - level, level])),
        lambda a, b, level=0.95, n_boot=10_000, seed=0: tuple(np.quantile(  # the median, not the mean
            _resampled_means(a - b, n_boot, seed, np.median), [(1 - level) / 2, (1 + level) / 2])),
    ],
    "check_welch_interval": [
        lambda a, b, level=0.95: (lambda ci: (a.mean() - b.mean(), ci.low, ci.high))(  # pooled variance
            _scipy_stats.ttest_ind(a, b, equal_var=True).confidence_interval(confidence_level=level)),
        lambda a, b, level=0.95: (lambda d, se, z: (d, d - z * se, d + z * se))(  # normal multiplier
            a.mean() - b.mean(), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)),
            _scipy_stats.norm.ppf((1 + level) / 2)),
        lambda a, b, level=0.95: paired_t_interval(a, b, level),  # pairs samples that are not paired
        lambda a, b, level=0.95: (lambda d, se, t: (d, d - t * se, d + t * se))(  # df n_a + n_b - 2
            a.mean() - b.mean(), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)),
            _scipy_stats.t.ppf((1 + level) / 2, len(a) + len(b) - 2)),
    ],
})


# --------------------------------------------------------------------------- checker tests


def test_every_checker_is_covered():
    assert set(CORRECT) == set(WRONG) == set(ALTERNATIVES) == {n for n in checks.__all__ if n != "check_answer"}
    assert all(WRONG.values())  # every checker is shown to reject at least one wrong answer


def test_every_notebook_is_tested_and_in_the_book():
    import yaml

    on_disk = sorted(p.name for p in EX.glob("ex*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part.get("chapters", [])]
    assert [f for f in files if f.startswith("exercises/")] == [f"exercises/{n[:-6]}" for n in on_disk]
    readme = (EX / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in on_disk)
    used = {name for path in EX.glob("ex*.ipynb") for name in checks.__all__ if name in path.read_text()}
    assert used == set(checks.__all__)  # every checker is called by a notebook


@pytest.mark.parametrize("checker", sorted(CORRECT))
def test_checker_accepts_correct_implementation(checker, capsys):
    getattr(checks, checker)(CORRECT[checker])
    out = capsys.readouterr().out
    assert out.startswith("PASS: ") and "FAIL" not in out


@pytest.mark.parametrize(
    "checker, index", [(c, i) for c in sorted(ALTERNATIVES) for i in range(len(ALTERNATIVES[c]))], ids=str
)
def test_checker_accepts_other_correct_implementations(checker, index, capsys):
    getattr(checks, checker)(ALTERNATIVES[checker][index])
    assert capsys.readouterr().out.startswith("PASS: ")


@pytest.mark.parametrize("checker", sorted(PACKAGE))
def test_checker_accepts_package_implementation(checker, capsys):
    module, _, attr = PACKAGE[checker].rpartition(".")
    getattr(checks, checker)(getattr(importlib.import_module(module), attr))
    assert capsys.readouterr().out.startswith("PASS: ")


@pytest.mark.parametrize(
    "checker, index", [(c, i) for c in sorted(WRONG) for i in range(len(WRONG[c]))], ids=lambda v: str(v)
)
def test_checker_rejects_wrong_implementation(checker, index, capsys):
    with pytest.raises(AssertionError) as err:
        getattr(checks, checker)(WRONG[checker][index])
    assert str(err.value).startswith("FAIL: ")
    assert "PASS" not in capsys.readouterr().out


@pytest.mark.parametrize("checker", sorted(CORRECT))
def test_checker_reports_unimplemented_stub(checker):
    def stub(*args, **kwargs):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError, match="not implemented yet"):
        getattr(checks, checker)(stub)


def test_checker_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    checks.check_reparameterize(reparameterize)
    checks.check_sample_nb(sample_nb)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("question", sorted(checks._QUESTIONS))
def test_each_question_has_exactly_one_right_answer(question, capsys):
    options = checks._QUESTIONS[question][0]
    right = []
    for option in options:
        try:
            checks.check_answer(question, option)
            right.append(option)
        except AssertionError as err:
            assert str(err).startswith("FAIL: ")
    assert len(right) == 1
    checks.check_answer(question, right[0].upper() + " ")  # case and spaces do not matter
    with pytest.raises(NotImplementedError):
        checks.check_answer(question, None)
    for bad in ["e", "ab", 2, ""]:
        with pytest.raises(AssertionError, match="one letter"):
            checks.check_answer(question, bad)


def test_answers_are_not_stored_in_plain_text():
    text = "\n".join(path.read_text() for path in CHECK_FILES)
    for question, (options, digest, _) in checks._QUESTIONS.items():
        assert len(digest) == 64
        assert f'"{question}": "' not in text and f"'{question}': '" not in text


# --------------------------------------------------------------------------- student versions


def _execute(nb, cwd: Path, allow_errors: bool):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _regions(source: str, begin: str, end: str, inside_wanted: bool = True) -> list[str]:
    """The lines between the markers (or, with inside_wanted=False, the lines outside them)."""
    out, inside = [], False
    for line in source.splitlines():
        if begin in line:
            inside = True
        elif end in line:
            inside = False
        elif inside == inside_wanted:
            out.append(line)
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    make_student.main([str(EX), str(out)])
    return out


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _hidden(cell) -> bool:
    return make_student.is_hidden_test_cell(cell)


def _visible_checks(nb) -> list:
    return [c for c in nb.cells if _meta(c).get("grade") and not _hidden(c)]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_instructor_notebook_is_well_formed(name):
    nb = nbformat.read(EX / name, as_version=4)
    nbformat.validate(nb)
    solutions = [c for c in nb.cells if _meta(c).get("solution")]
    checks_ = _visible_checks(nb)
    hidden = [c for c in nb.cells if _hidden(c)]
    assert 3 <= len(solutions) <= 6 and len(solutions) == len(checks_)
    ids = [_meta(c)["grade_id"] for c in solutions + checks_ + hidden]
    assert len(set(ids)) == len(ids)
    previous = {nb.cells[i + 1].id: nb.cells[i] for i in range(len(nb.cells) - 1)}
    for cell in hidden:  # an nbgrader test cell right after its check cell, not rendered by the book
        assert "remove-cell" in cell.metadata.get("tags", []), cell.id
        assert _meta(cell).get("grade") and _meta(cell).get("locked") and _meta(cell).get("points", 0) > 0
        assert _meta(cell)["grade_id"].endswith("-hidden")
        assert previous[cell.id] in checks_, cell.id
    for cell in solutions:  # solutions are folded in the book and hold a solution region
        assert "hide-input" in cell.metadata.get("tags", [])
        assert cell.source.count("### BEGIN SOLUTION") == 1
    for cell in checks_:  # every check cell calls a checker
        assert "check_" in cell.source
    for cell in nb.cells:  # markers only in nbgrader cells, so nbgrader accepts the notebook
        if "### BEGIN SOLUTION" in cell.source:
            assert _meta(cell).get("solution")
        if "### BEGIN HIDDEN TESTS" in cell.source:  # only in cells of their own
            assert _meta(cell).get("grade") and _hidden(cell), cell.id
    titles = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("# ")]
    assert len(titles) == 1 and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_notebook_has_no_solutions(student_dir, name):
    instructor = nbformat.read(EX / name, as_version=4)
    student = nbformat.read(student_dir / name, as_version=4)
    nbformat.validate(student)
    kept = [c for c in instructor.cells if not _hidden(c)]  # hidden-test cells are dropped
    assert [c.id for c in student.cells] == [c.id for c in kept]
    text = "\n".join(c.source for c in student.cells)
    for marker in MARKERS:
        assert marker not in text
    hidden_lines = set()
    for cell in instructor.cells:
        hidden_lines.update(_regions(cell.source, "### BEGIN SOLUTION", "### END SOLUTION"))
        hidden_lines.update(_regions(cell.source, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"))
    outside = set()  # lines that legitimately appear outside the regions too (e.g. a closing bracket)
    for cell in instructor.cells:
        lines = _regions(cell.source, "### BEGIN SOLUTION", "### END SOLUTION", inside_wanted=False)
        outside.update(ln.strip() for ln in _regions("\n".join(lines), "### BEGIN HIDDEN TESTS",
                                                     "### END HIDDEN TESTS", inside_wanted=False))
    student_lines = {ln.strip() for ln in text.splitlines()}
    leaked = [ln.strip() for ln in hidden_lines if ln.strip() and ln.strip() not in outside and ln.strip() in student_lines]
    assert not leaked, leaked
    for s_cell, i_cell in zip(student.cells, kept):
        if s_cell.cell_type == "code":
            assert s_cell.outputs == [] and s_cell.execution_count is None
            assert "NBVAL_CHECK_OUTPUT" not in s_cell.source
        if _meta(i_cell).get("solution"):
            assert "hide-input" not in s_cell.metadata.get("tags", [])
            if "answer = " in i_cell.source and "def " not in i_cell.source:
                assert s_cell.source == "answer = None  # your answer"
            else:
                assert s_cell.source.rstrip().endswith("raise NotImplementedError()")
                assert '"""' in s_cell.source  # the docstring with the shapes stays
    for path in CHECK_FILES:  # the whole checks package, unchanged
        assert (student_dir / "checks" / path.name).read_text() == path.read_text()


def test_strip_source_keeps_indentation_and_rejects_bad_markers():
    src = "def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"
    out, n_sol, n_hid = make_student.strip_source(src, "code")
    assert out == "def f(x):\n    '''doc'''\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert (n_sol, n_hid) == (1, 0)
    out, _, n_hid = make_student.strip_source("check(f)\n### BEGIN HIDDEN TESTS\nassert f(1) == 1\n### END HIDDEN TESTS\n", "code")
    assert out == "check(f)" and n_hid == 1
    assert make_student.strip_source("### BEGIN SOLUTION\nanswer = 'c'  # because\n### END SOLUTION", "code")[0] == (
        "answer = None  # your answer")
    for bad in ["### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n",
                "### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION\n"]:
        with pytest.raises(make_student.MarkerError):
            make_student.strip_source(bad, "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_notebook_fails_exactly_at_the_checks(student_dir, name):
    nb = _execute(nbformat.read(student_dir / name, as_version=4), student_dir, allow_errors=True)
    errored = {c.id: [o for o in c.outputs if o.output_type == "error"] for c in nb.cells if c.cell_type == "code"}
    errored = {cid: errs for cid, errs in errored.items() if errs}
    expected = {c.id for c in nb.cells if _meta(c).get("grade")}
    assert set(errored) == expected
    for errs in errored.values():
        assert errs[0].ename == "NotImplementedError"


# --------------------------------------------------------------------------- instructor notebooks


def _nbval_checks(cell) -> bool:
    return cell.source.startswith("# NBVAL_CHECK_OUTPUT") or "nbval-check-output" in cell.metadata.get("tags", [])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_instructor_notebook_checks_are_compared_by_nbval(name):
    """Every check cell is stored with its PASS line and marked for nbval, so ``make test`` (nbval
    over exercises/) re-executes the instructor notebook and fails unless each check prints the same
    PASS again. (Executing the notebooks here as well would only double the time of the suite.)"""
    nb = nbformat.read(EX / name, as_version=4)
    graded = _visible_checks(nb)
    assert graded
    for cell in graded:
        assert _nbval_checks(cell), f"{cell.id}: mark it '# NBVAL_CHECK_OUTPUT' or tag it 'nbval-check-output'"
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert text.startswith("PASS: ") and "FAIL" not in text, (cell.id, text)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_instructor_notebook_is_stored_executed(name):
    """nbval --nbval-lax compares the stored outputs of the NBVAL_CHECK_OUTPUT cells: they must exist."""
    nb = nbformat.read(EX / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, cell.id
        if _meta(cell).get("grade") and not _hidden(cell):
            assert any("PASS: " in o.get("text", "") for o in cell.outputs), cell.id
    assert any(c.source.startswith("# NBVAL_CHECK_OUTPUT") for c in nb.cells if c.cell_type == "code")


# --------------------------------------------------------------------------- grading and the student book


def test_grade_reports_each_exercise(student_dir, tmp_path, capsys):
    """A submission with only the first two answers filled in passes exactly those two checks and their
    hidden tests."""
    name = "ex04_count_likelihoods.ipynb"
    instructor = nbformat.read(EX / name, as_version=4)
    submission = nbformat.read(student_dir / name, as_version=4)
    solved = [c for c in instructor.cells if _meta(c).get("solution")][:2]
    by_id = {_meta(c)["grade_id"]: c.source for c in solved}
    for cell in submission.cells:
        if _meta(cell).get("grade_id") in by_id:
            lines = by_id[_meta(cell)["grade_id"]].splitlines()
            cell.source = "\n".join(ln for ln in lines if "### BEGIN SOLUTION" not in ln and "### END SOLUTION" not in ln)
    submission.cells.insert(3, nbformat.v4.new_code_cell("print('a scratch cell the student added')"))
    path = tmp_path / "submitted.ipynb"
    nbformat.write(submission, path)
    code = make_student.main(["--grade", str(path), str(EX / name), "--output", str(tmp_path / "graded.ipynb")])
    report = capsys.readouterr().out
    assert code == 1
    results = {line.split()[0]: line.split()[1] for line in report.splitlines() if line.startswith("ex04-")}
    assert results == {
        "ex04-poisson-check": "PASS", "ex04-poisson-hidden": "PASS", "ex04-nb-check": "PASS",
        "ex04-nb-hidden": "PASS", "ex04-zinb-check": "FAIL", "ex04-zinb-hidden": "FAIL",
        "ex04-sample-check": "FAIL", "ex04-sample-hidden": "FAIL", "ex04-zeros-check": "FAIL",
    }
    assert "4/9 points" in report
    graded = nbformat.read(tmp_path / "graded.ipynb", as_version=4)
    assert any("### BEGIN HIDDEN TESTS" in c.source for c in graded.cells)  # the hidden tests ran


def test_book_sources_have_no_solutions(tmp_path):
    import yaml

    out = tmp_path / "student_src"
    make_student.main(["--book", str(out)])
    config = yaml.safe_load((out / "_config.yml").read_text())
    assert config["sphinx"]["config"]["hide_solutions"] is True
    assert "exercises/*" in config["execute"]["exclude_patterns"]
    assert (out / "_toc.yml").read_text() == (ROOT / "_toc.yml").read_text()
    assert (out / "book" / "references.bib").exists()
    assert (out / "mini_scvi" / "model" / "ae.py").exists()  # for literalinclude
    assert (out / "data").exists()
    for path in (out / "exercises").glob("*.ipynb"):
        text = path.read_text()
        assert "### BEGIN" not in text and "### END" not in text
    assert (out / "exercises" / "checks" / "__init__.py").exists()
    make_student.main(["--book", str(out)])  # running it again replaces its own output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        make_student.main(["--book", str(tmp_path / "other")])  # never deletes a folder it did not make
    assert (tmp_path / "other" / "keep.txt").exists()
