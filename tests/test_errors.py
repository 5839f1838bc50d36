"""Clear errors for bad arguments (issue 15, item 5): each names the argument, what it got and what to do.

Every bad input below used to end in a library's own message (BatchNorm's "Expected more than 1
value per channel", "range() arg 3 must not be zero", an IndexError, an UnpicklingError...) or to
pass silently. Each test matches the text of the new message, so it fails if the check is removed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mini_scvi.model import AE, AUTOZI, SCVI, VAE
from mini_scvi.train import split_indices, train_module

SMALL = {AE: {"n_latent": 2, "hidden_sizes": (8,)}, VAE: {"n_latent": 2, "hidden_sizes": (8,)},
         SCVI: {"n_latent": 2, "n_hidden": 8}, AUTOZI: {"n_latent": 2, "n_hidden": 8}}


def _model(adata, cls=VAE, **kwargs):
    cls.setup_anndata(adata)
    return cls(adata, **{**SMALL[cls], **kwargs})


def _train(m, **kwargs):
    m.train(**{"max_epochs": 1, "batch_size": 16, "progress_bar": False, **kwargs})


@pytest.fixture
def vae(counts_small):
    return _model(counts_small)


@pytest.fixture
def trained_vae(counts_small):
    m = _model(counts_small)
    _train(m)
    return m


# ----------------------------------------------------------------------------- model.train arguments


@pytest.mark.parametrize("batch_size", [1, 0, -4])
def test_batch_size_below_two_names_batchnorm(vae, batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be >= 2 because BatchNorm needs at least 2 cells") as info:
        _train(vae, batch_size=batch_size)
    assert f"got {batch_size}" in str(info.value)
    assert not vae.is_trained


@pytest.mark.parametrize("batch_size", [16.0, True, "16", None])
def test_batch_size_must_be_an_int(vae, batch_size):
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        _train(vae, batch_size=batch_size)


@pytest.mark.parametrize("max_epochs", [0, -3])
def test_max_epochs_below_one_is_an_error_not_a_silent_no_op(vae, max_epochs):
    with pytest.raises(ValueError, match=r"max_epochs must be >= 1") as info:
        _train(vae, max_epochs=max_epochs)
    assert f"got {max_epochs}" in str(info.value)
    assert not vae.is_trained and vae.history == {}


def test_max_epochs_must_be_an_int(vae):
    with pytest.raises(TypeError, match="max_epochs must be an integer"):
        _train(vae, max_epochs=2.5)


@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, math.nan, math.inf])
def test_lr_must_be_positive_and_finite(vae, lr):
    with pytest.raises(ValueError, match=r"lr must be > 0") as info:
        _train(vae, plan_kwargs={"lr": lr})
    assert "plan_kwargs={'lr'" in str(info.value)  # says where it goes


def test_lr_must_be_a_number(vae):
    with pytest.raises(TypeError, match="lr must be a number"):
        _train(vae, plan_kwargs={"lr": "1e-3"})


@pytest.mark.parametrize("key", ["eps", "weight_decay"])
def test_eps_and_weight_decay_must_not_be_negative(vae, key):
    with pytest.raises(ValueError, match=rf"{key} must be >= 0"):
        _train(vae, plan_kwargs={key: -0.1})


def test_negative_kl_warmup_rejected(vae):
    # it would make the KL weight negative, silently
    with pytest.raises(ValueError, match=r"n_epochs_kl_warmup must be >= 0"):
        _train(vae, plan_kwargs={"n_epochs_kl_warmup": -2})
    with pytest.raises(TypeError, match="n_epochs_kl_warmup must be an integer"):
        _train(vae, plan_kwargs={"n_epochs_kl_warmup": 2.5})


def test_early_stopping_patience_below_one_rejected(vae):
    with pytest.raises(ValueError, match=r"early_stopping_patience must be >= 1"):
        _train(vae, early_stopping=True, early_stopping_patience=0)


@pytest.mark.parametrize("train_size", [0, 0.0, -0.5, 1.01, math.nan])
def test_train_size_outside_zero_one(vae, train_size):
    with pytest.raises(ValueError, match=r"train_size must be in \(0, 1\]"):
        _train(vae, train_size=train_size)


@pytest.mark.parametrize("train_size", ["0.9", True, None])
def test_train_size_must_be_a_number(vae, train_size):
    # True used to pass as 1.0; "0.9" ended in "'<' not supported between instances of 'float' and 'str'"
    with pytest.raises(TypeError, match="train_size must be a number"):
        _train(vae, train_size=train_size)


def test_unknown_device_named(vae):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda'.*got 'gpu'"):
        _train(vae, device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_named(vae):
    # torch's own error was "AssertionError: Torch not compiled with CUDA enabled", when moving the model
    with pytest.raises(ValueError, match=r"device='cuda'.*device='auto' or 'cpu'"):
        _train(vae, device="cuda")


def test_failed_train_call_changes_nothing(vae):
    # checks run before the split is drawn: a rejected call leaves the RNG, the split and the device alone
    rng = torch.get_rng_state()
    for bad in ({"batch_size": 1}, {"max_epochs": 0}, {"plan_kwargs": {"lr": 0}}, {"train_size": 0}, {"device": "gpu"}):
        with pytest.raises((ValueError, TypeError)):
            _train(vae, **bad)
    assert torch.equal(torch.get_rng_state(), rng)
    assert vae.train_indices is None and vae.history == {} and vae.device == torch.device("cpu")


def test_train_module_checks_its_arguments_too(vae):
    data = vae._data()
    train_idx, val_idx = split_indices(data.n_obs)
    with pytest.raises(ValueError, match=r"batch_size must be >= 2"):
        train_module(vae.module, data, train_idx, val_idx, max_epochs=1, batch_size=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"early_stopping_min_delta must be >= 0"):
        train_module(vae.module, data, train_idx, val_idx, max_epochs=1, early_stopping_min_delta=-1.0,
                     progress_bar=False)


def test_good_training_arguments_still_work(make_counts):
    # the smallest allowed batch, numpy scalars, no warm-up, no validation split
    a = make_counts(n_cells=31)
    m = _model(a)
    m.train(max_epochs=np.int64(2), batch_size=np.int64(2), train_size=1.0, early_stopping=True,
            early_stopping_patience=1, plan_kwargs={"lr": np.float64(1e-3), "n_epochs_kl_warmup": 0, "weight_decay": 0.0},
            progress_bar=False)
    # 31 training cells in batches of 2 leave a lone last cell: it joins the previous batch
    assert m.is_trained and len(m.train_indices) == 31
    assert np.isfinite(m.history["elbo_train"].to_numpy()).all()
    m.train(max_epochs=1, batch_size=16, device="cpu", plan_kwargs={"n_epochs_kl_warmup": None}, progress_bar=False)
    assert len(m.history["elbo_train"]) == 3


# ----------------------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize("cls", [AE, VAE, SCVI, AUTOZI])
def test_n_latent_zero_rejected(counts_small, cls):
    # AE/VAE used to build a 0-d code silently; scVI/AutoZI failed later, inside torch
    with pytest.raises(ValueError, match=r"n_latent must be >= 1, got 0"):
        _model(counts_small, cls, n_latent=0)


@pytest.mark.parametrize("cls", [SCVI, AUTOZI])
@pytest.mark.parametrize("name", ["n_hidden", "n_layers"])
def test_n_hidden_and_n_layers_zero_rejected(counts_small, cls, name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got 0"):
        _model(counts_small, cls, **{name: 0})


@pytest.mark.parametrize("cls", [AE, VAE])
def test_hidden_sizes_checked(counts_small, cls):
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\] must be >= 1, got 0"):
        _model(counts_small, cls, hidden_sizes=(8, 0))
    for bad in [(), 64]:  # () used to end in "IndexError: tuple index out of range"
        with pytest.raises(TypeError, match="hidden_sizes must list one size per hidden layer"):
            _model(counts_small, cls, hidden_sizes=bad)


@pytest.mark.parametrize("value", [2.0, True, "2"])
def test_sizes_must_be_ints(counts_small, value):
    with pytest.raises(TypeError, match="n_latent must be an integer"):
        _model(counts_small, SCVI, n_latent=value)


@pytest.mark.parametrize("cls", [AE, SCVI])
@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_dropout_rate_outside_zero_one(counts_small, cls, rate):
    # 1.0 used to be accepted, and to drop every hidden unit
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        _model(counts_small, cls, dropout_rate=rate)


def test_good_constructor_arguments_still_work(counts_small):
    m = _model(counts_small, AE, n_latent=np.int64(3), hidden_sizes=[8, np.int64(4)], dropout_rate=0)
    assert m.init_params["hidden_sizes"] == (8, 4)  # stored as a tuple, as before
    assert m.module.n_latent == 3
    s = _model(counts_small, SCVI, n_latent=1, n_hidden=1, n_layers=2, dropout_rate=0.0)
    assert s.module.n_latent == 1


# ----------------------------------------------------------------------------- loading a model.pt


def _bad_model_file(trained_vae, tmp_path, kind: str):
    trained_vae.save(tmp_path / "m")
    file = tmp_path / "m" / "model.pt"
    good = file.read_bytes()
    if kind == "random bytes":
        file.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "truncated":
        file.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        file.write_bytes(b"")
    elif kind == "state_dict":
        torch.save(trained_vae.module.state_dict(), file)
    elif kind == "dict without our keys":
        torch.save({"model_class": "VAE", "weights": torch.ones(3)}, file)
    elif kind == "tensor":
        torch.save(torch.ones(3), file)
    return file


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "empty", "state_dict", "dict without our keys", "tensor"])
def test_corrupt_or_foreign_model_file(trained_vae, counts_small, tmp_path, kind):
    file = _bad_model_file(trained_vae, tmp_path, kind)
    with pytest.raises(ValueError, match="is not a mini_scvi model file") as info:
        VAE.load(tmp_path / "m", counts_small)
    message = str(info.value)
    assert str(file) in message and "model.save(" in message


def test_state_dict_message_says_what_it_found(trained_vae, counts_small, tmp_path):
    _bad_model_file(trained_vae, tmp_path, "state_dict")
    with pytest.raises(ValueError, match="only weights"):
        VAE.load(tmp_path / "m", counts_small)


def test_weights_that_do_not_fit_the_architecture(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    file = tmp_path / "m" / "model.pt"
    saved = torch.load(file, weights_only=False)
    saved["init_params"]["n_latent"] = 3  # the weights are for n_latent=2
    torch.save(saved, file)
    with pytest.raises(ValueError, match=r"weights do not fit a VAE built with .*'n_latent': 3") as info:
        VAE.load(tmp_path / "m", counts_small)
    assert "model.save(" in str(info.value)


def test_load_given_the_file_instead_of_its_folder(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    with pytest.raises(ValueError, match="is a file; pass the folder that holds it") as info:
        VAE.load(tmp_path / "m" / "model.pt", counts_small)
    assert str(tmp_path / "m") in str(info.value)


def test_good_model_file_still_loads(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    loaded = VAE.load(tmp_path / "m", counts_small)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained_vae.get_latent_representation())


# ----------------------------------------------------------------------------- outputs of an untrained model


@pytest.mark.parametrize(
    "cls, method, kwargs",
    [
        (AE, "get_latent_representation", {}),
        (AE, "get_reconstruction", {}),
        (VAE, "get_latent_representation", {"give_mean": False}),
        (VAE, "sample", {"n_cells": 3}),
        (SCVI, "get_latent_representation", {}),
        (AUTOZI, "get_latent_representation", {}),
    ],
)
def test_untrained_model_warns_by_method(counts_small, cls, method, kwargs):
    m = _model(counts_small, cls)
    with pytest.warns(UserWarning, match=rf"{cls.__name__}\.{method}\(\) was called on a model that has not been trained") as record:
        getattr(m, method)(**kwargs)
    message = str(record[0].message)
    assert "model.train()" in message and f"{cls.__name__}.load(" in message
    # the warning points at the caller's line (here), not at mini_scvi or torch's no_grad wrapper
    assert record[0].filename == __file__


# every public output of SCVI's toolkit (rnaseq.py) warns when the model is untrained; AUTOZI's
# get_alphas_betas / get_zero_inflation read parameters and do not (as in scvi-tools)


@pytest.mark.parametrize(
    "cls, method, kwargs",
    [
        pytest.param(SCVI, "get_normalized_expression", {}),
        pytest.param(SCVI, "posterior_predictive_sample", {}),
        pytest.param(SCVI, "get_elbo", {}),
        pytest.param(SCVI, "get_reconstruction_error", {}),
        pytest.param(SCVI, "get_marginal_ll", {"n_mc_samples": 3}),
        pytest.param(SCVI, "differential_expression", {"groupby": "label", "group1": "A", "n_samples": 20},),
    ],
)
def test_untrained_scvi_outputs_warn(counts_small, cls, method, kwargs):
    m = _model(counts_small, cls)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        getattr(m, method)(**kwargs)
    untrained = [w for w in record if "has not been trained" in str(w.message)]
    # exactly one warning, naming the method the user called (not a helper it calls)
    assert len(untrained) == 1 and f"{cls.__name__}.{method}()" in str(untrained[0].message)
    assert untrained[0].filename == __file__


def test_trained_or_loaded_model_does_not_warn(trained_vae, counts_small, tmp_path):
    trained_vae.save(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained_vae.get_latent_representation()
        trained_vae.sample(2)
        VAE.load(tmp_path / "m", counts_small).get_latent_representation()


def test_loaded_untrained_model_still_warns(vae, counts_small, tmp_path):
    vae.save(tmp_path / "m")
    with pytest.warns(UserWarning, match="has not been trained"):
        VAE.load(tmp_path / "m", counts_small).get_latent_representation()


# ----------------------------------------------------------------------------- output arguments


@pytest.mark.parametrize("batch_size", [0, -1])
def test_inference_batch_size_below_one(trained_vae, batch_size):
    # used to end in "range() arg 3 must not be zero" or "torch.cat(): expected a non-empty list"
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        trained_vae.get_latent_representation(batch_size=batch_size)


def test_inference_batch_size_one_is_fine(trained_vae):
    # BatchNorm is in eval mode at inference: one cell per batch gives the same numbers
    np.testing.assert_allclose(
        trained_vae.get_latent_representation(batch_size=1), trained_vae.get_latent_representation(), rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("n_cells", [0, -2])
def test_sample_needs_at_least_one_cell(trained_vae, n_cells):
    with pytest.raises(ValueError, match=r"n_cells must be >= 1"):
        trained_vae.sample(n_cells)
