"""AUTOZI (mini_scvi.model.autozi): the priors, the Beta KL against numerical integration, the
NB / ZINB mixture likelihood against scipy, the loss, every zero-inflation mode with empirical
Bayes, recovery of simulated zero-inflated genes, persistence, errors, and the scvi-tools AutoZI
tutorial's code run against mini_scvi with only the import changed.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, special, stats
from sklearn.metrics import roc_auc_score

import mini_scvi
from mini_scvi.distributions import kl_beta
from mini_scvi.model import AUTOZI

FAST = {"progress_bar": False, "batch_size": 32}
MODES = {"gene": {}, "gene-batch": {"batch_key": "batch"}, "gene-label": {"labels_key": "cell_type"}}
TABLE_COLUMNS = ["alpha_posterior", "beta_posterior", "zi_prob", "is_zi", "mean_expression", "reliable"]


def _tiny(seed: int = 5) -> ad.AnnData:
    a = mini_scvi.data.simulate_counts(
        n_cells=120, n_genes=20, n_cell_types=2, n_batches=2, zi_fraction=0.5, mean_log_expr=1.0, seed=seed
    )
    assert (a.X.sum(1) > 0).all()
    return a


def _tiny_model(setup: dict | None = None, epochs: int = 0, lr: float = 1e-3, **model_kwargs):
    a = _tiny()
    AUTOZI.setup_anndata(a, **({"batch_key": "batch", "labels_key": "cell_type"} if setup is None else setup))
    m = AUTOZI(a, n_hidden=16, n_latent=3, **model_kwargs)
    if epochs:
        m.train(max_epochs=epochs, plan_kwargs={"lr": lr}, **FAST)
    return a, m


def _first_batch(model, n: int = 40) -> dict:
    return next(model._data().batches(np.arange(n), n))


def _kl_beta_quad(a: float, b: float, a0: float, b0: float) -> float:
    """KL(Beta(a, b) || Beta(a0, b0)) = int q log(q / p), by adaptive quadrature on the pdfs."""
    def f(x):
        lq = stats.beta.logpdf(x, a, b)
        return np.exp(lq) * (lq - stats.beta.logpdf(x, a0, b0))

    with warnings.catch_warnings():  # integrable end-point singularities when a, b < 1
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return integrate.quad(f, 0, 0.5, limit=200)[0] + integrate.quad(f, 0.5, 1, limit=200)[0]


def _kl_beta_closed(a, b, a0, b0):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dsum = special.digamma(a + b)
    return (special.betaln(a0, b0) - special.betaln(a, b) + (a - a0) * (special.digamma(a) - dsum)
            + (b - b0) * (special.digamma(b) - dsum))


# ----------------------------------------------------------------------------- priors and the Beta KL


def test_non_symmetric_fixed_prior_is_honoured():
    a, m = _tiny_model(alpha_prior=0.3, beta_prior=0.7)
    ab = m.get_alphas_betas()
    assert set(ab) == {"alpha_posterior", "beta_posterior", "alpha_prior", "beta_prior"}
    assert float(np.squeeze(ab["alpha_prior"])) == pytest.approx(0.3, abs=1e-6)
    assert float(np.squeeze(ab["beta_prior"])) == pytest.approx(0.7, abs=1e-6)  # not alpha twice
    # a fixed prior is not trained
    assert not any(p.data_ptr() == m.module.alpha_prior_logit.data_ptr() for p in m.module.parameters())
    m.train(max_epochs=1, plan_kwargs={"lr": 1e-2}, **FAST)
    ab = m.get_alphas_betas()
    assert float(np.squeeze(ab["alpha_prior"])) == pytest.approx(0.3, abs=1e-6)
    assert float(np.squeeze(ab["beta_prior"])) == pytest.approx(0.7, abs=1e-6)


def test_kl_global_matches_numerical_integration():
    a, m = _tiny_model(alpha_prior=0.3, beta_prior=0.7, epochs=1, lr=1e-2)
    ab = m.get_alphas_betas()
    alpha, beta = ab["alpha_posterior"].astype(np.float64), ab["beta_posterior"].astype(np.float64)
    assert alpha.shape == beta.shape == (a.n_vars,)
    closed = _kl_beta_closed(alpha, beta, 0.3, 0.7)
    for g in range(4):  # a few genes by quadrature
        assert closed[g] == pytest.approx(_kl_beta_quad(alpha[g], beta[g], 0.3, 0.7), rel=1e-6, abs=1e-8)
    # the package's per-gene KL and the module's sum over genes
    per_gene = kl_beta(torch.tensor(alpha), torch.tensor(beta), 0.3, 0.7).numpy()
    np.testing.assert_allclose(per_gene, closed, rtol=1e-8)
    assert m.module.kl_global().item() == pytest.approx(closed.sum(), rel=1e-5)
    # asymmetric prior: swapping alpha and beta of the prior changes the KL
    assert not np.isclose(closed.sum(), _kl_beta_closed(alpha, beta, 0.7, 0.3).sum())


# ----------------------------------------------------------------------------- the likelihood and the loss


def _scipy_mixture_log_lik(x, gen) -> np.ndarray:
    x = x.numpy().astype(np.float64)
    mu = gen["px_rate"].numpy().astype(np.float64)
    theta = np.broadcast_to(gen["px_r"].numpy().astype(np.float64), x.shape)
    pi = special.expit(gen["px_dropout"].numpy().astype(np.float64))
    delta = gen["delta"].numpy().astype(np.float64)
    log_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    log_zinb = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(log_nb)), np.log1p(-pi) + log_nb)
    return np.logaddexp(np.log(delta) + log_nb, np.log1p(-delta) + log_zinb).sum(1)


@pytest.mark.parametrize("mode", list(MODES))
def test_mixture_likelihood_matches_scipy(mode):
    a, m = _tiny_model(zero_inflation=mode, epochs=1, lr=1e-2)
    tensors = _first_batch(m)
    m.module.eval()
    with torch.no_grad():
        inf, gen, out = m.module(tensors, n_obs=100)
    # in eval mode delta is the posterior mean alpha / (alpha + beta) of each cell's gene column
    ab = m.get_alphas_betas()
    mean = ab["alpha_posterior"] / (ab["alpha_posterior"] + ab["beta_posterior"])
    codes = {"gene": None, "gene-batch": tensors["batch"].numpy(), "gene-label": tensors["labels"].numpy()}[mode]
    expected_delta = np.broadcast_to(mean, (40, a.n_vars)) if codes is None else mean[:, codes].T
    if codes is not None:
        assert len(np.unique(codes)) == 2
    np.testing.assert_allclose(gen["delta"].numpy(), expected_delta, rtol=1e-6)

    # the ZINB component's dropout probability already includes the floor tau = minimal_dropout
    pi = torch.sigmoid(gen["px_dropout"]).numpy()
    assert pi.min() >= m.module.minimal_dropout * (1 - 1e-5)

    expected = _scipy_mixture_log_lik(tensors["X"], gen)
    np.testing.assert_allclose(m.module.log_likelihood(tensors["X"], gen).numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.reconstruction_loss.numpy(), -expected, rtol=1e-4, atol=1e-3)


def test_minimal_dropout_floor_value():
    a, m = _tiny_model(minimal_dropout=0.2)
    with torch.no_grad():
        m.module.decoder.px_dropout_decoder.weight.zero_()
        m.module.decoder.px_dropout_decoder.bias.fill_(-30.0)  # sigmoid(h) ~ 0: pi is the floor
        m.module.eval()
        gen = m.module(_first_batch(m))[1]
    np.testing.assert_allclose(torch.sigmoid(gen["px_dropout"]).numpy(), 0.2, rtol=1e-5)


def test_saturated_dropout_logits_keep_loss_and_gradients_finite():
    """With a large decoder output h, sigmoid(h) rounds to 1 in float32, so pi_tilde = tau + (1 - tau)
    sigmoid(h) is exactly 1 and log(pi) - log1p(-pi) is +inf; the ZINB branch then back-propagates
    0 * inf = NaN. This is what makes the tutorial's lr=1e-2 diverge after a few epochs."""
    a, m = _tiny_model()
    with torch.no_grad():
        m.module.decoder.px_dropout_decoder.bias.fill_(40.0)
    m.module.train()
    _, gen, out = m.module(_first_batch(m), n_obs=100)
    assert torch.isfinite(gen["px_dropout"]).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in m.module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_loss_is_n_obs_times_local_mean_plus_kl_global():
    a, m = _tiny_model(alpha_prior=0.3, beta_prior=0.7, use_observed_lib_size=False, epochs=1)
    tensors = _first_batch(m)
    m.module.eval()
    with torch.no_grad():
        inf = m.module.inference(**m.module._get_inference_input(tensors))
        gen = m.module.generative(**m.module._get_generative_input(tensors, inf))
        out = m.module.loss(tensors, inf, gen, kl_weight=0.4, n_obs=500)
    qz_m, qz_v = inf["qz_m"].numpy().astype(np.float64), inf["qz_v"].numpy().astype(np.float64)
    kl_z = 0.5 * (-np.log(qz_v) - 1 + qz_v + qz_m**2).sum(1)
    kl_l = m.module.kl_library(inf, tensors["batch"]).numpy()
    assert (kl_l > 0).all()
    rec = out.reconstruction_loss.numpy()
    kl_global = m.module.kl_global().item()
    assert out.kl_global.item() == pytest.approx(kl_global, rel=1e-6)
    np.testing.assert_allclose(out.kl_local.numpy(), kl_z + kl_l, rtol=1e-4, atol=1e-5)
    expected = 500 * np.mean(rec + 0.4 * kl_z + kl_l) + kl_global
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- modes, empirical Bayes


@pytest.mark.parametrize("mode", list(MODES))
def test_empirical_bayes_trains_in_every_mode(mode):
    a = _tiny()
    AUTOZI.setup_anndata(a, **MODES[mode])
    m = AUTOZI(a, n_hidden=16, n_latent=3, zero_inflation=mode, alpha_prior=None, beta_prior=None)
    before = m.get_alphas_betas()
    m.train(max_epochs=2, plan_kwargs={"lr": 1e-2}, **FAST)
    for key, df in m.history.items():
        assert np.isfinite(df.to_numpy()).all(), key
    assert (m.history["kl_global_train"].to_numpy() > 0).all()
    after = m.get_alphas_betas()
    for key in ("alpha_prior", "beta_prior"):
        assert np.size(after[key]) == 1 and 0 < float(np.squeeze(after[key])) < 1
        assert float(np.squeeze(after[key])) != float(np.squeeze(before[key])), f"{key} was not learned"

    G = a.n_vars
    shape = {"gene": (G,), "gene-batch": (G, 2), "gene-label": (G, 2)}[mode]
    for key in ("alpha_posterior", "beta_posterior"):
        assert after[key].shape == shape and ((after[key] > 0) & (after[key] < 1)).all()

    zi = m.get_zero_inflation()
    n_cols = 1 if mode == "gene" else 2
    assert len(zi) == G * n_cols
    assert set(TABLE_COLUMNS) <= set(zi.columns)
    if mode != "gene":
        column, obs_key = {"gene-batch": ("batch", "batch"), "gene-label": ("label", "cell_type")}[mode]
        cats = list(m.registry["batch_categories" if mode == "gene-batch" else "labels_categories"])
        assert list(zi[column].unique()) == cats
        for j, c in enumerate(cats):
            rows = zi[zi[column] == c]
            in_c = (a.obs[obs_key].astype(str) == c).to_numpy()
            np.testing.assert_allclose(rows["mean_expression"], a.X[in_c].mean(0), rtol=1e-5)
            np.testing.assert_array_equal(rows["alpha_posterior"], after["alpha_posterior"][:, j])


def test_zero_inflation_table_is_consistent():
    a, m = _tiny_model(setup={}, epochs=2, lr=1e-2)
    zi = m.get_zero_inflation()
    ab = m.get_alphas_betas()
    assert list(zi.columns) == TABLE_COLUMNS and list(zi.index) == list(a.var_names)
    np.testing.assert_array_equal(zi["alpha_posterior"], ab["alpha_posterior"])
    np.testing.assert_allclose(zi["zi_prob"], stats.beta.cdf(0.5, ab["alpha_posterior"], ab["beta_posterior"]), rtol=1e-6)
    np.testing.assert_array_equal(zi["is_zi"], zi["alpha_posterior"] < zi["beta_posterior"])
    np.testing.assert_array_equal(zi["is_zi"], zi["zi_prob"] > 0.5)
    assert 0 < zi["is_zi"].sum() < len(zi)  # both calls occur, so the checks above are not vacuous
    np.testing.assert_allclose(zi["mean_expression"], a.X.mean(0), rtol=1e-5)
    np.testing.assert_array_equal(zi["reliable"], zi["mean_expression"] > 1)


def test_label_columns_follow_the_categorical_order():
    """scvi-tools registers a categorical obs column in its own category order, so the tutorial's
    ``is_zi[:, ct.cat.codes]`` lines up with the labels. A model must not silently re-sort them."""
    a = _tiny()
    order = ["type1", "type0"]  # not alphabetical
    a.obs["cell_type"] = a.obs["cell_type"].cat.reorder_categories(order)
    AUTOZI.setup_anndata(a, labels_key="cell_type")
    m = AUTOZI(a, n_hidden=16, n_latent=3, zero_inflation="gene-label")
    zi = m.get_zero_inflation()
    assert list(zi["label"].unique()) == order
    # column j of the posterior is the label with code j
    np.testing.assert_array_equal(zi[zi["label"] == "type1"]["alpha_posterior"], m.get_alphas_betas()["alpha_posterior"][:, 0])


# ----------------------------------------------------------------------------- recovery of simulated ZI genes


@pytest.fixture(scope="module")
def zi_recovery():
    """Half of 100 genes zero-inflated at rates 0.4-0.8, gene means mostly 2-10 (AutoZI's reliable range)."""
    mini_scvi.settings.seed = 0
    a = mini_scvi.data.simulate_counts(
        n_cells=2000, n_genes=100, n_cell_types=2, zi_fraction=0.5, zi_rate=(0.4, 0.8), mean_log_expr=1.5,
        sd_log_expr=0.5, seed=0,
    )
    AUTOZI.setup_anndata(a)
    m = AUTOZI(a)
    m.train(max_epochs=60, plan_kwargs={"lr": 1e-2}, progress_bar=False)
    return a, m


def test_autozi_recovers_zero_inflated_genes(zi_recovery):
    a, m = zi_recovery
    for key, df in m.history.items():
        assert np.isfinite(df.to_numpy()).all(), key
    zi = m.get_zero_inflation()
    truth = a.var["zero_inflated"].to_numpy()
    mask = zi["mean_expression"].to_numpy() > 1
    assert mask.sum() >= 80 and 0.3 < truth[mask].mean() < 0.7
    pred = zi["is_zi"].to_numpy()
    tpr = pred[mask & truth].mean()
    fpr = pred[mask & ~truth].mean()
    auc = roc_auc_score(truth[mask], zi["zi_prob"].to_numpy()[mask])
    print(f"\n[autozi] genes with mean > 1: {mask.sum()}; TPR {tpr:.3f}, FPR {fpr:.3f}, ROC AUC {auc:.3f}")
    assert tpr >= 0.8
    assert fpr <= 0.2
    assert auc >= 0.9


# ----------------------------------------------------------------------------- persistence, errors


@pytest.mark.parametrize(
    "kwargs,setup",
    [({"alpha_prior": 0.3, "beta_prior": 0.7}, {}),
     ({"alpha_prior": None, "beta_prior": None, "zero_inflation": "gene-batch"}, {"batch_key": "batch"})],
)
def test_save_load_reproduces_alphas_betas(tmp_path, kwargs, setup):
    a, m = _tiny_model(setup=setup, epochs=1, lr=1e-2, **kwargs)
    m.save(tmp_path / "autozi")
    b = a.copy()
    m2 = AUTOZI.load(tmp_path / "autozi", b)
    ab1, ab2 = m.get_alphas_betas(), m2.get_alphas_betas()
    assert set(ab1) == set(ab2)
    for key in ab1:
        np.testing.assert_array_equal(ab1[key], ab2[key])
    assert m2.module.zero_inflation == m.module.zero_inflation
    pd.testing.assert_frame_equal(m.get_zero_inflation(), m2.get_zero_inflation(adata=b))
    np.testing.assert_array_equal(m.get_latent_representation(), m2.get_latent_representation(b))
    with pytest.raises(TypeError, match="AUTOZI"):
        mini_scvi.model.SCVI.load(tmp_path / "autozi", a.copy())


def test_bad_arguments_give_clear_errors():
    a = _tiny()
    AUTOZI.setup_anndata(a)
    for value in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="alpha_prior"):
            AUTOZI(a, alpha_prior=value)
        with pytest.raises(ValueError, match="beta_prior"):
            AUTOZI(a, beta_prior=value)
    with pytest.raises(ValueError, match="both"):
        AUTOZI(a, alpha_prior=None, beta_prior=0.5)
    with pytest.raises(ValueError, match="both"):
        AUTOZI(a, alpha_prior=0.5, beta_prior=None)
    with pytest.raises(ValueError, match="labels"):
        AUTOZI(a, zero_inflation="gene-label")
    with pytest.raises(ValueError, match="batch"):
        AUTOZI(a, zero_inflation="gene-batch")
    with pytest.raises(ValueError, match="zero_inflation"):
        AUTOZI(a, zero_inflation="gene-cell")
    b = _tiny()
    with pytest.raises(ValueError, match="setup_anndata"):
        AUTOZI(b)


# ----------------------------------------------------------------------------- the scvi-tools tutorial


def test_scvi_tools_autozi_tutorial_runs(pbmc_readonly):
    """The AutoZI tutorial of scvi-tools, with ``import scvi`` -> ``mini_scvi`` and a 200-gene subset."""
    import scanpy as sc
    from scipy.stats import beta

    import mini_scvi as scvi

    pbmc = pbmc_readonly.copy()
    top = np.sort(np.argsort(-np.asarray(pbmc.X.sum(axis=0)).ravel())[:200])  # for speed
    pbmc = pbmc[:, top].copy()
    # the tutorial's dataset has string labels for every cell; pbmc3k has 62 unlabelled cells
    pbmc.obs["str_labels"] = pbmc.obs["cell_type"].astype(str).where(pbmc.obs["cell_type"].notna(), "unlabelled")

    pbmc.layers["counts"] = pbmc.X.copy()
    sc.pp.normalize_total(pbmc, target_sum=10e4)
    pbmc.raw = pbmc
    scvi.model.AUTOZI.setup_anndata(pbmc, labels_key="str_labels", layer="counts")

    vae = scvi.model.AUTOZI(pbmc)
    vae.train(max_epochs=2, plan_kwargs={"lr": 1e-2})
    outputs = vae.get_alphas_betas()
    alpha_posterior = outputs["alpha_posterior"]
    beta_posterior = outputs["beta_posterior"]

    threshold = 0.5
    zi_probs = beta.cdf(0.5, alpha_posterior, beta_posterior)
    is_zi_pred = zi_probs > threshold
    print("Fraction of predicted ZI genes :", is_zi_pred.mean())
    mask_sufficient_expression = (np.array(pbmc.X.mean(axis=0)) > 1.0).reshape(-1)
    print("Fraction of genes with avg expression > 1 :", mask_sufficient_expression.mean())
    print("Fraction of predicted ZI genes with avg expression > 1 :", is_zi_pred[mask_sufficient_expression].mean())
    assert alpha_posterior.shape == beta_posterior.shape == zi_probs.shape == (200,)
    assert mask_sufficient_expression.shape == (200,) and 0 < mask_sufficient_expression.sum()
    assert 0 <= is_zi_pred.mean() <= 1 and 0 <= is_zi_pred[mask_sufficient_expression].mean() <= 1

    vae_genelabel = scvi.model.AUTOZI(pbmc, dispersion="gene-label", zero_inflation="gene-label")
    vae_genelabel.train(max_epochs=2, plan_kwargs={"lr": 1e-2})
    outputs_genelabel = vae_genelabel.get_alphas_betas()
    alpha_posterior_genelabel = outputs_genelabel["alpha_posterior"]
    beta_posterior_genelabel = outputs_genelabel["beta_posterior"]
    zi_probs_genelabel = beta.cdf(0.5, alpha_posterior_genelabel, beta_posterior_genelabel)
    is_zi_pred_genelabel = zi_probs_genelabel > threshold

    ct = pbmc.obs.str_labels.astype("category")
    codes = np.unique(ct.cat.codes)
    cats = ct.cat.categories
    assert is_zi_pred_genelabel.shape == (200, len(cats)) == (200, 10)
    fractions = []
    for ind_cell_type, cell_type in zip(codes, cats):
        is_zi_pred_genelabel_here = is_zi_pred_genelabel[:, ind_cell_type]
        print("Fraction of predicted ZI genes for cell type {} :".format(cell_type), is_zi_pred_genelabel_here.mean(), "\n")
        fractions.append(is_zi_pred_genelabel_here.mean())
    for ind_cell_type, cell_type in zip(codes, cats):
        mask_sufficient_expression = (
            np.array(pbmc.X[pbmc.obs.str_labels.values.reshape(-1) == cell_type, :].mean(axis=0)) > 1.0
        ).reshape(-1)
        print("Fraction of genes with avg expression > 1 for cell type {} :".format(cell_type), mask_sufficient_expression.mean())
        is_zi_pred_genelabel_here = is_zi_pred_genelabel[mask_sufficient_expression, ind_cell_type]
        print("Fraction of predicted ZI genes with avg expression > 1 for cell type {} :".format(cell_type),
              is_zi_pred_genelabel_here.mean(), "\n")
        fractions += [mask_sufficient_expression.mean(), is_zi_pred_genelabel_here.mean()]
    assert len(fractions) == 3 * len(cats)
    assert all(0 <= f <= 1 for f in fractions)
    # the columns are the labels in the order the tutorial indexes them
    table = vae_genelabel.get_zero_inflation()
    assert list(table["label"].unique()) == list(cats)
