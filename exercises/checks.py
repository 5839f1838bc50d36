"""Automatic checks for the exercise notebooks (exercises/exNN_*.ipynb).

Each ``check_*`` function takes the student's function, calls it on random and edge-case inputs and
compares the result with mini_scvi's own implementation (or, where mini_scvi has none, with a
trusted reference: scikit-learn's PCA, the moments of the negative binomial). It then either

* prints ``PASS: ...`` (and returns None), or
* raises ``AssertionError("FAIL: <what went wrong>. Hint: ...")``.

A check never prints the expected values, only where the function goes wrong and a hint. A stub
that still raises ``NotImplementedError`` makes the check raise ``NotImplementedError`` too, so a
student notebook that has not been worked on stops at exactly the exercise cells.

Conceptual questions are checked by ``check_answer(question_id, answer)``, which compares a salted
hash of the answer, so reading this file does not reveal the answers.

Every check seeds its own random numbers inside ``torch.random.fork_rng``: the result is the same
on every run, and the notebook's global random state is left as it was.
"""

from __future__ import annotations

import functools
import hashlib
import math
import textwrap
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mini_scvi import distributions as _dist
from mini_scvi.model.ae import AEModule, log_normalize as _ref_log_normalize
from mini_scvi.model.vae import VAEModule
from mini_scvi.nn import FCLayers

__all__ = [
    "check_answer",
    # exercises 2: autoencoders
    "check_log_normalize",
    "check_ae_forward",
    "check_reconstruction_loss",
    "check_pca_reconstruction",
    # exercises 3: variational autoencoders
    "check_reparameterize",
    "check_kl_standard_normal",
    "check_vae_loss",
    # exercises 4: count likelihoods
    "check_log_poisson",
    "check_log_nb",
    "check_log_zinb",
    "check_sample_nb",
]

_SEED = 20240


# --------------------------------------------------------------------------- helpers


def _fail(name: str, message: str, hint: str = "") -> None:
    text = textwrap.fill(f"FAIL: {name}: {message}", width=88, subsequent_indent="      ")
    if hint:
        text += "\n" + textwrap.fill(f"Hint: {hint}", width=88, subsequent_indent="      ")
    raise AssertionError(text)


def _pass(name: str, message: str) -> None:
    print(textwrap.fill(f"PASS: {name}: {message}", width=68, subsequent_indent="      "))


def _call(fn: Callable, name: str, *args, **kwargs):
    """Call the student's function; turn an unfinished stub into a clear NotImplementedError."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotImplementedError(
            f"{name} is not implemented yet: replace `raise NotImplementedError()` with your code, "
            "run that cell, then run this check again."
        ) from None
    except Exception as err:  # noqa: BLE001  (report any crash as a failed check, with the cause)
        raise AssertionError(f"FAIL: {name}: calling it raised {type(err).__name__}: {err}") from err


def _clone(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _check_tensor(name: str, out, shape: Sequence[int], dtype: torch.dtype, what: str = "the result") -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        _fail(name, f"{what} should be a torch.Tensor, got {type(out).__name__}.",
              "build the result from torch operations on the inputs (no numpy, no Python floats).")
    if tuple(out.shape) != tuple(shape):
        _fail(name, f"{what} has shape {tuple(out.shape)}, expected {tuple(shape)}.",
              "re-read the shapes in the docstring: which axis should be summed, which kept?")
    if out.dtype != dtype:
        _fail(name, f"{what} has dtype {out.dtype} for {dtype} inputs.",
              "keep the input's dtype: avoid creating tensors with a fixed dtype inside your function.")
    return out


def _check_unchanged(name: str, originals: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    for a, b in zip(originals, inputs):
        if not torch.equal(a, b.detach()):
            _fail(name, "the function modified one of its inputs in place.",
                  "use out-of-place operations (x / s, not x /= s or x.div_(s)).")


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float | torch.Tensor) -> bool:
    """|got - expected| <= atol + rtol |expected| wherever expected is finite (atol may vary per entry)."""
    got = got.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        return False
    fin = torch.isfinite(expected)
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected)
    return bool(((got - expected).abs() <= atol + rtol * expected.abs())[fin].all())


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, where: str, hint: str,
             rtol: float = 1e-5, atol: float | torch.Tensor = 1e-6) -> None:
    """Fail with a hint (never the expected values) unless got matches expected."""
    g = got.detach().to(torch.float64)
    if torch.isnan(g).any() and not torch.isnan(expected).any():
        _fail(name, f"the result contains nan {where}.", hint)
    if torch.isinf(g).any() and not torch.isinf(expected).any():
        _fail(name, f"the result contains inf or -inf {where}.", hint)
    if not _close(got, expected, rtol, atol):
        _fail(name, f"wrong values {where}.", hint)


def _deterministic(check: Callable) -> Callable:
    """Run a check with torch's global generator seeded, then restore the notebook's generator state."""

    @functools.wraps(check)
    def wrapper(fn: Callable) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            return check(fn)

    return wrapper


def _rng() -> torch.Generator:
    return torch.Generator().manual_seed(_SEED)


# --------------------------------------------------------------------------- conceptual questions

# question id -> (options, sha256 of "<salt>|<id>|<answer>", hint shown after a wrong answer)
_SALT = "mini_scvi-exercises-v1"
_QUESTIONS: dict[str, tuple[str, str, str]] = {
    "ex02-linear-ae": (
        "abcd",
        "940f9640b34b40ffc5ff713bd996f815c1ef27c57e27251e7b59c3961600bac9",
        "compare the columns of W with the principal directions after a rotation: does the loss change "
        "if you replace W by W R for an orthogonal k x k matrix R?",
    ),
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
    "ex04-zeros": (
        "abcd",
        "4275929a87a11abf84826f0a44550d13f0b17c739f2586b533bc137082ed0feb",
        "compute P(x = 0) under each model: exp(-mu) for the Poisson, (theta / (theta + mu))**theta for the "
        "negative binomial, and compare both with the observed fraction.",
    ),
}


def _digest(question_id: str, answer: str) -> str:
    return hashlib.sha256(f"{_SALT}|{question_id}|{answer}".encode()).hexdigest()


def check_answer(question_id: str, answer) -> None:
    """Check a multiple-choice answer: ``answer`` is a letter such as ``'b'``."""
    if question_id not in _QUESTIONS:
        raise KeyError(f"unknown question id {question_id!r}; known: {sorted(_QUESTIONS)}")
    options, digest, hint = _QUESTIONS[question_id]
    choices = ", ".join(repr(o) for o in options)
    if answer is None:
        raise NotImplementedError(f"{question_id}: set `answer` to one of {choices}, then run this check again.")
    if not isinstance(answer, str) or answer.strip().lower() not in options or len(answer.strip()) != 1:
        _fail(question_id, f"`answer` must be one letter, one of {choices}; got {answer!r}.")
    if _digest(question_id, answer.strip().lower()) != digest:
        _fail(question_id, "not this one.", hint)
    _pass(question_id, "correct.")


# --------------------------------------------------------------------------- exercises 2: autoencoders


@_deterministic
def check_log_normalize(log_normalize: Callable) -> None:
    """``log_normalize(x, target_sum=1e4)``: (n_cells, n_genes) counts -> same shape, against
    ``mini_scvi.model.ae.log_normalize``."""
    name = "log_normalize"
    hint = ("divide each cell (row) by its own total count, the sum over genes (the last axis), "
            "multiply by target_sum, then take log(1 + .).")
    g = _rng()
    cases = []
    # typical UMI counts: many zeros, a few large values
    rate = torch.distributions.Gamma(0.3, 0.3).sample((40, 60)) * 2.0
    cases.append(("on random counts (float32)", torch.poisson(rate, generator=g) + torch.eye(40, 60), {}))
    x64 = torch.poisson(torch.full((7, 25), 3.0, dtype=torch.float64), generator=g)
    x64[:, 0] += 1
    cases.append(("on float64 counts", x64, {}))
    sparse = torch.zeros(5, 30)
    sparse[torch.arange(5), torch.arange(5) * 3] = torch.tensor([1.0, 2.0, 7.0, 150.0, 1.0])
    cases.append(("for cells with a single non-zero gene", sparse, {}))
    cases.append(("for very deep cells (counts up to 1e6)", torch.poisson(torch.full((4, 20), 1e6), generator=g), {}))
    cases.append(("for a single cell", torch.arange(1.0, 11.0).reshape(1, 10), {}))
    cases.append(("with target_sum=1e6 (counts per million)", cases[0][1][:10], {"target_sum": 1e6}))
    cases.append(("with target_sum=1.0", cases[0][1][:10], {"target_sum": 1.0}))

    for where, x, kwargs in cases:
        (orig,) = _clone(x)
        out = _call(log_normalize, name, x, **kwargs)
        _check_unchanged(name, [orig], [x])
        _check_tensor(name, out, x.shape, x.dtype)
        expected = _ref_log_normalize(orig, **kwargs)
        if (expected == 0).any() and torch.isinf(out.detach()).any():
            _fail(name, f"-inf where a count is 0 ({where}).",
                  "log(0) is -inf: that is what the 1 in log(1 + .) is for.")
        _compare(name, out, expected, where, hint, rtol=1e-5, atol=1e-5)
    _pass(name, f"matches mini_scvi.model.ae.log_normalize on {len(cases)} inputs "
          "(random, float64, single-gene and very deep cells, one cell, other target sums).")


def _mlp_reference(sizes: Sequence[int], n_out: int) -> tuple[FCLayers, nn.Linear]:
    hidden = FCLayers(list(sizes), dropout_rate=0.0, use_batch_norm=False)
    return hidden, nn.Linear(sizes[-1], n_out)


def _linears(hidden: FCLayers, out: nn.Linear) -> list[nn.Linear]:
    return [block[0] for block in hidden.layers] + [out]


@_deterministic
def check_ae_forward(ae_forward: Callable) -> None:
    """``ae_forward(x_log, encoder_layers, decoder_layers) -> (z, x_hat)``, against mini_scvi's
    hidden blocks (``mini_scvi.nn.FCLayers`` without batch norm and dropout) and linear read-outs."""
    name = "ae_forward"
    hint = ("every layer but the last is followed by a ReLU; the last layer of the encoder (the code z) "
            "and of the decoder (the reconstruction) are left linear. Apply the layers in list order.")
    configs = [  # (n_genes, encoder hidden sizes, n_latent, n_cells)
        (30, (16, 8), 2, 12),
        (30, (), 3, 5),  # a linear autoencoder: one layer each way
        (50, (32, 16, 8), 4, 9),
        (20, (10,), 2, 1),  # a single cell
    ]
    for n_genes, hidden, n_latent, n_cells in configs:
        where = f"for n_genes={n_genes}, hidden sizes {hidden}, n_latent={n_latent}, {n_cells} cell(s)"
        enc_h, enc_o = _mlp_reference([n_genes, *hidden], n_latent)
        dec_h, dec_o = _mlp_reference([n_latent, *hidden[::-1]], n_genes)
        x = torch.randn(n_cells, n_genes).abs() * 2
        with torch.no_grad():
            z_ref = enc_o(enc_h(x))
            x_ref = dec_o(dec_h(z_ref))
        enc_layers, dec_layers = _linears(enc_h, enc_o), _linears(dec_h, dec_o)
        (orig,) = _clone(x)
        out = _call(ae_forward, name, x, enc_layers, dec_layers)
        _check_unchanged(name, [orig], [x])
        if not isinstance(out, tuple) or len(out) != 2:
            _fail(name, "should return a tuple (z, x_hat).")
        z, x_hat = out
        _check_tensor(name, z, (n_cells, n_latent), x.dtype, "z")
        _check_tensor(name, x_hat, (n_cells, n_genes), x.dtype, "x_hat")
        if (z_ref < 0).any() and (z.detach() >= 0).all():
            _fail(name, f"z has no negative entries {where}.",
                  "the code z is the output of the encoder's last layer: no activation after it.")
        if (x_ref < 0).any() and (x_hat.detach() >= 0).all():
            _fail(name, f"x_hat has no negative entries {where}.",
                  "the reconstruction is the decoder's last layer: no activation after it.")
        _compare(name, z, z_ref, f"in z {where}", hint, rtol=1e-4, atol=1e-5)
        _compare(name, x_hat, x_ref, f"in x_hat {where}", hint, rtol=1e-4, atol=1e-5)
        if n_cells > 1:
            first = enc_layers[0].weight
            first.grad = None
            if x_hat.requires_grad:
                x_hat.sum().backward()
            if first.grad is None or not torch.isfinite(first.grad).all() or first.grad.abs().sum() == 0:
                _fail(name, "no gradient reaches the first encoder layer from x_hat.",
                      "don't detach tensors or use torch.no_grad() inside the forward pass: training needs the graph.")
    _pass(name, f"matches mini_scvi's hidden blocks (FCLayers) and read-outs in {len(configs)} architectures, "
          "gradients included.")


@_deterministic
def check_reconstruction_loss(reconstruction_loss: Callable) -> None:
    """``reconstruction_loss(x_log, x_hat) -> (n_cells,)``, against ``AEModule.loss``'s per-cell
    reconstruction term."""
    name = "reconstruction_loss"
    hint = "square the difference, sum over genes (the last axis) and keep one value per cell."
    g = _rng()
    cases = [
        ("on random data", torch.rand(16, 40, generator=g) * 5, torch.randn(16, 40, generator=g)),
        ("in float64", torch.rand(6, 11, generator=g, dtype=torch.float64),
         torch.rand(6, 11, generator=g, dtype=torch.float64)),
        ("for a single cell", torch.rand(1, 25, generator=g), torch.rand(1, 25, generator=g)),
    ]
    perfect = torch.rand(4, 13, generator=g)
    cases.append(("for a perfect reconstruction", perfect, perfect.clone()))
    for where, x_log, x_hat in cases:
        module = AEModule(n_input=x_log.shape[1], n_latent=2, hidden_sizes=(4,))
        orig = _clone(x_log, x_hat)
        out = _call(reconstruction_loss, name, x_log, x_hat)
        _check_unchanged(name, orig, [x_log, x_hat])
        _check_tensor(name, out, (x_log.shape[0],), x_log.dtype)
        expected = module.loss({}, {"x_log": orig[0]}, {"x_hat": orig[1]}).reconstruction_loss
        if not _close(out, expected, 1e-5, 1e-6) and _close(out * x_log.shape[1], expected, 1e-5, 1e-6):
            _fail(name, f"wrong values {where}: the result is n_genes times too small.",
                  "sum over genes, do not average.")
        _compare(name, out, expected, where, hint)
    _pass(name, f"matches the reconstruction term of mini_scvi's AEModule.loss on {len(cases)} inputs.")


@_deterministic
def check_pca_reconstruction(pca_reconstruction: Callable) -> None:
    """``pca_reconstruction(x, k) -> x_rec`` (n_cells, n_genes), against scikit-learn's PCA
    (``inverse_transform(fit_transform(x))``)."""
    from sklearn.decomposition import PCA

    name = "pca_reconstruction"
    hint = ("centre each gene (subtract the column means), take the top-k right singular vectors V_k "
            "of the centred matrix, project (x_c V_k V_k^T) and add the means back.")
    g = _rng()

    def low_rank(n, p, r, offset, dtype=torch.float64):
        a = torch.randn(n, r, generator=g, dtype=dtype) * torch.linspace(5, 1, r, dtype=dtype)
        b = torch.randn(r, p, generator=g, dtype=dtype)
        return a @ b + 0.1 * torch.randn(n, p, generator=g, dtype=dtype) + offset

    x1 = low_rank(60, 12, 3, 0.0)
    x2 = low_rank(80, 15, 4, torch.linspace(2, 10, 15, dtype=torch.float64))  # large gene means
    cases = [
        ("for k=3 on rank-3 data plus noise", x1, 3),
        ("for k=1", x1, 1),
        ("for data with large gene means, k=2", x2, 2),
        ("for k = n_genes (nothing discarded)", x2[:30], 15),
        ("in float32", x2.float(), 4),
    ]
    for where, x, k in cases:
        (orig,) = _clone(x)
        out = _call(pca_reconstruction, name, x, k)
        _check_unchanged(name, [orig], [x])
        _check_tensor(name, out, x.shape, x.dtype)
        xn = orig.double().numpy()
        pca = PCA(n_components=k, svd_solver="full")
        expected = torch.from_numpy(pca.inverse_transform(pca.fit_transform(xn)))
        tol = 1e-4 if x.dtype == torch.float32 else 1e-7
        _compare(name, out, expected, where, hint, rtol=tol, atol=tol * max(1.0, float(np.abs(xn).max())))
    _pass(name, f"matches scikit-learn's PCA reconstruction on {len(cases)} inputs (k = 1 .. n_genes, "
          "offset data, float32).")


# --------------------------------------------------------------------------- exercises 3: VAE


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
              "build z from mu, the standard deviation and noise by ordinary tensor operations; "
              "sampling with .sample() or torch.normal(...) cuts the graph.")
    eps = ((z - mu) / var.sqrt()).detach()
    if not torch.isfinite(eps).all():
        _fail(name, "z contains nan or inf.")
    col_mean, col_std = eps.mean(0), eps.std(0)
    if (col_mean.abs() > 5 / math.sqrt(n)).any() or ((col_std - 1).abs() > 0.06).any():
        _fail(name, "z does not have mean mu and variance var.",
              "z = mu + sigma * eps with eps ~ N(0, 1) and sigma the standard deviation, sqrt(var) "
              "(not var itself).")
    corr = torch.corrcoef(eps.T) - torch.eye(d)
    if corr.abs().max() > 0.1:
        _fail(name, "the noise is correlated across latent dimensions.",
              "draw one independent eps per entry: torch.randn_like(mu).")
    if (eps[: n // 2] - eps[n // 2 :]).abs().max() < 1e-6 or eps.std(1).mean() < 0.5:
        _fail(name, "the noise is shared between cells or dimensions.",
              "draw one independent eps per entry: torch.randn_like(mu).")
    z.sum().backward()
    if mu.grad is None or var.grad is None:
        _fail(name, "no gradient reaches mu or var.", "don't detach mu or var, and don't use .sample().")
    if not torch.allclose(mu.grad, torch.ones_like(mu), atol=1e-5):
        _fail(name, "dz/dmu should be 1 for every entry.", "z = mu + sigma * eps: mu enters additively.")
    expected_grad = ((z - mu) / (2 * var)).detach()  # d/dvar sqrt(var) * eps = eps / (2 sqrt(var))
    if not torch.allclose(var.grad, expected_grad, rtol=1e-3, atol=1e-5):
        _fail(name, "dz/dvar is wrong.", "sigma = sqrt(var); the noise eps must not depend on var.")
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
    hint = ("per latent dimension, KL = 1/2 (mu^2 + var - 1 - log var); sum over the latent dimensions "
            "(the last axis).")
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
              "check the constant: 1/2 (mu^2 + var - 1 - log var) vanishes at mu = 0, var = 1.")
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
            hint = ("with kl_weight=0 only the reconstruction term is left: -log N(x_log; x_hat, obs_var), summed "
                    "over genes, i.e. 1/2 [(x_log - x_hat)^2 / obs_var + log(2 pi obs_var)] per gene; then average "
                    "over cells.")
        elif obs_var == 1.0 and kl_weight == 1.0:
            hint = ("the reconstruction term passed (the kl_weight=0 case), so look at the KL term: "
                    "KL(N(qz_m, qz_v) || N(0, I)) summed over latent dimensions, added to the reconstruction of "
                    "each cell before averaging over cells.")
        elif obs_var == 1.0:
            hint = "kl_weight=0 and kl_weight=1 passed: kl_weight multiplies the KL term only."
        else:
            hint = ("obs_var=1 passed: obs_var enters twice, in (x_log - x_hat)^2 / obs_var and in "
                    "log(2 pi obs_var).")
        _compare(name, out, ref, where, hint, rtol=1e-5, atol=1e-5)
    _pass(name, f"matches mini_scvi's VAEModule.loss on {len(cases)} inputs (obs_var 0.1 .. 10, kl_weight 0 .. 1, "
          "one cell, float64, a real forward pass).")


# --------------------------------------------------------------------------- exercises 4: counts


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
    generic = "log p(x) = x log(mu) - mu - log(x!), and log(x!) = lgamma(x + 1)."
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
                       {"on random counts (float64)": "x in {0, 1} passed, larger counts fail: is the log(x!) "
                        "term, lgamma(x + 1), there?"}, generic, rtol=1e-6, atol=1e-6,
                       float32_scale=_poisson_scale)
    _pass(name, f"matches mini_scvi.distributions.poisson_log_prob on {n} inputs "
          "(random, tiny and huge means, large counts, broadcasting, float32).")


@_deterministic
def check_log_nb(log_nb: Callable) -> None:
    """``log_nb(x, mu, theta)``: elementwise log NB(x; mean mu, inverse dispersion theta), constant
    included, against ``mini_scvi.distributions.nb_log_prob``, including float32 at theta >> mu."""
    name = "log_nb"
    generic = ("log NB = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) + theta log(theta / (theta + mu)) "
               "+ x log(mu / (theta + mu)). Is mu the mean and theta the inverse dispersion (not swapped, "
               "not inverted)?")
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
                       {"on random counts (float64)": "x = 0 passed, x > 0 fails: check the terms with x, "
                        "x log(mu / (theta + mu)) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)."},
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
             "here the exact value is about -mu, a small number, and two things can destroy it in float32. "
             "(1) theta * log(theta / (theta + mu)): theta + mu rounds to theta; write -theta * log1p(mu / theta). "
             "(2) adding it to lgamma(x + theta) (about 1e6) before subtracting lgamma(theta) rounds it away; "
             "compute (lgamma(x + theta) - lgamma(theta)) first.", rtol=1e-3, atol=0.0)
    _pass(name, f"matches mini_scvi.distributions.nb_log_prob on {n + 1} inputs (random, extreme mu and theta, "
          "per-gene theta, float32 including theta >> mu).")


@_deterministic
def check_log_zinb(log_zinb: Callable) -> None:
    """``log_zinb(x, mu, theta, zi_logits)``: elementwise log ZINB, against
    ``mini_scvi.distributions.zinb_log_prob``, including extreme logits in float32."""
    name = "log_zinb"
    generic = ("with pi = sigmoid(zi_logits): log p(0) = log(pi + (1 - pi) NB(0)) and "
               "log p(x > 0) = log(1 - pi) + log NB(x).")
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
        "at x > 0 (float64)": "for x > 0 only the NB part, scaled by (1 - pi), remains: log(1 - pi) + log NB(x); "
                              "log(1 - sigmoid(l)) = -softplus(l).",
        "at x = 0 (float64)": "x > 0 passed; at x = 0 the probability is pi + (1 - pi) NB(0): the extra zeros "
                              "plus the NB's own zeros.",
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
             "log(sigmoid(l)) and log(1 - sigmoid(l)) overflow or give log(0) at large |l|. Use softplus: "
             "log(sigmoid(l)) = -softplus(-l), log(1 - sigmoid(l)) = -softplus(l), and for x = 0 "
             "log(pi + (1 - pi) NB(0)) = softplus(log NB(0) - l) - softplus(-l).", rtol=1e-4,
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
              "the Gamma rate should have mean mu: shape theta and rate theta / mu (torch's Gamma takes a "
              "rate, numpy's a scale).")
    bad_var = ((var - exp_var).abs() > 6 * se_var + 0.02 * exp_var).nonzero().flatten().tolist()
    if bad_var:
        pairs = ", ".join(f"(mu={mu[i].item():g}, theta={theta[i].item():g})" for i in bad_var)
        _fail(name, f"the sample variance is not mu + mu^2 / theta for {pairs}.",
              "a Poisson alone has variance mu; the Gamma-distributed rate adds mu^2 / theta.")
    bad_p0 = ((p0 - exp_p0).abs() > 5 * se_p0 + 1e-3).nonzero().flatten().tolist()
    if bad_p0:
        pairs = ", ".join(f"(mu={mu[i].item():g}, theta={theta[i].item():g})" for i in bad_p0)
        _fail(name, f"the fraction of zeros is not NB(0; mu, theta) for {pairs}.",
              "sample the rate from a Gamma, then the count from a Poisson with that rate.")
    m2 = torch.tensor([[1.0, 10.0], [100.0, 0.3]])
    x2 = _call(sample_nb, name, m2, torch.tensor([[2.0, 2.0], [2.0, 2.0]]), 3)
    if not isinstance(x2, torch.Tensor) or tuple(x2.shape) != (3, 2, 2):
        _fail(name, "for mu and theta of shape (2, 2) and n_samples=3 the result should have shape (3, 2, 2).")
    _pass(name, f"{n} samples for {len(mu)} (mu, theta) pairs have the NB mean, variance and fraction of zeros.")
