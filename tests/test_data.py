"""mini_scvi.data: the bundled pbmc3k loader and the two seeded simulators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import mini_scvi
from mini_scvi.data import pbmc3k, simulate_counts, three_profiles

# ----------------------------------------------------------------------------- pbmc3k

PBMC_TYPE_COUNTS = {
    "Naive CD4 T": 697,
    "Memory CD4 T": 483,
    "CD14+ Mono": 480,
    "B": 344,
    "CD8 T": 271,
    "FCGR3A+ Mono": 162,
    "NK": 155,
    "DC": 32,
    "Platelet": 14,
}


def test_pbmc3k_shape_and_sparse_integer_counts(pbmc_readonly):
    a = pbmc_readonly
    assert a.shape == (2700, 32738)
    assert sp.issparse(a.X) and a.X.format == "csr"
    assert a.X.nnz == 2_286_884
    data = a.X.data
    assert np.issubdtype(data.dtype, np.integer) or np.all(np.mod(data, 1) == 0)
    assert np.all(np.mod(data, 1) == 0)
    assert data.min() > 0  # stored non-zeros are positive counts
    # every cell has counts (the filtered 10x matrix); median total is about 2,200
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert totals.min() > 0
    assert 2000 < np.median(totals) < 2400
    assert a.obs_names.is_unique and a.var_names.is_unique


def test_pbmc3k_cell_types(pbmc_readonly):
    ct = pbmc_readonly.obs["cell_type"]
    assert ct.dtype.name == "category"
    assert len(ct.cat.categories) == 9
    assert int(ct.isna().sum()) == 62
    counts = ct.value_counts().to_dict()
    assert counts == PBMC_TYPE_COUNTS
    assert sum(PBMC_TYPE_COUNTS.values()) + 62 == 2700


def test_pbmc3k_passes_setup_anndata(pbmc_readonly):
    a = pbmc_readonly.copy()
    mini_scvi.model.VAE.setup_anndata(a)
    reg = a.uns["_mini_scvi"]
    assert reg["layer"] == "" and list(reg["batch_categories"]) == ["0"]


def test_pbmc3k_missing_path_names_the_fix(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("MINI_SCVI_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="MINI_SCVI_DATA") as info:
        pbmc3k()
    assert "nowhere" in str(info.value)  # says where it looked


def test_pbmc3k_env_var_pointing_to_folder(monkeypatch, tmp_path, pbmc_readonly):
    # MINI_SCVI_DATA may name the folder that holds pbmc3k.h5ad
    small = pbmc_readonly[:5, :7].copy()
    small.write_h5ad(tmp_path / "pbmc3k.h5ad")
    monkeypatch.setenv("MINI_SCVI_DATA", str(tmp_path))
    a = pbmc3k()
    assert a.shape == (5, 7)
    assert sp.issparse(a.X)


# ----------------------------------------------------------------------------- three_profiles


# ----------------------------------------------------------------------------- the course's genes


def test_pbmc3k_qc_keeps_the_labelled_cells_and_detected_genes():
    qc = mini_scvi.data.pbmc3k_qc()
    assert qc.shape == (2638, 13656)
    assert int(qc.obs["cell_type"].isna().sum()) == 0
    assert qc.obs["cell_type"].value_counts().to_dict() == PBMC_TYPE_COUNTS
    assert (np.diff(qc.X.tocsc().indptr) >= 3).all()  # every gene detected in at least 3 cells


def test_stored_hvg_list_is_the_seurat_v3_selection_on_counts():
    stored = mini_scvi.data.stored_hvg_genes()
    assert len(stored) == len(set(stored)) == 1200
    fresh = mini_scvi.data.select_hvg(mini_scvi.data.pbmc3k_qc(), 1200)
    # the same genes up to a swap or two at the ranking's boundary (float differences between CPUs)
    assert len(fresh.intersection(stored)) >= 1190
    assert {"MS4A1", "FCGR3A", "MS4A7", "CD79A", "LYZ", "NKG7", "GNLY", "PPBP"} <= set(stored)


def test_pbmc3k_hvg_uses_the_stored_genes_and_a_fixed_split():
    a = mini_scvi.data.pbmc3k_hvg()
    assert a.shape == (2638, 1200)
    assert set(a.var_names) == set(mini_scvi.data.stored_hvg_genes())
    assert (a.layers["counts"] != a.X).nnz == 0
    split = a.obs["split"].value_counts().to_dict()
    assert split == {"train": 2375, "held out": 263}
    # the split is drawn from its seed alone: the same cells every time, on every machine
    again = mini_scvi.data.pbmc3k_hvg()
    assert (again.obs["split"] == a.obs["split"]).all()
    assert (mini_scvi.data.held_out(a.n_obs) == (a.obs["split"] == "held out").to_numpy()).all()


def test_pbmc3k_hvg_recompute_and_other_sizes_select_afresh():
    a = mini_scvi.data.pbmc3k_hvg(n_top_genes=300)
    assert a.n_vars == 300 and a.n_obs == 2638
    with pytest.raises(ValueError, match="n_top_genes"):
        mini_scvi.data.pbmc3k_hvg(n_top_genes=0)


def test_held_out_is_seeded_and_sized():
    m = mini_scvi.data.held_out(1000, fraction=0.2, seed=3)
    assert m.sum() == 200 and (m == mini_scvi.data.held_out(1000, fraction=0.2, seed=3)).all()
    assert not (m == mini_scvi.data.held_out(1000, fraction=0.2, seed=4)).all()


def test_three_profiles_block_means():
    a = three_profiles()
    assert a.shape == (6000, 1000)
    X = np.asarray(a.X)
    assert np.all(np.mod(X, 1) == 0) and X.min() >= 0
    profile = a.obs["profile"].cat.codes.to_numpy()
    block = a.var["up_in_profile"].to_numpy()
    assert np.bincount(profile).tolist() == [2000, 2000, 2000]
    assert np.bincount(block).tolist() == [334, 333, 333]
    # cells 0-1999 are profile 0, 2000-3999 profile 1, ...: contiguous thirds
    assert profile[0] == 0 and profile[1999] == 0 and profile[2000] == 1 and profile[-1] == 2
    means = np.array([[X[profile == p][:, block == g].mean() for g in range(3)] for p in range(3)])
    # Poisson(8) on the diagonal blocks, Poisson(1) elsewhere; ~666k entries per block, sd of mean < 0.01
    np.testing.assert_allclose(np.diag(means), 8.0, atol=0.05)
    off = means[~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(off, 1.0, atol=0.02)


def test_three_profiles_seeded():
    a, b, c = three_profiles(300, 30, seed=1), three_profiles(300, 30, seed=1), three_profiles(300, 30, seed=2)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)


# ----------------------------------------------------------------------------- simulate_counts


def test_simulate_counts_seeded_reproducible():
    kw = dict(n_cells=300, n_genes=40, n_batches=2, zi_fraction=0.2)
    a, b = simulate_counts(seed=5, **kw), simulate_counts(seed=5, **kw)
    c = simulate_counts(seed=6, **kw)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert not np.array_equal(a.X, c.X)


def test_simulate_counts_ground_truth_columns():
    a = simulate_counts(n_cells=400, n_genes=100, n_cell_types=4, n_batches=3, de_fraction=0.2, de_lfc=1.5,
                        zi_fraction=0.3, zi_rate=(0.3, 0.7), seed=0)
    assert a.shape == (400, 100)
    for col in ("cell_type", "batch", "size_factor"):
        assert col in a.obs
    for col in ("de", "zero_inflated", "zi_rate", "theta", "nb_mean"):
        assert col in a.var
    assert set(a.obs["cell_type"].cat.categories) == {f"type{t}" for t in range(4)}
    assert set(a.obs["batch"].cat.categories) == {f"batch{b}" for b in range(3)}
    X = np.asarray(a.X)
    assert np.all(np.mod(X, 1) == 0) and X.min() >= 0
    # DE: 0.2 * 100 / 4 = 5 genes per type, disjoint, each with |lfc| = 1.5
    lfc = a.varm["lfc"]
    lfc = lfc.to_numpy() if hasattr(lfc, "to_numpy") else np.asarray(lfc)
    assert lfc.shape == (100, 4)
    assert ((lfc != 0).sum(axis=0) == 5).all()
    assert ((lfc != 0).sum(axis=1) <= 1).all()
    np.testing.assert_allclose(np.abs(lfc[lfc != 0]), 1.5)
    assert a.var["de"].sum() == 20
    np.testing.assert_array_equal(a.var["de"].to_numpy(), (lfc != 0).any(axis=1))
    # zero inflation: 30 genes with rates in the requested range, the rest 0
    zi = a.var["zero_inflated"].to_numpy()
    assert zi.sum() == 30
    assert np.all((a.var["zi_rate"][zi] >= 0.3) & (a.var["zi_rate"][zi] <= 0.7))
    assert np.all(a.var["zi_rate"][~zi] == 0)
    assert np.all((a.var["theta"] >= 2.0) & (a.var["theta"] <= 20.0))
    assert np.all(a.obs["size_factor"] > 0)


def test_simulate_counts_nb_mean_matches_data():
    # without zero inflation the column mean estimates nb_mean (20k cells: relative error a few %)
    a = simulate_counts(n_cells=20000, n_genes=30, n_cell_types=1, mean_log_expr=1.0, sd_log_expr=0.5,
                        library_log_sd=0.0, seed=2)
    np.testing.assert_allclose(np.asarray(a.X).mean(0), a.var["nb_mean"], rtol=0.05)


def test_simulate_counts_zero_inflation_matches_nb_zero_probability():
    # one type, one batch, no library-size spread: every cell of a gene has the same NB(mu, theta),
    # so P(x = 0) = pi + (1 - pi) * (theta / (theta + mu)) ** theta exactly
    n_cells = 20000
    a = simulate_counts(n_cells=n_cells, n_genes=40, n_cell_types=1, n_batches=1, library_log_sd=0.0,
                        mean_log_expr=1.0, sd_log_expr=0.5, zi_fraction=0.5, zi_rate=(0.3, 0.7), seed=3)
    np.testing.assert_allclose(a.obs["size_factor"], 1.0)
    X = np.asarray(a.X)
    mu, theta, pi = (a.var[c].to_numpy() for c in ("nb_mean", "theta", "zi_rate"))
    nb_zero = (theta / (theta + mu)) ** theta
    expected = pi + (1 - pi) * nb_zero
    observed = (X == 0).mean(0)
    # binomial sd <= sqrt(0.25 / 20000) = 0.0035; allow ~5 sd
    np.testing.assert_allclose(observed, expected, atol=0.018)
    zi = a.var["zero_inflated"].to_numpy()
    assert zi.sum() == 20
    # the zero-inflated genes carry a clear excess of zeros over the NB alone
    assert np.all(observed[zi] - nb_zero[zi] > 0.15)
    np.testing.assert_allclose(observed[~zi], nb_zero[~zi], atol=0.018)


def test_simulate_counts_lognormal_has_the_nb_mean_and_variance():
    # Poisson log-normal counts with the NB's first two moments: mean mu, variance mu + mu^2 / theta
    # (one type, no library spread: all cells of a gene share mu); the shape differs: fewer zeros
    n_cells = 40000
    kw = dict(n_cells=n_cells, n_genes=20, n_cell_types=1, library_log_sd=0.0, mean_log_expr=1.0,
              sd_log_expr=0.5, theta=(1.0, 10.0), seed=4)
    a = simulate_counts(overdispersion="lognormal", **kw)
    X = np.asarray(a.X)
    mu, theta = a.var["nb_mean"].to_numpy(), a.var["theta"].to_numpy()
    np.testing.assert_allclose(X.mean(0), mu, rtol=0.03)
    np.testing.assert_allclose(X.var(0), mu + mu**2 / theta, rtol=0.15)
    nb_zero = (theta / (theta + mu)) ** theta
    assert np.all((X == 0).mean(0) < nb_zero)
    # the default is the NB, drawn exactly as before the option existed
    np.testing.assert_array_equal(simulate_counts(**kw).X, simulate_counts(overdispersion="gamma", **kw).X)
    with pytest.raises(ValueError, match="overdispersion"):
        simulate_counts(n_cells=10, n_genes=5, overdispersion="poisson")


def test_simulate_counts_sparse_equals_dense():
    kw = dict(n_cells=500, n_genes=50, n_batches=2, zi_fraction=0.2, seed=11, chunk_size=128)
    dense = simulate_counts(sparse=False, **kw)
    sparse = simulate_counts(sparse=True, **kw)
    assert sp.issparse(sparse.X) and sparse.X.format == "csr"
    assert not sp.issparse(dense.X)
    np.testing.assert_array_equal(sparse.X.toarray(), dense.X)
    assert sparse.obs.equals(dense.obs) and sparse.var.equals(dense.var)


def test_simulate_counts_rejects_zero_types():
    with pytest.raises(ValueError, match="at least 1"):
        simulate_counts(n_cells=10, n_genes=5, n_cell_types=0)
