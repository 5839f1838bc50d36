"""Checks for exercises/ex02_autoencoders.ipynb (chapter 2: autoencoders)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mini_scvi.model.ae import AEModule, log_normalize as _ref_log_normalize
from mini_scvi.nn import FCLayers

from ._common import (add_questions, _call, _check_tensor, _check_unchanged, _clone, _close, _compare,
                      _deterministic, _fail, _pass, _rng)

__all__ = ["check_log_normalize", "check_ae_forward", "check_reconstruction_loss", "check_pca_reconstruction",
           "check_subspace_cosines"]

add_questions({
    "ex02-linear-ae": (
        "abcd",
        "940f9640b34b40ffc5ff713bd996f815c1ef27c57e27251e7b59c3961600bac9",
        "compare the columns of W with the principal directions after a rotation: does the loss change "
        "if you replace W by W R for an orthogonal k x k matrix R?",
    ),
})


@_deterministic
def check_log_normalize(log_normalize: Callable) -> None:
    """``log_normalize(x, target_sum=1e4)``: (n_cells, n_genes) counts -> same shape, against
    ``mini_scvi.model.ae.log_normalize``."""
    name = "log_normalize"
    hint = ("each cell is rescaled by its own library size before the log: which axis holds one cell's "
            "genes, and where does target_sum enter? (the statement; chapter 1, 'Library size and genes "
            "detected')")
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
                  "a zero count must stay finite after the transform: re-read why the statement adds "
                  "something inside the log.")
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
    hint = ("re-read which layers the statement follows with an activation and which it leaves linear, "
            "and apply the layers in the order given (chapter 2, 'Encoder, bottleneck, decoder').")
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
                  "the code may take any real value: what does an activation after the encoder's last "
                  "layer do to it?")
        if (x_ref < 0).any() and (x_hat.detach() >= 0).all():
            _fail(name, f"x_hat has no negative entries {where}.",
                  "the reconstruction of centred or log data can be negative: what does an activation "
                  "after the decoder's last layer do to it? (chapter 2, 'The output activation must match the "
                  "data')")
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
    hint = ("one value per cell: which axis holds the genes, and does the loss add up their errors or "
            "average them? (chapter 2, 'The loss: mean squared error, summed over genes')")
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
                  "the loss adds up the genes' errors; nn.MSELoss-style averaging divides by n_genes.")
        _compare(name, out, expected, where, hint)
    _pass(name, f"matches the reconstruction term of mini_scvi's AEModule.loss on {len(cases)} inputs.")


@_deterministic
def check_pca_reconstruction(pca_reconstruction: Callable) -> None:
    """``pca_reconstruction(x, k) -> x_rec`` (n_cells, n_genes), against scikit-learn's PCA
    (``inverse_transform(fit_transform(x))``)."""
    from sklearn.decomposition import PCA

    name = "pca_reconstruction"
    hint = ("PCA works on centred data: what has to be removed before the SVD and put back after "
            "projecting, and which singular vectors span the top-k principal directions? (chapter 2, 'The "
            "linear autoencoder is PCA')")
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


def _ref_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(a) and span(b), largest first, by scipy."""
    from scipy.linalg import subspace_angles

    angles = subspace_angles(a.double().numpy(), b.double().numpy())  # largest angle first
    return torch.from_numpy(np.cos(angles[::-1]).copy())


@_deterministic
def check_subspace_cosines(subspace_cosines: Callable) -> None:
    """``subspace_cosines(a, b) -> (min(k, l),)``: the cosines of the principal angles between the
    column spaces of a (n, k) and b (n, l), largest first, against ``scipy.linalg.subspace_angles``."""
    name = "subspace_cosines"
    hint = ("principal angles compare two subspaces, not the vectors that happen to span them: the answer "
            "must not change if a is replaced by a A for any invertible k x k matrix A (re-read the statement "
            "on orthonormal bases; chapter 2, 'The linear autoencoder is PCA').")
    g = _rng()
    d = torch.float64

    def randn(*shape, dtype=d):
        return torch.randn(*shape, generator=g, dtype=dtype)

    basis = torch.linalg.qr(randn(30, 6))[0]
    a3, rest = basis[:, :3], basis[:, 3:]
    mix = randn(3, 3) + 3 * torch.eye(3, dtype=d)  # invertible, far from orthogonal
    tilted = torch.cat([a3[:, :2], (a3[:, 2:] + 0.5 * rest[:, :1]) / math.sqrt(1.25)], dim=1)
    cases = [
        ("for two random 3-dimensional subspaces of R^30", randn(30, 3), randn(30, 3)),
        ("for the same subspace spanned by other, non-orthogonal vectors", a3, a3 @ mix),
        ("for the same subspace with columns of very different lengths", a3 * torch.tensor([1e-3, 1.0, 1e3], dtype=d), a3),
        ("for orthogonal subspaces", a3, rest),
        ("for subspaces that share two directions and tilt in the third", a3 @ mix, tilted),
        ("for a 3- and a 2-dimensional subspace", randn(30, 3), randn(30, 2)),
        ("for a single direction against a subspace", randn(30, 1), a3),
        ("in float32", randn(40, 4, dtype=torch.float32), randn(40, 4, dtype=torch.float32)),
    ]
    for where, a, b in cases:
        orig = _clone(a, b)
        out = _call(subspace_cosines, name, a, b)
        _check_unchanged(name, orig, [a, b])
        _check_tensor(name, out, (min(a.shape[1], b.shape[1]),), a.dtype, "the cosines")
        expected = _ref_cosines(*orig)
        got = out.detach().double()
        if (got < -1e-6).any() or (got > 1 + 1e-5).any():
            _fail(name, f"values outside [0, 1] {where}.",
                  "these are cosines of angles between 0 and 90 degrees: angles themselves, or an inner product "
                  "of vectors that are not unit length, fall outside [0, 1].")
        if len(got) > 1 and _close(got.flip(0), expected, 1e-4, 1e-5) and not _close(got, expected, 1e-4, 1e-5):
            _fail(name, f"the cosines are in the wrong order {where}.", "the statement asks for the largest first.")
        tol = 1e-4 if a.dtype == torch.float32 else 1e-8
        _compare(name, out, expected, where, hint, rtol=tol, atol=tol)
    _pass(name, f"matches scipy.linalg.subspace_angles on {len(cases)} pairs of subspaces (other bases of the "
          "same space, orthogonal, tilted, of different dimensions, float32).")
