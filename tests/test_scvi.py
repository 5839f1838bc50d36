"""SCVI (mini_scvi.model.scvi): shapes for every likelihood / dispersion / library mode, the loss
terms against direct scipy / numpy computations, and what a trained model must recover from
simulated data with known truth (cell types, batch effect, DE genes, library sizes).

Models that several tests look at are trained once per module (fixtures below) on small simulated
data, so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.special import expit, gammaln
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

import mini_scvi
from mini_scvi.model import SCVI

FAST = {"progress_bar": False, "batch_size": 32}
LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")


def _tiny(seed: int = 3, n_cells: int = 120, n_genes: int = 20) -> ad.AnnData:
    """Two batches, two cell types, a few dozen counts per cell: enough to exercise every code path."""
    a = mini_scvi.data.simulate_counts(
        n_cells=n_cells, n_genes=n_genes, n_cell_types=2, n_batches=2, batch_effect=0.5,
        de_fraction=0.3, mean_log_expr=1.0, seed=seed,
    )
    assert (a.X.sum(1) > 0).all()
    return a


def _tiny_model(setup: dict | None = None, epochs: int = 2, **model_kwargs) -> tuple[ad.AnnData, SCVI]:
    a = _tiny()
    SCVI.setup_anndata(a, **({"batch_key": "batch", "labels_key": "cell_type"} if setup is None else setup))
    m = SCVI(a, n_hidden=16, n_latent=3, **model_kwargs)
    if epochs:
        m.train(max_epochs=epochs, plan_kwargs={"lr": 1e-3}, **FAST)
    return a, m


def _first_batch(model: SCVI, n: int = 40) -> dict:
    return next(model._data().batches(np.arange(n), n))


def _scipy_log_lik(x: torch.Tensor, gen: dict, likelihood: str) -> np.ndarray:
    """sum_g log p(x_g | z, l) with scipy, in float64, from the decoder's outputs: (n,)."""
    x = x.numpy().astype(np.float64)
    mu = gen["px_rate"].numpy().astype(np.float64)
    if likelihood == "poisson":
        return stats.poisson.logpmf(x, mu).sum(1)
    theta = gen["px_r"].numpy().astype(np.float64)
    log_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    if likelihood == "nb":
        return log_nb.sum(1)
    pi = expit(gen["px_dropout"].numpy().astype(np.float64))
    log_zinb = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(log_nb)), np.log1p(-pi) + log_nb)
    return log_zinb.sum(1)


def _check_reconstruction_against_scipy(model: SCVI, likelihood: str) -> None:
    """LossOutput.reconstruction_loss (precomputed sum log x!) == -log p(x | z, l) from scipy."""
    tensors = _first_batch(model)
    model.module.eval()
    with torch.no_grad():
        _, gen, out = model.module(tensors)
    expected = -_scipy_log_lik(tensors["X"], gen, likelihood)
    np.testing.assert_allclose(out.reconstruction_loss.numpy(), expected, rtol=1e-4, atol=1e-3)
    # and the per-cell constant the data layer precomputed is sum_g log x_ng!
    x = tensors["X"].numpy().astype(np.float64)
    np.testing.assert_allclose(tensors["log_x_factorial"].numpy(), gammaln(x + 1).sum(1), rtol=1e-5)


def _knn_other_batch_fraction(z: np.ndarray, batch: np.ndarray, k: int = 15) -> float:
    """Mean fraction of each cell's k nearest neighbours (itself excluded) that come from another batch."""
    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    return float((batch[idx] != batch[:, None]).mean())


def _kmeans_ari(z: np.ndarray, truth, k: int) -> float:
    return adjusted_rand_score(np.asarray(truth), KMeans(k, n_init=10, random_state=0).fit_predict(z))


# ----------------------------------------------------------------------------- module-scoped models


@pytest.fixture(scope="module")
def celltype_model() -> tuple[ad.AnnData, SCVI]:
    """3 simulated cell types (30% DE genes), varied library sizes, a learned library (ZINB).

    60 epochs at lr 1e-2, then 10 at lr 1e-3 so that BatchNorm's slow running statistics
    (momentum 0.01) catch up with the weights before eval-mode outputs are read.
    """
    mini_scvi.settings.seed = 0
    a = mini_scvi.data.simulate_counts(
        n_cells=800, n_genes=100, n_cell_types=3, de_fraction=0.3, de_lfc=2.0, mean_log_expr=1.0,
        library_log_sd=0.5, seed=0,
    )
    SCVI.setup_anndata(a)
    m = SCVI(a, n_latent=5, use_observed_lib_size=False)
    m.train(max_epochs=60, batch_size=64, plan_kwargs={"lr": 1e-2, "n_epochs_kl_warmup": 20}, progress_bar=False)
    m.train(max_epochs=10, batch_size=64, plan_kwargs={"lr": 1e-3, "n_epochs_kl_warmup": None}, progress_bar=False)
    return a, m


@pytest.fixture(scope="module")
def batch_latents() -> dict:
    """A strong simulated batch effect, trained with and without batch_key (same data, same seed)."""
    a = mini_scvi.data.simulate_counts(
        n_cells=800, n_genes=100, n_cell_types=3, n_batches=2, batch_effect=1.0, de_fraction=0.3,
        de_lfc=2.0, mean_log_expr=1.0, seed=1,
    )
    out = {"adata": a}
    for name, key in (("with_batch", "batch"), ("without_batch", None)):
        mini_scvi.settings.seed = 0
        b = a.copy()
        SCVI.setup_anndata(b, batch_key=key)
        m = SCVI(b, n_latent=2)
        m.train(max_epochs=30, batch_size=64, plan_kwargs={"lr": 1e-2, "n_epochs_kl_warmup": 10}, progress_bar=False)
        out[name] = m.get_latent_representation()
    return out


# ----------------------------------------------------------------------------- every option trains


# every value of each option at least once, and the learned library with gene-batch dispersion
CASES = [
    ("zinb", "gene", True),
    ("zinb", "gene-batch", False),
    ("nb", "gene-label", False),
    ("nb", "gene-cell", True),
    ("poisson", "gene", False),
    ("poisson", "gene-batch", True),
]


def test_cases_cover_every_option():
    assert {c[0] for c in CASES} == set(LIKELIHOODS)
    assert {c[1] for c in CASES} == set(DISPERSIONS)
    assert {c[2] for c in CASES} == {True, False}
    assert ("gene-batch", False) in {(c[1], c[2]) for c in CASES}


@pytest.mark.parametrize("likelihood,dispersion,observed", CASES)
def test_every_option_trains_with_right_shapes(likelihood, dispersion, observed):
    a, m = _tiny_model(gene_likelihood=likelihood, dispersion=dispersion, use_observed_lib_size=observed)
    n, G = a.shape
    # finite curves for every logged term, one value per epoch
    assert {"elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_train"} <= set(m.history)
    for key, df in m.history.items():
        assert len(df) == 2 and np.isfinite(df.to_numpy()).all(), key

    assert m.get_latent_representation().shape == (n, 3)
    assert m.get_latent_representation(give_mean=False).shape == (n, 3)

    for size in (1, 1e4):
        expr = m.get_normalized_expression(library_size=size)
        assert isinstance(expr, pd.DataFrame) and expr.shape == (n, G)
        assert list(expr.columns) == list(a.var_names) and list(expr.index) == list(a.obs_names)
        assert (expr.to_numpy() >= 0).all()
        np.testing.assert_allclose(expr.sum(1).to_numpy(), size, rtol=1e-4)
    assert m.get_normalized_expression(transform_batch="batch1", indices=np.arange(7)).shape == (7, G)
    assert m.get_normalized_expression(n_samples=3, return_mean=False).shape == (3, n, G)

    one = m.posterior_predictive_sample(n_samples=1)
    three = m.posterior_predictive_sample(n_samples=3)
    assert one.shape == (n, G) and three.shape == (n, G, 3)
    for draws in (one, three):
        assert np.isfinite(draws).all() and (draws >= 0).all() and (draws == np.round(draws)).all()

    # the inverse dispersion follows the requested sharing across cells
    tensors = _first_batch(m)
    with torch.no_grad():
        m.module.eval()
        theta = m.module(tensors)[1]["px_r"].numpy()
    # (n, G), or (G,) broadcast over cells for 'gene' dispersion
    assert theta.shape == ((G,) if dispersion == "gene" else (40, G))
    theta = np.broadcast_to(theta, (40, G))
    group = {"gene": np.zeros(40), "gene-batch": tensors["batch"].numpy(), "gene-label": tensors["labels"].numpy()}
    if dispersion in group:
        for g in np.unique(group[dispersion]):
            rows = theta[group[dispersion] == g]
            np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
        if dispersion != "gene":
            assert len(np.unique(group[dispersion])) == 2
            assert not np.allclose(theta[group[dispersion] == 0][0], theta[group[dispersion] == 1][0])
    else:  # gene-cell: every cell its own theta
        assert not np.allclose(theta[0], theta[1])

    _check_reconstruction_against_scipy(m, likelihood)


# ----------------------------------------------------------------------------- loss terms, directly


def test_library_prior_and_kl_match_numpy():
    a, m = _tiny_model(use_observed_lib_size=False, epochs=1)
    log_totals = np.log(a.X.astype(np.float64).sum(1))
    codes = a.obs["batch"].cat.codes.to_numpy()
    means = np.array([log_totals[codes == b].mean() for b in range(2)])
    variances = np.array([log_totals[codes == b].var() for b in range(2)])
    np.testing.assert_allclose(m.module.library_log_means.numpy(), means, rtol=1e-6)
    np.testing.assert_allclose(m.module.library_log_vars.numpy(), variances, rtol=1e-5)

    tensors = _first_batch(m)
    m.module.eval()
    with torch.no_grad():
        inf, _, out = m.module(tensors)
    b = tensors["batch"].numpy()
    assert len(np.unique(b)) == 2
    ql_m = inf["ql_m"].numpy().astype(np.float64)[:, 0]
    ql_v = inf["ql_v"].numpy().astype(np.float64)[:, 0]
    mp, vp = means[b], variances[b]
    kl_l = 0.5 * (np.log(vp / ql_v) + (ql_v + (ql_m - mp) ** 2) / vp - 1.0)
    qz_m, qz_v = inf["qz_m"].numpy().astype(np.float64), inf["qz_v"].numpy().astype(np.float64)
    kl_z = 0.5 * (-np.log(qz_v) - 1.0 + qz_v + qz_m**2).sum(1)
    np.testing.assert_allclose(m.module.kl_library(inf, tensors["batch"]).numpy(), kl_l, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.kl_local.numpy(), kl_z + kl_l, rtol=1e-4, atol=1e-5)
    # the loss is the mean over cells of reconstruction + KL(z) + KL(l) (kl_weight 1)
    np.testing.assert_allclose(out.loss.item(), (out.reconstruction_loss.numpy() + kl_z + kl_l).mean(), rtol=1e-5)
    # KL warm-up weighs the KL of z only
    with torch.no_grad():
        half = m.module.loss(tensors, inf, m.module.generative(**m.module._get_generative_input(tensors, inf)), kl_weight=0.5)
    np.testing.assert_allclose(half.loss.item(), (out.reconstruction_loss.numpy() + 0.5 * kl_z + kl_l).mean(), rtol=1e-5)


def test_observed_library_has_no_library_kl():
    a, m = _tiny_model(use_observed_lib_size=True, epochs=0)
    tensors = _first_batch(m)
    m.module.eval()
    with torch.no_grad():
        inf, _, out = m.module(tensors)
    np.testing.assert_allclose(inf["library"].numpy()[:, 0], np.log(tensors["X"].numpy().sum(1)), rtol=1e-6)
    assert (m.module.kl_library(inf, tensors["batch"]) == 0).all()
    qz_m, qz_v = inf["qz_m"].numpy().astype(np.float64), inf["qz_v"].numpy().astype(np.float64)
    np.testing.assert_allclose(out.kl_local.numpy(), 0.5 * (-np.log(qz_v) - 1 + qz_v + qz_m**2).sum(1), rtol=1e-4)


# ----------------------------------------------------------------------------- what training recovers


def test_learned_library_tracks_total_counts(celltype_model):
    a, m = celltype_model
    ql_m = np.concatenate([inf["ql_m"][:, 0].numpy() for _, inf in m._forward_batches(None, 1024)])
    r = np.corrcoef(ql_m, np.log(a.X.sum(1)))[0, 1]
    print(f"\n[scvi] corr(E_q[log l], log total counts) = {r:.3f}")
    assert r > 0.9


def test_latent_separates_cell_types(celltype_model):
    a, m = celltype_model
    z = m.get_latent_representation()
    score = _kmeans_ari(z, a.obs["cell_type"], 3)
    print(f"\n[scvi] cell-type ARI (KMeans k=3 on the latent) = {score:.3f}")
    assert score >= 0.9


def test_batch_key_removes_the_batch_effect(batch_latents):
    a = batch_latents["adata"]
    batch = a.obs["batch"].cat.codes.to_numpy()
    assert 0.4 < batch.mean() < 0.6  # 50/50, so ideal mixing is about 0.5
    scores = {}
    for name in ("with_batch", "without_batch"):
        z = batch_latents[name]
        scores[name] = {
            "cell_type_ari": _kmeans_ari(z, a.obs["cell_type"], 3),
            "batch_ari": _kmeans_ari(z, batch, 2),
            "mixing": _knn_other_batch_fraction(z, batch),
        }
    print(f"\n[scvi] batch correction: {scores}")
    good, bad = scores["with_batch"], scores["without_batch"]
    assert good["cell_type_ari"] >= 0.9
    assert good["mixing"] >= 0.3 and good["batch_ari"] < 0.1
    # the test can fail: without batch_key the same model keeps the batches apart
    assert bad["mixing"] < 0.1 and bad["batch_ari"] > 0.5
    assert bad["mixing"] < good["mixing"] - 0.2


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_de_ranks_the_simulated_de_genes_first(celltype_model, mode):
    a, m = celltype_model
    lfc = a.varm["lfc"]
    true_lfc = lfc["type0"] - lfc["type1"]
    truth = true_lfc != 0
    k = int(truth.sum())
    assert k >= 10
    de = m.differential_expression(groupby="cell_type", group1="type0", group2="type1", mode=mode, n_samples=2000)
    assert {"proba_de", "bayes_factor", "lfc_mean", "raw_mean1", "raw_mean2", "scale1", "scale2"} <= set(de.columns)
    assert len(de) == a.n_vars and set(de.index) == set(a.var_names)
    assert de["proba_de"].between(0, 1).all() and np.isfinite(de["bayes_factor"]).all()
    X = a.X
    in1 = (a.obs["cell_type"] == "type0").to_numpy()
    np.testing.assert_allclose(de.loc[a.var_names, "raw_mean1"], X[in1].mean(0), rtol=1e-5)
    np.testing.assert_allclose(de.loc[a.var_names, "raw_mean2"], X[(a.obs["cell_type"] == "type1").to_numpy()].mean(0), rtol=1e-5)
    if mode == "vanilla":
        top = de["bayes_factor"].abs().sort_values(ascending=False, kind="stable").index[:k]
    else:
        top = de.index[:k]
    precision = float(truth[top].mean())
    print(f"\n[scvi] DE {mode}: precision among top {k} = {precision:.2f}")
    assert precision >= 0.9
    hits = [g for g in top if truth[g]]
    agree = np.sign(de.loc[hits, "lfc_mean"]) == np.sign(true_lfc[hits])
    assert agree.all(), de.loc[hits][~agree.to_numpy()]


def test_marginal_ll_is_above_the_elbo(celltype_model):
    a, m = celltype_model
    idx = np.arange(150)
    torch.manual_seed(0)
    elbo = m.get_elbo(indices=idx)
    mll_200 = m.get_marginal_ll(indices=idx, n_mc_samples=200)
    mll_5 = m.get_marginal_ll(indices=idx, n_mc_samples=5)
    rec = m.get_reconstruction_error(indices=idx)["reconstruction_loss"]
    print(f"\n[scvi] ELBO {elbo:.2f}, log p(x) IS-5 {mll_5:.2f}, IS-200 {mll_200:.2f}, reconstruction {rec:.2f}")
    assert all(np.isfinite([elbo, mll_200, mll_5, rec]))
    assert mll_200 >= elbo - 0.2  # Jensen, up to Monte Carlo noise
    assert mll_200 >= mll_5 - 0.2  # more importance samples: a tighter (larger) bound on average
    assert -rec >= elbo  # the ELBO subtracts the (non-negative) KL terms


def test_reconstruction_matches_scipy_after_training(celltype_model):
    _, m = celltype_model
    _check_reconstruction_against_scipy(m, "zinb")


# ----------------------------------------------------------------------------- persistence, seeds


def test_save_load_round_trip(tmp_path):
    a, m = _tiny_model(use_observed_lib_size=False, gene_likelihood="nb", dispersion="gene-batch")
    m.save(tmp_path / "scvi")
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "scvi")
    b = a.copy()
    m2 = SCVI.load(tmp_path / "scvi", b)
    assert m2.module.gene_likelihood == "nb" and m2.module.dispersion == "gene-batch"
    assert not m2.module.use_observed_lib_size
    np.testing.assert_array_equal(m.get_latent_representation(), m2.get_latent_representation(b))
    torch.manual_seed(1)
    e1 = m.get_normalized_expression(n_samples=1)
    torch.manual_seed(1)
    e2 = m2.get_normalized_expression(b, n_samples=1)
    pd.testing.assert_frame_equal(e1, e2)
    np.testing.assert_array_equal(m.module.library_log_means.numpy(), m2.module.library_log_means.numpy())
    assert set(m.history) == set(m2.history)
    for key in m.history:
        np.testing.assert_array_equal(m.history[key].to_numpy(), m2.history[key].to_numpy())


def test_same_seed_same_history_and_latent():
    runs = []
    for _ in range(2):
        mini_scvi.settings.seed = 7
        a, m = _tiny_model()
        runs.append((m.history, m.get_latent_representation()))
    (h1, z1), (h2, z2) = runs
    assert set(h1) == set(h2)
    for key in h1:
        pd.testing.assert_frame_equal(h1[key], h2[key])
    np.testing.assert_array_equal(z1, z2)
    mini_scvi.settings.seed = 8
    _, m3 = _tiny_model()
    assert not np.array_equal(m3.get_latent_representation(), z1)


# ----------------------------------------------------------------------------- clear errors


def test_normalized_data_is_refused():
    a = _tiny()
    a.X = a.X / a.X.sum(1, keepdims=True) * 1e4
    with pytest.raises(ValueError, match="raw counts"):
        SCVI.setup_anndata(a)
    b = _tiny()
    b.X = np.log1p(b.X)
    with pytest.raises(ValueError, match="raw counts"):
        SCVI.setup_anndata(b)


def test_bad_arguments_give_clear_errors():
    a, m = _tiny_model(epochs=0)
    with pytest.raises(ValueError, match="transform_batch"):
        m.get_normalized_expression(transform_batch="batch7")
    with pytest.raises(ValueError, match="transform_batch"):  # a number is a name too, not an iterable
        m.get_normalized_expression(transform_batch=7)
    # idx1 alone compares with every other cell, and says so
    de = m.differential_expression(idx1=np.arange(10), n_samples=20)
    assert set(de["comparison"]) == {"group1 vs rest"}
    de = m.differential_expression(idx1=np.arange(10), idx2=np.arange(10, 30), n_samples=20)
    assert set(de["comparison"]) == {"group1 vs group2"}
    with pytest.raises(KeyError, match="groupby"):
        m.differential_expression(groupby="no_such_column", group1="type0")
    with pytest.raises(ValueError, match="no cells"):
        m.differential_expression(groupby="cell_type", group1="type9")
    with pytest.raises(ValueError, match="no cells"):
        m.differential_expression(groupby="cell_type", group1="type0", group2="type9")
    with pytest.raises(ValueError, match="mode"):
        m.differential_expression(groupby="cell_type", group1="type0", mode="bayes")
    with pytest.raises(ValueError, match="gene_likelihood"):
        SCVI(a, gene_likelihood="zip")
    with pytest.raises(ValueError, match="dispersion"):
        SCVI(a, dispersion="gene-gene")

    # gene-label dispersion needs labels
    b = _tiny()
    SCVI.setup_anndata(b, batch_key="batch")
    with pytest.raises(ValueError, match="labels"):
        SCVI(b, dispersion="gene-label")

    # a new AnnData must have the model's genes, in order, and raw counts
    other = a[:, a.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="genes"):
        m.get_latent_representation(other)
    with pytest.raises(ValueError, match="genes"):
        m.get_normalized_expression(a[:, :10].copy())
    normalized = a.copy()
    normalized.X = normalized.X / normalized.X.sum(1, keepdims=True)
    with pytest.raises(ValueError, match="raw counts"):
        m.get_latent_representation(normalized)
