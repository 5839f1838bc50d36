"""scArches query mapping (mini_scvi/model/arches.py): SCVI.load_query_data and prepare_query_anndata.

One simulation with three batches: the reference is trained on batches 0 and 1, the query is
batch 2 under a name of its own. The batch effect is strong enough that the reference, run on the
query before query training, gets the cell types wrong (kNN accuracy ~0.6); after training the new
batch columns it gets them right (~0.98), while every reference number stays bit for bit the same.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.neighbors import KNeighborsClassifier

import mini_scvi
from mini_scvi.model import AUTOZI, SCVI

# every kind of layer that takes the batch: encoders (encode_covariates), library encoder
# (latent library), two decoder layers, and gene-batch dispersion
ARCH = dict(n_hidden=64, n_latent=8, n_layers=2, encode_covariates=True, dispersion="gene-batch",
            use_observed_lib_size=False)
EXPANDED = {
    "z_encoder.hidden.layers.0.0.weight", "z_encoder.hidden.layers.1.0.weight", "l_encoder.hidden.layers.0.0.weight",
    "decoder.px_decoder.layers.0.0.weight", "decoder.px_decoder.layers.1.0.weight", "px_r",
}
QUERY_PLAN = {"lr": 3e-2, "n_epochs_kl_warmup": 5}


def _split(n_cells=1200, n_genes=100, seed=3):
    adata = mini_scvi.data.simulate_counts(
        n_cells=n_cells, n_genes=n_genes, n_batches=3, n_cell_types=4, batch_effect=1.3, de_fraction=0.4, seed=seed
    )
    batch = adata.obs["batch"].astype(str).to_numpy()
    ref, query = adata[batch != "batch2"].copy(), adata[batch == "batch2"].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    query.obs["batch"] = query.obs["batch"].astype(str).replace("batch2", "query").astype("category")
    return ref, query


def _knn_accuracy(reference, ref_adata, latent_query, query_adata) -> float:
    knn = KNeighborsClassifier(n_neighbors=15).fit(reference.get_latent_representation(), ref_adata.obs["cell_type"])
    return float((knn.predict(latent_query) == query_adata.obs["cell_type"].to_numpy()).mean())


@pytest.fixture(scope="module")
def mapped():
    mini_scvi.settings.seed = 0
    ref, query = _split()
    SCVI.setup_anndata(ref, batch_key="batch")
    reference = SCVI(ref, **ARCH)
    reference.train(max_epochs=40, batch_size=128, plan_kwargs={"lr": 1e-2, "n_epochs_kl_warmup": 10},
                    progress_bar=False)
    ref_state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    model = SCVI.load_query_data(query, reference)
    loaded = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not trained": the query columns are still at their initial values
        latent_before = model.get_latent_representation()
    model.train(max_epochs=50, batch_size=128, plan_kwargs=QUERY_PLAN, progress_bar=False)
    return SimpleNamespace(ref=ref, query=query, reference=reference, ref_state=ref_state, model=model,
                           loaded=loaded, latent_before=latent_before)


def test_query_cells_get_their_cell_types_from_the_reference_by_knn(mapped):
    m = mapped
    before = _knn_accuracy(m.reference, m.ref, m.latent_before, m.query)
    after = _knn_accuracy(m.reference, m.ref, m.model.get_latent_representation(), m.query)
    assert before < 0.8, before  # the batch effect matters: untrained new columns map the query badly
    assert after >= 0.9, (before, after)


def test_every_reference_number_is_unchanged_after_query_training(mapped):
    state = mapped.model.module.state_dict()
    grown = set()
    for key, r in mapped.ref_state.items():  # weights, biases, BatchNorm statistics and counters, buffers
        t = state[key]
        if t.shape != r.shape:
            grown.add(key)
            t = t[..., : r.shape[-1]]  # the reference's columns; the new batch's come after
        assert torch.equal(t, r), key
    assert grown == EXPANDED | {"library_log_means", "library_log_vars"}
    # and the reference model itself was not touched
    for key, v in mapped.reference.module.state_dict().items():
        assert torch.equal(v, mapped.ref_state[key]), key


def test_new_batch_columns_learn_and_the_library_prior_comes_from_the_query(mapped):
    state = mapped.model.module.state_dict()
    for key in EXPANDED:
        n_ref = mapped.ref_state[key].shape[-1]
        assert state[key].shape[-1] == n_ref + 1
        assert not torch.equal(state[key][..., n_ref:], mapped.loaded[key][..., n_ref:]), key
    X = mapped.query.X
    log_lib = np.log(np.asarray(X.sum(1)).ravel())
    np.testing.assert_allclose(state["library_log_means"][2].item(), log_lib.mean(), rtol=1e-5)
    np.testing.assert_allclose(state["library_log_vars"][2].item(), log_lib.var(), rtol=1e-4)


def test_query_categories_come_after_the_reference_ones(mapped):
    model = mapped.model
    assert mapped.reference.registry["batch_categories"] == ["batch0", "batch1"]
    assert model.registry["batch_categories"] == ["batch0", "batch1", "query"]
    assert model.summary_stats["n_batch"] == 3 and model.module.n_batch == 3
    codes = model._data().batch.cpu().numpy()
    assert (codes == 2).all()
    assert model.is_trained


def test_query_training_refuses_weight_decay_unless_unfrozen(mapped):
    model = SCVI.load_query_data(mapped.query.copy(), mapped.reference)
    with pytest.raises(ValueError, match="weight_decay"):
        model.train(max_epochs=1, plan_kwargs={"weight_decay": 1e-6}, progress_bar=False)
    # unfrozen: everything learns, weight decay included
    model = SCVI.load_query_data(mapped.query.copy(), mapped.reference, unfrozen=True)
    model.train(max_epochs=2, batch_size=128, plan_kwargs={"weight_decay": 1e-6}, progress_bar=False)
    state = model.module.state_dict()
    key = "decoder.px_decoder.layers.0.0.weight"
    assert not torch.equal(state[key][..., :-1], mapped.ref_state[key])
    assert not torch.equal(state["decoder.px_decoder.layers.0.1.running_mean"],
                           mapped.ref_state["decoder.px_decoder.layers.0.1.running_mean"])


def test_reference_from_a_saved_directory_and_query_model_round_trip(mapped, tmp_path):
    mapped.reference.save(tmp_path / "ref")
    mini_scvi.settings.seed = 1
    from_memory = SCVI.load_query_data(mapped.query.copy(), mapped.reference).module.state_dict()
    mini_scvi.settings.seed = 1
    from_disk = SCVI.load_query_data(mapped.query.copy(), str(tmp_path / "ref")).module.state_dict()
    assert from_memory.keys() == from_disk.keys()
    assert all(torch.equal(from_memory[k], from_disk[k]) for k in from_memory)
    # a trained query model saves and loads as an ordinary 3-batch SCVI
    mapped.model.save(tmp_path / "query")
    again = SCVI.load(tmp_path / "query", mapped.query.copy())
    np.testing.assert_array_equal(again.get_latent_representation(), mapped.model.get_latent_representation())


def test_prepare_query_anndata_reorders_and_zero_fills_genes(mapped):
    reference, query = mapped.reference, mapped.query
    rng = np.random.default_rng(0)
    keep = rng.permutation(query.n_vars)[:-7]  # 7 reference genes missing, the rest shuffled
    raw = query[:, keep].copy()
    raw.X = sp.csr_matrix(raw.X)
    raw.layers["counts"] = raw.X.copy()
    with pytest.warns(UserWarning, match="7 of the reference's 100 genes are not in the query"):
        out = SCVI.prepare_query_anndata(raw, reference, inplace=False)
    assert raw.n_vars == 93  # inplace=False leaves the input alone
    assert list(out.var_names) == list(reference.var_names)
    missing = ~reference.var_names.isin(raw.var_names)
    assert missing.sum() == 7
    for M in (out.X, out.layers["counts"]):
        assert sp.issparse(M) and M[:, np.flatnonzero(missing)].nnz == 0
        np.testing.assert_array_equal(M[:, np.flatnonzero(~missing)].toarray(),
                                      query[:, reference.var_names[~missing]].X)
    np.testing.assert_array_equal(out.obs_names, raw.obs_names)
    # in place, with extra genes the reference does not have: they are dropped, silently
    extra = query.copy()
    extra.var_names = [f"other{i}" if i < 3 else g for i, g in enumerate(extra.var_names)]
    with pytest.warns(UserWarning, match="3 of the reference's 100"):
        same = SCVI.prepare_query_anndata(extra, reference)
    assert same is extra and list(extra.var_names) == list(reference.var_names)
    assert isinstance(extra.X, np.ndarray) and not extra.X[:, :3].any()  # dense zero-filling too
    np.testing.assert_array_equal(extra.X[:, 3:], query.X[:, 3:])
    assert SCVI.prepare_query_anndata(query, reference, return_reference_var_names=True).equals(reference.var_names)
    # a prepared query maps
    model = SCVI.load_query_data(out, reference)
    assert model.registry["batch_categories"][-1] == "query"


def test_unmatched_genes_untrained_references_and_other_misuse_give_clear_errors(mapped, tmp_path):
    reference, query = mapped.reference, mapped.query
    renamed = query.copy()
    renamed.var_names = [f"ENSG{i:05d}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="None of the reference's 100 genes"):
        SCVI.prepare_query_anndata(renamed, reference)
    with pytest.raises(ValueError, match="prepare_query_anndata"):
        SCVI.load_query_data(query[:, ::-1].copy(), reference)
    ref = mapped.ref.copy()
    SCVI.setup_anndata(ref, batch_key="batch")
    with pytest.raises(ValueError, match="not trained"):
        SCVI.load_query_data(query.copy(), SCVI(ref, **ARCH))
    with pytest.raises(ValueError, match="nothing to learn"):
        SCVI.load_query_data(mapped.ref.copy(), reference)
    with pytest.raises(TypeError, match="map a query onto it with SCVI"):
        AUTOZI.load_query_data(query.copy(), reference)
    with pytest.raises(FileNotFoundError, match="no saved reference model"):
        SCVI.load_query_data(query.copy(), tmp_path / "nothing")
    no_batch = query.copy()
    del no_batch.obs["batch"]
    with pytest.raises(KeyError, match="batch_key 'batch'"):
        SCVI.load_query_data(no_batch, reference)


def test_autozi_gene_batch_maps_a_query_too():
    mini_scvi.settings.seed = 0
    ref, query = _split(n_cells=300, n_genes=30)
    AUTOZI.setup_anndata(ref, batch_key="batch")
    reference = AUTOZI(ref, n_hidden=16, n_latent=4, zero_inflation="gene-batch")
    reference.train(max_epochs=3, batch_size=128, progress_bar=False)
    ref_state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    model = AUTOZI.load_query_data(query, reference)
    loaded = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=3, batch_size=128, plan_kwargs=QUERY_PLAN, progress_bar=False)
    state = model.module.state_dict()
    for key, r in ref_state.items():
        t = state[key] if state[key].shape == r.shape else state[key][..., : r.shape[-1]]
        assert torch.equal(t, r), key
    for key in ("alpha_posterior_logit", "beta_posterior_logit", "decoder.px_decoder.layers.0.0.weight"):
        assert state[key].shape[-1] == ref_state[key].shape[-1] + 1
        assert not torch.equal(state[key][..., -1], loaded[key][..., -1]), key
    assert model.get_zero_inflation()["batch"].unique().tolist() == ["batch0", "batch1", "query"]
