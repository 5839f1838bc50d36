"""Input validation: every mistake a student is likely to make gets an error that says what to do."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import mini_scvi
from mini_scvi._adata import check_counts, get_registry, setup_anndata
from mini_scvi.model import AE, VAE


def _as(kind, X):
    return sp.csr_matrix(X) if kind == "sparse" else X


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_normalized_values_rejected_with_fix(counts_small, kind):
    a = counts_small
    X = np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4)
    a.X = _as(kind, X.astype(np.float32))
    with pytest.raises(ValueError, match="raw counts") as info:
        VAE.setup_anndata(a)
    assert "layer='counts'" in str(info.value)
    assert "non-integer" in str(info.value)


def test_normalized_x_with_counts_layer_is_fine(counts_small):
    # the fix the message suggests must actually work
    a = counts_small
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X)
    VAE.setup_anndata(a, layer="counts")
    m = VAE(a, n_latent=2, hidden_sizes=(8,))
    assert get_registry(a)["layer"] == "counts"
    z = m.get_latent_representation()
    assert z.shape == (a.n_obs, 2) and np.isfinite(z).all()


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_negative_values_rejected(counts_small, kind):
    X = counts_small.X.copy()
    X[3, 2] = -1.0
    counts_small.X = _as(kind, X)
    with pytest.raises(ValueError, match="negative"):
        AE.setup_anndata(counts_small)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_rejected(counts_small, kind, bad):
    X = counts_small.X.copy()
    X[4, 1] = bad
    counts_small.X = _as(kind, X)
    with pytest.raises(ValueError, match="NaN"):
        AE.setup_anndata(counts_small)


def test_integer_dtype_counts_accepted(counts_small):
    counts_small.X = sp.csr_matrix(counts_small.X.astype(np.int32))
    AE.setup_anndata(counts_small)
    assert "_mini_scvi" in counts_small.uns


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_anndata_rejected(shape):
    a = ad.AnnData(np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        VAE.setup_anndata(a)


def test_cells_with_zero_total_counts_rejected(counts_small):
    X = counts_small.X.copy()
    X[[7, 9]] = 0
    counts_small.X = X
    with pytest.raises(ValueError, match="zero total counts") as info:
        VAE.setup_anndata(counts_small)
    assert "2 cells" in str(info.value)
    assert "filter_cells" in str(info.value)


def test_check_counts_accepts_raw_counts(counts_small):
    check_counts(counts_small.X)
    check_counts(sp.csr_matrix(counts_small.X))


# ----------------------------------------------------------------------------- keys and layers


def test_missing_layer_names_layer_and_available(counts_small):
    counts_small.layers["raw"] = counts_small.X.copy()
    with pytest.raises(KeyError, match="counts") as info:
        VAE.setup_anndata(counts_small, layer="counts")
    assert "raw" in str(info.value)  # lists what is available


def test_x_none_names_the_fix():
    a = ad.AnnData(obs=pd.DataFrame(index=["c0", "c1"]), var=pd.DataFrame(index=["g0"]))
    with pytest.raises(ValueError, match="layer='counts'"):
        VAE.setup_anndata(a)


def test_missing_batch_key_named(counts_small):
    with pytest.raises(KeyError, match="sample_id"):
        VAE.setup_anndata(counts_small, batch_key="sample_id")


def test_missing_labels_key_named(counts_small):
    with pytest.raises(KeyError, match="celltype"):
        VAE.setup_anndata(counts_small, labels_key="celltype")


def test_labels_with_nan_rejected(pbmc_readonly):
    # pbmc3k has 62 unannotated cells: the realistic case
    a = pbmc_readonly[:, :50].copy()
    a = a[np.asarray(a.X.sum(1)).ravel() > 0].copy()
    n_nan = int(a.obs["cell_type"].isna().sum())
    assert n_nan > 0
    with pytest.raises(ValueError, match=f"{n_nan} missing values"):
        VAE.setup_anndata(a, labels_key="cell_type")


def test_registry_records_keys_and_categories(counts_small):
    setup_anndata(counts_small, batch_key="batch", labels_key="label")
    reg = get_registry(counts_small)
    assert reg["layer"] is None
    assert reg["batch_key"] == "batch" and reg["batch_categories"] == ["b0", "b1"]
    assert reg["labels_key"] == "label" and reg["labels_categories"] == ["A", "B"]


def test_setup_anndata_rejects_non_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        setup_anndata(np.ones((3, 3)))


# ----------------------------------------------------------------------------- models and new data


def test_model_before_setup_anndata(counts_small):
    with pytest.raises(ValueError, match="setup_anndata"):
        VAE(counts_small)


@pytest.fixture
def trained_vae(counts_small):
    VAE.setup_anndata(counts_small, batch_key="batch")
    m = VAE(counts_small, n_latent=2, hidden_sizes=(8,))
    m.train(max_epochs=1, batch_size=16, progress_bar=False)
    return m


def test_latent_on_new_data_with_different_genes(trained_vae, counts_small):
    other = counts_small[:, :6].copy()
    with pytest.raises(ValueError, match="genes") as info:
        trained_vae.get_latent_representation(other)
    assert "model.var_names" in str(info.value)  # names the fix


def test_latent_on_reordered_genes_rejected(trained_vae, counts_small):
    other = counts_small[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes"):
        trained_vae.get_latent_representation(other)


def test_latent_on_new_data_following_the_fix(trained_vae, counts_small):
    other = counts_small[:, ::-1].copy()
    z_fixed = trained_vae.get_latent_representation(other[:, trained_vae.var_names].copy())
    np.testing.assert_allclose(z_fixed, trained_vae.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_latent_on_new_data_checks_counts(trained_vae, counts_small):
    other = counts_small.copy()
    other.X = other.X * 0.5
    with pytest.raises(ValueError, match="raw counts"):
        trained_vae.get_latent_representation(other)


def test_unknown_batch_category_at_inference(trained_vae, counts_small):
    other = counts_small.copy()
    other.obs["batch"] = pd.Categorical(["b0"] * 10 + ["b9"] * (other.n_obs - 10))
    with pytest.raises(ValueError, match="b9"):
        trained_vae.get_latent_representation(other)


def test_missing_batch_column_at_inference(trained_vae, counts_small):
    other = counts_small.copy()
    del other.obs["batch"]
    with pytest.raises(KeyError, match="batch"):
        trained_vae.get_latent_representation(other)


def test_load_onto_mismatching_genes(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    other = counts_small[:, 1:].copy()
    with pytest.raises(ValueError, match="genes"):
        VAE.load(tmp_path / "m", other)


def test_load_with_wrong_class(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    with pytest.raises(TypeError, match="VAE"):
        AE.load(tmp_path / "m", counts_small.copy())


def test_save_refuses_to_overwrite(trained_vae, tmp_path):
    trained_vae.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained_vae.save(tmp_path / "m")
    trained_vae.save(tmp_path / "m", overwrite=True)


def test_load_from_missing_dir(tmp_path, counts_small):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        VAE.load(tmp_path / "nothing", counts_small)


def test_unknown_plan_kwargs(counts_small):
    VAE.setup_anndata(counts_small)
    m = VAE(counts_small, n_latent=2, hidden_sizes=(8,))
    with pytest.raises(TypeError, match="learning_rate"):
        m.train(max_epochs=1, plan_kwargs={"learning_rate": 1e-3}, progress_bar=False)
    assert not m.is_trained


def test_bad_train_size(counts_small):
    VAE.setup_anndata(counts_small)
    m = VAE(counts_small, n_latent=2, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="train_size"):
        m.train(max_epochs=1, train_size=1.5, progress_bar=False)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("bad", [1.5, "0", None, True])
def test_seed_rejects_non_int(bad):
    with pytest.raises(TypeError, match="int"):
        mini_scvi.settings.seed = bad
    assert mini_scvi.settings.seed == 0  # unchanged


def test_seed_accepts_numpy_int_and_seeds_torch():
    import torch

    mini_scvi.settings.seed = np.int64(7)
    assert mini_scvi.settings.seed == 7 and type(mini_scvi.settings.seed) is int
    a, na = torch.rand(3), np.random.rand(3)
    mini_scvi.settings.seed = 7
    assert torch.equal(a, torch.rand(3))
    np.testing.assert_array_equal(na, np.random.rand(3))
