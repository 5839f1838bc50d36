"""The autoencoder (chapter 2) and the Gaussian VAE (chapter 3): they learn, they are reproducible,
and they report what they optimize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import mini_scvi
from mini_scvi.model import AE, VAE
from mini_scvi.model.ae import log_normalize


def _ari(adata, z) -> float:
    pred = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(z)
    return adjusted_rand_score(adata.obs["profile"].cat.codes.to_numpy(), pred)


def _fit(model_cls, adata, max_epochs, **kw):
    model_cls.setup_anndata(adata)
    m = model_cls(adata, n_latent=2, **kw)
    m.train(max_epochs=max_epochs, progress_bar=False)
    return m


@pytest.fixture(scope="module")
def vae_profiles():
    """A VAE with a 2-D latent trained on three_profiles (3,000 cells x 300 genes), shared by several tests."""
    mini_scvi.settings.seed = 0
    a = mini_scvi.data.three_profiles(n_cells=3000, n_genes=300)
    return _fit(VAE, a, max_epochs=5), a


# ----------------------------------------------------------------------------- they learn


def test_untrained_latent_does_not_separate_profiles():
    # makes the acceptance tests below meaningful: a random network does not pass them
    a = mini_scvi.data.three_profiles(n_cells=3000, n_genes=300)
    VAE.setup_anndata(a)
    assert _ari(a, VAE(a, n_latent=2).get_latent_representation()) < 0.8


def test_ae_latent_separates_three_profiles():
    a = mini_scvi.data.three_profiles(n_cells=3000, n_genes=300)
    m = _fit(AE, a, max_epochs=5)
    z = m.get_latent_representation()
    assert z.shape == (3000, 2) and np.isfinite(z).all()
    assert _ari(a, z) >= 0.95


def test_vae_latent_separates_three_profiles(vae_profiles):
    m, a = vae_profiles
    z = m.get_latent_representation(give_mean=True)
    assert z.shape == (3000, 2)
    assert _ari(a, z) >= 0.95


def test_vae_full_size_three_profiles():
    # the acceptance test at the course's full size: 6,000 cells x 1,000 genes
    a = mini_scvi.data.three_profiles()
    assert a.shape == (6000, 1000)
    m = _fit(VAE, a, max_epochs=3)
    assert _ari(a, m.get_latent_representation()) >= 0.95


def test_ae_reconstruction_reaches_the_profile_means():
    a = mini_scvi.data.three_profiles(n_cells=1500, n_genes=150)
    AE.setup_anndata(a)
    m = AE(a, n_latent=2, hidden_sizes=(64, 16))
    m.train(max_epochs=15, batch_size=32, progress_bar=False)
    r = m.get_reconstruction()
    assert isinstance(r, torch.Tensor) and r.shape == (1500, 150)
    xl = log_normalize(torch.as_tensor(np.asarray(a.X))).numpy()
    mse = ((xl - r.numpy()) ** 2).sum(1).mean()
    prof = a.obs["profile"].cat.codes.to_numpy()
    # best possible without modelling Poisson noise: each cell predicted by its profile's mean
    oracle = np.mean([((xl[prof == p] - xl[prof == p].mean(0)) ** 2).sum(1).mean() for p in range(3)])
    baseline = ((xl - xl.mean(0)) ** 2).sum(1).mean()  # one mean for all cells
    assert mse < 1.1 * oracle < baseline
    # the reconstruction on a subset is the matching rows (cells are processed independently in eval mode)
    sub = a[::7].copy()
    np.testing.assert_allclose(m.get_reconstruction(sub).numpy(), r.numpy()[::7], rtol=1e-4, atol=1e-4)


def test_ae_latent_ignores_give_mean_and_matches_on_subsets():
    a = mini_scvi.data.three_profiles(n_cells=400, n_genes=30)
    m = _fit(AE, a, max_epochs=1, hidden_sizes=(16,))
    z = m.get_latent_representation()
    np.testing.assert_array_equal(z, m.get_latent_representation(give_mean=False))
    np.testing.assert_allclose(m.get_latent_representation(a[100:150].copy()), z[100:150], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the VAE's loss


def test_vae_reports_reconstruction_and_kl(vae_profiles):
    m, _ = vae_profiles
    h = m.history
    assert np.all(h["kl_local_train"].to_numpy() > 0)
    assert np.all(h["kl_local_validation"].to_numpy() > 0)
    assert np.all(h["reconstruction_loss_train"].to_numpy() > 0)
    # the training ELBO improves
    elbo = h["elbo_train"].to_numpy().ravel()
    assert elbo[-1] < 0.8 * elbo[0]


def test_vae_loss_is_gaussian_nll_plus_kl():
    a = mini_scvi.data.three_profiles(n_cells=300, n_genes=30)
    obs_var = 0.5
    m = _fit(VAE, a, max_epochs=1, hidden_sizes=(16,), obs_var=obs_var)
    tensors = next(m._data().batches(np.arange(64), 64))
    m.module.eval()
    with torch.no_grad():
        inf, gen, out = m.module(tensors, kl_weight=0.3)
    x_log = torch.log1p(tensors["X"] / tensors["X"].sum(1, keepdim=True) * 1e4)
    torch.testing.assert_close(inf["x_log"], x_log)
    # -log N(x_log; x_hat, obs_var), summed over genes
    nll = -torch.distributions.Normal(gen["x_hat"], math.sqrt(obs_var)).log_prob(x_log).sum(-1)
    torch.testing.assert_close(out.reconstruction_loss, nll, rtol=1e-5, atol=1e-4)
    # KL(N(qz_m, qz_v) || N(0, I)), summed over latent dimensions
    q = torch.distributions.Normal(inf["qz_m"], inf["qz_v"].sqrt())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(out.kl_local, kl, rtol=1e-5, atol=1e-5)
    assert out.reconstruction_loss.shape == out.kl_local.shape == (64,)
    torch.testing.assert_close(out.loss, (nll + 0.3 * kl).mean(), rtol=1e-5, atol=1e-4)
    # the posterior sample z is drawn from q: it differs from the mean, by about sqrt(qz_v)
    assert not torch.equal(inf["z"], inf["qz_m"])
    standardized = (inf["z"] - inf["qz_m"]) / inf["qz_v"].sqrt()
    assert standardized.abs().max() < 6


def test_vae_give_mean_false_samples_the_posterior(vae_profiles):
    m, _ = vae_profiles
    z_mean = m.get_latent_representation(give_mean=True)
    z1, z2 = m.get_latent_representation(give_mean=False), m.get_latent_representation(give_mean=False)
    assert z1.shape == z_mean.shape
    assert not np.array_equal(z1, z2)
    # samples scatter around the mean: their average over two draws is closer to it than one draw
    assert np.abs((z1 + z2) / 2 - z_mean).mean() < np.abs(z1 - z_mean).mean()


def test_vae_sample(vae_profiles):
    m, a = vae_profiles
    x = m.sample(500)
    assert isinstance(x, np.ndarray) and x.shape == (500, 300)
    assert np.isfinite(x).all()
    # add_noise adds N(0, obs_var) to the same decoded means (same z when the seed is the same)
    mini_scvi.settings.seed = 1
    clean = m.sample(500)
    mini_scvi.settings.seed = 1
    noisy = m.sample(500, add_noise=True)
    noise = noisy - clean
    assert noise.std() == pytest.approx(math.sqrt(m.module.obs_var), rel=0.03)
    assert abs(noise.mean()) < 0.02


# ----------------------------------------------------------------------------- reproducibility and persistence


@pytest.mark.parametrize("model_cls", [AE, VAE])
def test_same_seed_same_model(model_cls):
    runs = []
    for _ in range(2):
        mini_scvi.settings.seed = 0
        a = mini_scvi.data.three_profiles(n_cells=500, n_genes=40)
        m = _fit(model_cls, a, max_epochs=2, hidden_sizes=(32,))
        runs.append((m.history, m.get_latent_representation(), m.train_indices))
    (h1, z1, t1), (h2, z2, t2) = runs
    assert set(h1) == set(h2)
    for key in h1:
        np.testing.assert_array_equal(h1[key].to_numpy(), h2[key].to_numpy())
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_array_equal(t1, t2)
    # and another seed gives another model
    mini_scvi.settings.seed = 1
    a = mini_scvi.data.three_profiles(n_cells=500, n_genes=40)
    m = _fit(model_cls, a, max_epochs=2, hidden_sizes=(32,))
    assert not np.array_equal(m.get_latent_representation(), z1)


@pytest.mark.parametrize("model_cls", [AE, VAE])
def test_save_load_roundtrip(model_cls, tmp_path):
    a = mini_scvi.data.three_profiles(n_cells=400, n_genes=30)
    m = _fit(model_cls, a, max_epochs=2, hidden_sizes=(16,), dropout_rate=0.2)
    z = m.get_latent_representation(give_mean=True)
    m.save(tmp_path / "model")
    fresh = mini_scvi.data.three_profiles(n_cells=400, n_genes=30)  # never set up
    loaded = model_cls.load(tmp_path / "model", fresh)
    assert type(loaded) is model_cls and loaded.is_trained
    assert loaded.init_params == m.init_params
    np.testing.assert_array_equal(loaded.get_latent_representation(give_mean=True), z)
    assert set(loaded.history) == set(m.history)
    for key in m.history:
        np.testing.assert_array_equal(loaded.history[key].to_numpy(), m.history[key].to_numpy())
    for (k1, v1), (k2, v2) in zip(m.module.state_dict().items(), loaded.module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    if model_cls is AE:
        torch.testing.assert_close(loaded.get_reconstruction(), m.get_reconstruction(), rtol=0, atol=0)


def test_save_with_anndata_and_load_without(tmp_path):
    a = mini_scvi.data.three_profiles(n_cells=200, n_genes=20)
    m = _fit(VAE, a, max_epochs=1, hidden_sizes=(8,))
    m.save(tmp_path / "m", save_anndata=True)
    loaded = VAE.load(tmp_path / "m")
    assert loaded.adata.shape == (200, 20)
    np.testing.assert_array_equal(loaded.get_latent_representation(), m.get_latent_representation())


def test_repr_reports_training_state(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=3, hidden_sizes=(8,))
    assert "600 cells x 60 genes" in repr(m) and "trained: False" in repr(m)
    m.train(max_epochs=1, progress_bar=False)
    assert "trained: True" in repr(m)
