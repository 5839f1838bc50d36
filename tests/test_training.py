"""The one training loop (mini_scvi.train) and the minibatch layer (mini_scvi._adata.TensorData)."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import mini_scvi
from mini_scvi._adata import TensorData, get_registry, library_log_stats, setup_anndata
from mini_scvi.model import AE, VAE
from mini_scvi.model.ae import log_normalize
from mini_scvi.model.base import BaseModel
from mini_scvi.module import BaseModule, LossOutput
from mini_scvi.train import kl_weight_at, resolve_device, split_indices, train_module

LOSS_TERMS = ("elbo", "reconstruction_loss", "kl_local", "kl_global")


def _tensor_data(adata, **setup):
    setup_anndata(adata, **setup)
    return TensorData(adata, get_registry(adata))


# ----------------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("n", [129, 257, 1025])
def test_shuffled_batches_never_hold_one_cell(n):
    a = mini_scvi.data.three_profiles(n_cells=n, n_genes=6)
    data = _tensor_data(a)
    idx = np.arange(n)
    assert n % 128 == 1
    for _ in range(3):
        sizes = []
        for b in data.batches(idx, 128, shuffle=True):
            sizes.append(b["X"].shape[0])
        assert min(sizes) > 1
        assert sum(sizes) == n  # the lone cell joined the previous batch, none dropped
        assert sizes[-1] == 129
    # without shuffling (evaluation, BatchNorm in eval mode) batches are plain slices
    sizes = [b["X"].shape[0] for b in data.batches(idx, 128, shuffle=False)]
    assert sizes == [128] * (n // 128) + [1]


def test_shuffled_batches_cover_every_cell_once():
    a = mini_scvi.data.three_profiles(n_cells=257, n_genes=6)
    a.X[:, 0] = np.arange(257) + 1  # a cell id hidden in gene 0
    data = _tensor_data(a)
    ids = torch.cat([b["X"][:, 0] for b in data.batches(np.arange(257), 128, shuffle=True)]).numpy() - 1
    assert sorted(ids.astype(int).tolist()) == list(range(257))
    assert not np.array_equal(ids, np.arange(257))  # actually shuffled


def test_training_with_lone_last_cell_and_batchnorm(capfd):
    # ceil(0.9 * 143) = 129 = 128 + 1 training cells: the last shuffled batch would hold one cell,
    # which BatchNorm cannot normalize in training mode
    n = 143
    assert math.ceil(0.9 * n) % 128 == 1
    a = mini_scvi.data.three_profiles(n_cells=n, n_genes=12)
    VAE.setup_anndata(a)
    m = VAE(a, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=1, batch_size=128, train_size=0.9, progress_bar=False)
    assert len(m.train_indices) == 129 and len(m.validation_indices) == 14
    assert np.isfinite(m.history["elbo_train"].to_numpy()).all()


def test_sparse_tensordata_holds_no_dense_copy():
    a = mini_scvi.data.simulate_counts(n_cells=200, n_genes=30, sparse=True, seed=1)
    data = _tensor_data(a)
    assert data.sparse
    full = a.n_obs * a.n_vars
    for name, value in vars(data).items():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            assert value.ndim < 2 and np.prod(value.shape) < full, f"attribute {name} is a dense copy"
        if sp.issparse(value):
            assert value.shape == a.shape
    assert not hasattr(data, "_dense")


def test_sparse_and_dense_tensordata_yield_identical_batches():
    a = mini_scvi.data.simulate_counts(n_cells=150, n_genes=20, n_batches=3, sparse=True, seed=4)
    d = a.copy()
    d.X = a.X.toarray()
    ds, dd = _tensor_data(a, batch_key="batch"), _tensor_data(d, batch_key="batch")
    idx = np.random.default_rng(0).permutation(150)[:101]
    for shuffle in (False, True):
        torch.manual_seed(3)
        bs = list(ds.batches(idx, 16, shuffle=shuffle))
        torch.manual_seed(3)
        bd = list(dd.batches(idx, 16, shuffle=shuffle))
        assert len(bs) == len(bd) == 7
        for s, t in zip(bs, bd):
            assert s["X"].dtype == t["X"].dtype == torch.float32
            assert torch.equal(s["X"], t["X"])
            assert torch.equal(s["batch"], t["batch"]) and torch.equal(s["labels"], t["labels"])
            # the sparse layer lists the non-zero counts; the dense one leaves that to the likelihood
            assert torch.equal(s["X_nonzero"], torch.nonzero(t["X"].reshape(-1)).squeeze(1))
            assert t["X_nonzero"] is None
    # the unshuffled batches are exactly the requested rows, in order
    first = next(ds.batches(idx, 16))
    np.testing.assert_array_equal(first["X"].numpy(), d.X[idx[:16]])
    codes = d.obs["batch"].cat.codes.to_numpy()
    np.testing.assert_array_equal(first["batch"].numpy(), codes[idx[:16]])


def test_sparse_nonzero_positions_skip_explicit_zeros_and_sum_duplicates():
    # a CSR matrix with a stored 0 and a duplicated entry: neither may be listed as a count
    data, indices, indptr = [2.0, 0.0, 1.0, 1.0, 3.0], [0, 2, 1, 1, 3], [0, 2, 4, 5]
    m = sp.csr_matrix((np.array(data, dtype=np.float32), indices, indptr), shape=(3, 4))
    before = (m.data.copy(), m.indices.copy())
    a = ad.AnnData(m)
    b = next(_tensor_data(a).batches(np.arange(3), 3))
    dense = torch.tensor([[2.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 3]])
    assert torch.equal(b["X"], dense)
    assert torch.equal(b["X_nonzero"], torch.nonzero(dense.reshape(-1)).squeeze(1))
    # the caller's matrix is left as it was
    np.testing.assert_array_equal(a.X.data, before[0])
    np.testing.assert_array_equal(a.X.indices, before[1])


def test_library_log_stats_sparse_dense_and_direct():
    a = mini_scvi.data.simulate_counts(n_cells=300, n_genes=40, n_batches=2, sparse=True, seed=2)
    d = a.copy()
    d.X = a.X.toarray()
    setup_anndata(a, batch_key="batch")
    setup_anndata(d, batch_key="batch")
    ms, vs = library_log_stats(a, get_registry(a))
    md, vd = library_log_stats(d, get_registry(d))
    assert ms.shape == vs.shape == (2,)
    np.testing.assert_allclose(ms, md, rtol=1e-6)
    np.testing.assert_allclose(vs, vd, rtol=1e-5)
    logt = np.log(d.X.sum(1))
    b = d.obs["batch"].cat.codes.to_numpy()
    np.testing.assert_allclose(ms, [logt[b == k].mean() for k in range(2)], rtol=1e-5)
    np.testing.assert_allclose(vs, [logt[b == k].var() for k in range(2)], rtol=1e-4)


@pytest.mark.parametrize("n_cells, expected", [(600, 400), (20000, 400), (40000, 200), (100000, 80)])
def test_default_max_epochs_follows_scvi_tools(make_counts, n_cells, expected):
    # scvi-tools: min(round(20000 / n_cells * 400), 400)
    a = make_counts(n_cells=n_cells, n_genes=2, with_batch=False)
    setup_anndata(a)
    assert _ToyModel(a)._default_max_epochs() == expected


def test_split_indices():
    tr, va = split_indices(1000, 0.9)
    assert len(tr) == 900 and len(va) == 100
    assert len(np.intersect1d(tr, va)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    tr, va = split_indices(10, 1.0)
    assert len(tr) == 10 and len(va) == 0
    with pytest.raises(ValueError):
        split_indices(1, 0.5)


# ----------------------------------------------------------------------------- KL warm-up and history


def test_kl_weight_at():
    assert kl_weight_at(0, 400) == 0.0
    assert kl_weight_at(100, 400) == 0.25
    assert kl_weight_at(400, 400) == 1.0
    assert kl_weight_at(1000, 400) == 1.0
    assert kl_weight_at(0, None) == 1.0
    assert kl_weight_at(0, 0) == 1.0


def test_kl_warmup_in_history_and_loss(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=2, hidden_sizes=(32,))
    m.train(max_epochs=6, batch_size=64, plan_kwargs={"n_epochs_kl_warmup": 4}, progress_bar=False)
    w = m.history["kl_weight"]["kl_weight"].to_numpy()
    np.testing.assert_allclose(w, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    # the optimized loss is reconstruction + weight * KL, cell-averaged over the epoch
    rec = m.history["reconstruction_loss_train"].to_numpy().ravel()
    kl = m.history["kl_local_train"].to_numpy().ravel()
    loss = m.history["train_loss_epoch"].to_numpy().ravel()
    np.testing.assert_allclose(loss, rec + w * kl, rtol=1e-5)
    assert np.all(kl > 0)
    # the reported ELBO is unweighted
    np.testing.assert_allclose(m.history["elbo_train"].to_numpy().ravel(), rec + kl, rtol=1e-6)


def test_vae_default_has_no_warmup_but_loop_default_is_400(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=2, progress_bar=False)
    np.testing.assert_allclose(m.history["kl_weight"].to_numpy().ravel(), [1.0, 1.0])
    data = m._data()
    tr, va = split_indices(data.n_obs)
    hist = train_module(m.module, data, tr, va, max_epochs=2, progress_bar=False)
    np.testing.assert_allclose(hist["kl_weight"], [0.0, 1 / 400])


def test_history_keys_lengths_and_append(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=3, batch_size=100, progress_bar=False)
    expected = {f"{t}_{s}" for t in LOSS_TERMS for s in ("train", "validation")} | {"train_loss_epoch", "kl_weight"}
    assert set(m.history) == expected
    for key, df in m.history.items():
        assert list(df.columns) == [key]
        assert len(df) == 3 and df.index.name == "epoch"
        assert np.isfinite(df[key]).all()
    for s in ("train", "validation"):
        h = {t: m.history[f"{t}_{s}"].to_numpy().ravel() for t in LOSS_TERMS}
        np.testing.assert_allclose(h["elbo"], h["reconstruction_loss"] + h["kl_local"] + h["kl_global"] / 540)
        np.testing.assert_allclose(h["kl_global"], 0.0)
    # a second call continues the curves
    m.train(max_epochs=2, batch_size=100, progress_bar=False)
    for key, df in m.history.items():
        assert len(df) == 5
        assert df.index.tolist() == [0, 1, 2, 3, 4]


def test_validation_history_is_the_per_cell_mean(profiles_small):
    # AE in eval mode is deterministic: recompute the last validation reconstruction loss by hand,
    # with validation batches of unequal size (60 cells = 16 + 16 + 16 + 12)
    AE.setup_anndata(profiles_small)
    m = AE(profiles_small, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=2, batch_size=16, progress_bar=False)
    assert len(m.validation_indices) == 60
    x = torch.as_tensor(np.asarray(profiles_small.X)[m.validation_indices])
    with torch.no_grad():
        x_log = log_normalize(x)
        x_hat = m.module.decoder(m.module.encoder(x_log))
        per_cell = ((x_log - x_hat) ** 2).sum(-1)
    got = m.history["reconstruction_loss_validation"].to_numpy()[-1, 0]
    assert got == pytest.approx(per_cell.mean().item(), rel=1e-5)


def test_train_size_one_has_no_validation_curves(profiles_small):
    AE.setup_anndata(profiles_small)
    m = AE(profiles_small, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=2, train_size=1.0, early_stopping=True, progress_bar=False)
    assert "elbo_train" in m.history and "elbo_validation" not in m.history
    assert len(m.validation_indices) == 0 and len(m.history["elbo_train"]) == 2


# ----------------------------------------------------------------------------- early stopping


class _ToyModule(BaseModule):
    """One parameter w. Training loss (w - 10)^2 per cell; validation loss is either the same
    (keeps improving) or a constant (never improves after the first epoch)."""

    def __init__(self, n_input: int, validation: str = "flat", kl_global: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.validation = validation
        self.kl_global = kl_global

    def _get_inference_input(self, tensors):
        return {"x": tensors["X"]}

    def inference(self, x):
        return {"n": x.shape[0]}

    def _get_generative_input(self, tensors, inference_outputs):
        return {}

    def generative(self):
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs, **kwargs):
        n = inference_outputs["n"]
        rec = ((self.w - 10.0) ** 2).expand(n)
        if not self.training and self.validation == "flat":
            rec = torch.full((n,), 5.0) + 0.0 * self.w
        kl_local = torch.full((n,), 0.5)
        return LossOutput(rec.mean(), rec, kl_local, torch.tensor(self.kl_global))


class _ToyModel(BaseModel):
    _module_cls = _ToyModule


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_early_stopping_stops_when_validation_is_flat(counts_small, patience):
    setup_anndata(counts_small)
    m = _ToyModel(counts_small, validation="flat")
    m.train(max_epochs=50, batch_size=10, early_stopping=True, early_stopping_patience=patience,
            plan_kwargs={"lr": 0.1}, progress_bar=False)
    # epoch 0 sets the best value; then `patience` epochs without improvement
    assert len(m.history["elbo_validation"]) == patience + 1
    # the training loss was still improving: stopping was driven by the validation curve
    tr = m.history["elbo_train"].to_numpy().ravel()
    assert np.all(np.diff(tr) < 0)


def test_early_stopping_keeps_going_while_improving(counts_small):
    setup_anndata(counts_small)
    m = _ToyModel(counts_small, validation="same")
    m.train(max_epochs=12, batch_size=10, early_stopping=True, early_stopping_patience=2,
            plan_kwargs={"lr": 0.1}, progress_bar=False)
    assert len(m.history["elbo_validation"]) == 12
    assert np.all(np.diff(m.history["elbo_validation"].to_numpy().ravel()) < 0)


def test_early_stopping_off_runs_all_epochs(counts_small):
    setup_anndata(counts_small)
    m = _ToyModel(counts_small, validation="flat")
    m.train(max_epochs=7, batch_size=10, early_stopping=False, plan_kwargs={"lr": 0.1}, progress_bar=False)
    assert len(m.history["elbo_validation"]) == 7


def test_elbo_counts_global_kl_once_per_pass_over_training_cells(counts_small):
    # negative ELBO per cell = reconstruction + kl_local + kl_global / n_train (AutoZI's Beta KL)
    setup_anndata(counts_small)
    m = _ToyModel(counts_small, validation="flat", kl_global=9.0)
    m.train(max_epochs=2, batch_size=10, plan_kwargs={"lr": 0.1}, progress_bar=False)
    n_train = len(m.train_indices)
    assert n_train == 45
    for s in ("train", "validation"):
        np.testing.assert_allclose(m.history[f"kl_global_{s}"].to_numpy(), 9.0)
        np.testing.assert_allclose(m.history[f"kl_local_{s}"].to_numpy(), 0.5)
        expected = m.history[f"reconstruction_loss_{s}"].to_numpy() + 0.5 + 9.0 / n_train
        np.testing.assert_allclose(m.history[f"elbo_{s}"].to_numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(m.history["elbo_validation"].to_numpy(), 5.5 + 9.0 / 45)


def test_early_stopping_min_delta(counts_small):
    setup_anndata(counts_small)
    m = _ToyModel(counts_small, validation="same")
    data = m._data()
    tr, va = split_indices(data.n_obs)
    hist = train_module(m.module, data, tr, va, max_epochs=30, batch_size=10, lr=0.1, early_stopping=True,
                        early_stopping_patience=3, early_stopping_min_delta=1e9, progress_bar=False)
    assert len(hist["elbo_validation"]) == 4


# ----------------------------------------------------------------------------- NaN guard, output, devices


def test_nan_weight_raises_floating_point_error(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=2, hidden_sizes=(16,))
    with torch.no_grad():
        m.module.encoder.mean.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="learning rate") as info:
        m.train(max_epochs=2, progress_bar=False)
    assert "epoch 0, step 0" in str(info.value)
    assert "lr" in str(info.value)


@pytest.mark.parametrize("model_cls", [AE, VAE])
def test_huge_learning_rate_raises_and_keeps_a_usable_model(profiles_small, model_cls):
    model_cls.setup_anndata(profiles_small)
    m = model_cls(profiles_small, n_latent=2, hidden_sizes=(16,))
    with pytest.raises(FloatingPointError, match="learning rate"):
        m.train(max_epochs=20, batch_size=64, plan_kwargs={"lr": 1e6}, progress_bar=False)
    # the message promises that the parameters from before the failing step are kept: the model
    # must still hold finite weights (BatchNorm running statistics included) and give finite output
    for name, t in list(m.module.named_parameters()) + list(m.module.named_buffers()):
        assert torch.isfinite(t).all(), f"{name} is not finite after the NaN guard fired"
    assert np.isfinite(m.get_latent_representation()).all()


def test_progress_bar_false_prints_nothing(profiles_small, capfd):
    setup_anndata(profiles_small)
    m = _ToyModel(profiles_small, validation="flat")
    m.train(max_epochs=5, early_stopping=True, early_stopping_patience=1, progress_bar=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert len(m.history["elbo_train"]) == 2  # it did stop early, silently


def test_progress_bar_true_prints(profiles_small, capfd):
    setup_anndata(profiles_small)
    m = _ToyModel(profiles_small, validation="flat")
    m.train(max_epochs=5, early_stopping=True, early_stopping_patience=1, progress_bar=True)
    out, err = capfd.readouterr()
    assert "Training" in err
    assert "Early stopping at epoch 2" in out


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        expected = "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_train_on_cpu_explicitly(profiles_small):
    VAE.setup_anndata(profiles_small)
    m = VAE(profiles_small, n_latent=2, hidden_sizes=(16,))
    m.train(max_epochs=1, device="cpu", progress_bar=False)
    assert m.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in m.module.parameters())
    assert m.get_latent_representation().shape == (600, 2)


def test_sparse_anndata_trains_like_dense():
    zs, hs = [], []
    for sparse in (False, True):
        mini_scvi.settings.seed = 0
        a = mini_scvi.data.three_profiles(n_cells=400, n_genes=40)
        if sparse:
            a.X = sp.csr_matrix(a.X)
        VAE.setup_anndata(a)
        m = VAE(a, n_latent=3, hidden_sizes=(16,))
        m.train(max_epochs=2, batch_size=64, progress_bar=False)
        zs.append(m.get_latent_representation())
        hs.append(m.history["elbo_train"].to_numpy())
    assert zs[1].shape == (400, 3)
    # same seed, same cells in the same minibatches: the same model
    np.testing.assert_allclose(zs[0], zs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hs[0], hs[1], rtol=1e-6)
