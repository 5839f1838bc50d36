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
import torch.nn.functional as F
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
    # exercises 5: scVI
    "check_library_prior",
    "check_kl_library",
    "check_scvi_generative",
    "check_scvi_loss",
    "check_kl_weight_at",
    # exercises 6: scVI downstream
    "check_de_probabilities",
    "check_log_marginal",
    "check_fdr_select",
    "check_zero_fraction_ppc",
    # exercises 7: AutoZI
    "check_kl_beta",
    "check_autozi_log_likelihood",
    "check_minimal_dropout_logits",
    "check_zi_call",
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
    "ex05-warmup": (
        "abcd",
        "97ff8b523c7aac37f8f014b79e42bb2a0565bd6f1af4e87559665d1e663c439d",
        "ask what each KL pulls its posterior towards: N(0, I), which carries no information about the cell, "
        "or a prior fitted to the observed log totals of the cell's batch?",
    ),
    "ex06-nb-vs-zinb": (
        "abcd",
        "22be3a91dd05b23a1e84e97d1b614fcd53f238df7892eddc08c0c379b4b6ca99",
        "compare the difference between the models with the spread between seeds, and remember which model "
        "contains the other as a special case.",
    ),
    "ex07-low-mean": (
        "abcd",
        "bba0bd8bfedb07d70e894c02324230ccd402da9044f418c039469970bbaf4e39",
        "at a mean of 0.2, what fraction of zeros do the NB and the ZINB predict, and how different are their "
        "likelihoods for a column of mostly zeros and a few ones?",
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


# --------------------------------------------------------------------------- shared helpers for exercises 5-7


def _check_array(name: str, out, shape: Sequence[int], what: str = "the result") -> np.ndarray:
    """A NumPy result (a tensor is accepted and converted) of the given shape, as float64."""
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    if not isinstance(out, (np.ndarray, np.generic, float, int, bool)):
        _fail(name, f"{what} should be a NumPy array, got {type(out).__name__}.",
              "build the result from NumPy operations on the inputs.")
    out = np.asarray(out)
    if out.shape != tuple(shape):
        _fail(name, f"{what} has shape {out.shape}, expected {tuple(shape)}.",
              "re-read the shapes in the docstring: which axis should be reduced, which kept?")
    return out


def _compare_np(name: str, got: np.ndarray, expected: np.ndarray, where: str, hint: str,
                rtol: float = 1e-6, atol: float = 1e-8) -> None:
    _compare(name, torch.as_tensor(np.asarray(got, dtype=np.float64)),
             torch.as_tensor(np.asarray(expected, dtype=np.float64)), where, hint, rtol=rtol, atol=atol)


def _check_pair(name: str, out, what: str = "(a, b)") -> tuple:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        _fail(name, f"should return a tuple {what}.")
    return tuple(out)


# --------------------------------------------------------------------------- exercises 5: scVI


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
    hint = ("for each batch b: take log(total count) of every cell of b, then their mean and their "
            "variance (np.var, which divides by the number of cells); a batch of one cell gets variance 1, "
            "and every variance is at least 1e-4.")
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
                    "the prior is on the log library: average log(total) over the cells of the batch, "
                    "not log of the average total.", rtol=1e-5, atol=1e-5)
        h = hint
        if "single cell" in where:
            h = "one cell has no spread to measure: give that batch variance 1 (a vague prior)."
        elif "same total" in where:
            h = "a variance of 0 would make the prior a point mass: floor every variance at 1e-4."
        _compare_np(name, variances, ref_v, f"in the variances {where}", h, rtol=1e-4, atol=1e-6)
    _pass(name, f"matches mini_scvi's library_log_stats on {len(cases)} data sets (1 to 5 batches, a one-cell "
          "batch, equal totals, float32).")


@_deterministic
def check_kl_library(kl_library: Callable) -> None:
    """``kl_library(ql_m, ql_v, batch_index, prior_means, prior_vars) -> (n_cells,)``, against
    ``SCVIModule.kl_library`` (and ``kl_normal`` in float64)."""
    from mini_scvi.model.scvi import SCVIModule

    name = "kl_library"
    hint = ("pick each cell's prior with prior_means[batch_index] and prior_vars[batch_index]; then "
            "KL(N(m, v) || N(m_b, v_b)) = 1/2 [log(v_b / v) + (v + (m - m_b)^2) / v_b - 1], summed over the "
            "last axis (of size 1).")
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
                  "exp(logits) overflows for large logits: use torch.softmax, which subtracts the maximum first.")
        if not torch.allclose(rho.detach().double().sum(-1), torch.ones(lg.shape[0], dtype=torch.float64), atol=1e-4):
            _fail(name, f"the rows of rho do not sum to 1 {where}.",
                  "rho is a vector of expression frequencies per cell: softmax over genes, the last axis.")
        _compare(name, rho, expected[0], f"in rho {where}", "rho = softmax(scale_logits) over genes.",
                 rtol=1e-4, atol=1e-7)
        _compare(name, mu, expected[1], f"in mu {where}",
                 "library holds the LOG library size: mu = exp(library) * rho, with library of shape "
                 "(n_cells, 1) broadcast over genes.", rtol=1e-4, atol=1e-6)
        _compare(name, theta, expected[2], f"in theta {where}",
                 "px_r is log theta (a free parameter, so that theta stays positive): theta = exp(px_r).",
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
    for label, module in modules:
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
                hint = ("with kl_weight=0 and an observed library only the reconstruction is left: "
                        "-log ZINB(x; mu, theta, zi_logits), constant log x! included, summed over genes.")
            elif kl_weight == 0.0:
                hint = ("the reconstruction passed with the observed library; with kl_weight=0, KL_l still "
                        "counts in full: the warm-up weighs only the KL of z.")
            else:
                hint = ("kl_weight multiplies KL(q(z | x) || N(0, I)) (summed over latent dimensions) and nothing "
                        "else: loss = -log p(x | z, l) + kl_weight * KL_z + KL_l.")
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


# --------------------------------------------------------------------------- exercises 6: scVI downstream

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
        "vanilla": "proba = the fraction of samples with rho1 > rho2 (strictly), one value per gene (mean over "
                   "axis 0); bayes_factor = log(p + eps) - log(1 - p + eps) with eps = 1e-8.",
        "change": "lfc = log2(rho1 + pseudocount) - log2(rho2 + pseudocount) per sample; proba = fraction of "
                  "samples with |lfc| >= delta; bayes_factor = log(p + eps) - log(1 - p + eps).",
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
            hint = "add the pseudocount to rho1 and rho2 before taking log2."
        _compare_np(name, p, ref_p, f"in proba ({where})", hint, rtol=1e-9, atol=1e-9)
        if not np.isfinite(bf).all():
            _fail(name, f"bayes_factor is infinite ({where}).",
                  "when p is 0 or 1, log(p) or log(1 - p) is infinite: add eps = 1e-8 inside each log.")
        _compare_np(name, bf, ref_bf, f"in bayes_factor ({where})", hints[mode], rtol=1e-6, atol=1e-6)
    _pass(name, f"matches the formulas of SCVI.differential_expression on {len(cases)} inputs (vanilla and "
          "change modes, p = 0 and 1, ties, tiny rho, other delta and pseudocount).")


@_deterministic
def check_log_marginal(log_marginal: Callable) -> None:
    """``log_marginal(log_w) -> (n_cells,)``: the importance-sampling estimate logsumexp_s(log_w) - log S,
    against a direct float64 computation; also checks that it is >= the mean log-weight."""
    name = "log_marginal"
    hint = ("log p(x) ~ log (1/S) sum_s exp(log_w_s) = logsumexp over the samples (axis 0) minus log S. "
            "Use torch.logsumexp: exp(log_w) underflows for log-weights of -1000.")
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
                  "by Jensen, log mean exp(w) >= mean w: average the weights, not their logs.")
        h = hint
        if "equal" in where or "single" in where:
            h = "with equal weights the average of exp(w) is exp(w): do you subtract log S (not log of something else)?"
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
    hint = ("sort the genes by proba_de, largest first; the expected FDR of the top k is the mean of "
            "(1 - proba_de) over those k genes; keep the genes in the longest top list whose expected FDR is "
            "<= fdr_target, and return the mask in the original gene order.")
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
            _fail(name, "the function modified proba_de in place (e.g. with .sort()).", "sort a copy: np.argsort.")
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
                    "the fraction of cells (axis 0) in which the gene's count is exactly 0.")
        _compare_np(name, rep, rep_each.mean(-1), f"in replicated ({where})",
                    "the same statistic in each replicate data set x_rep[..., s], averaged over the replicates.")
        _compare_np(name, ppp, (rep_each >= ref_obs[:, None]).mean(-1), f"in ppp ({where})",
                    "ppp = the fraction of replicates whose zero fraction is >= the observed one (ties count).")
    _pass(name, f"matches the zero-fraction statistic and its posterior predictive p-value on {len(cases)} inputs.")


# --------------------------------------------------------------------------- exercises 7: AutoZI


@_deterministic
def check_kl_beta(kl_beta: Callable) -> None:
    """``kl_beta(a_q, b_q, a_p, b_p)``: elementwise KL(Beta(a_q, b_q) || Beta(a_p, b_p)), against
    ``mini_scvi.distributions.kl_beta``."""
    name = "kl_beta"
    hint = ("KL = log B(a_p, b_p) - log B(a_q, b_q) + (a_q - a_p)(psi(a_q) - psi(a_q + b_q)) "
            "+ (b_q - b_p)(psi(b_q) - psi(a_q + b_q)), with log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b) "
            "and psi = torch.digamma. The expectations are under q.")
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
    hint = ("per gene: log[delta NB(x) + (1 - delta) ZINB(x)] = logaddexp(log delta + log NB(x), "
            "log(1 - delta) + log ZINB(x)) (mini_scvi.distributions.nb_log_prob, zinb_log_prob); then sum over "
            "genes. Never exponentiate log-probabilities of large counts: exp(-800) is 0.")
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
            h = ("with delta near 1 the mixture is the NB, near 0 the ZINB: delta is the weight of the NB "
                 "(the probability that the gene is NOT zero-inflated).")
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
    hint = ("pi = tau + (1 - tau) sigmoid(h); return its logit, log(pi) - log(1 - pi). Note "
            "1 - pi = (1 - tau)(1 - sigmoid(h)) and log(1 - sigmoid(h)) = -softplus(h): this stays finite "
            "when sigmoid(h) rounds to 1.")
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
                    "zi_prob = q(delta < 0.5) = scipy.stats.beta.cdf(0.5, alpha, beta).", rtol=1e-7, atol=1e-9)
        if call.dtype != bool or not np.array_equal(call, ref > thr):
            _fail(name, f"wrong is_zi {where}.",
                  "is_zi compares zi_prob (not the posterior mean of delta) with the threshold: zi_prob > threshold.")
        if thr == 0.5 and not np.array_equal(call, oa < ob):
            _fail(name, f"at threshold 0.5 the call should agree with alpha < beta {where}.")
    _pass(name, f"matches scipy's Beta cdf and AUTOZI.get_zero_inflation's rule on {len(cases)} inputs "
          "(thresholds 0.2, 0.5, 0.9; (0, 1) and large parameters; a per-batch table).")
