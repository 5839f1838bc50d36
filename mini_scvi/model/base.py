"""The AnnData-facing layer shared by every model (chapter 2), with scvi-tools' call shapes::

    Model.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    model = Model(adata, n_latent=10)
    model.train(max_epochs=200, plan_kwargs={"lr": 1e-3})
    z = model.get_latent_representation()
    model.save("dir"); model = Model.load("dir", adata)

A model class only says which module it builds (``_module_cls``) and how (``_module_kwargs``);
everything else lives here, once.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .. import _adata
from ..module import BaseModule
from ..train import check_int, check_number, check_train_arguments, resolve_device, split_indices, train_module

_PLAN_KEYS = {"lr", "eps", "weight_decay", "n_epochs_kl_warmup"}
# what save() writes into model.pt; load() refuses a file without them
_SAVED_KEYS = ("model_class", "state_dict", "init_params", "registry", "var_names", "history", "is_trained")


def _check_model_arguments(model_kwargs: dict) -> None:
    """Clear errors for the architecture arguments the models share, before any layer is built
    (a size of 0 builds an empty layer, which fails much later, inside torch, or not at all)."""
    for name in ("n_latent", "n_hidden", "n_layers"):
        if name in model_kwargs:
            check_int(name, model_kwargs[name], 1)
    if "hidden_sizes" in model_kwargs:
        sizes = model_kwargs["hidden_sizes"]
        if isinstance(sizes, str) or not isinstance(sizes, Sequence) or len(sizes) == 0:
            raise TypeError(f"hidden_sizes must list one size per hidden layer, e.g. hidden_sizes=(256, 64); got {sizes!r}.")
        for i, size in enumerate(sizes):
            check_int(f"hidden_sizes[{i}]", size, 1)
    if "dropout_rate" in model_kwargs:
        check_number("dropout_rate", model_kwargs["dropout_rate"], 0.0, 1.0, high_open=True,
                     hint=" It is the share of hidden units dropped in training; 1 would drop them all.")


def _user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning raised by the caller points at the user's own line: the
    first frame outside mini_scvi and torch (whose ``no_grad`` decorator adds a frame of its own)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("mini_scvi", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _read_model_file(file: Path) -> dict:
    """``torch.load`` a model.pt and check that it holds what ``save`` writes."""
    not_ours = f"{file} is not a mini_scvi model file (corrupt or written by something else)"
    fix = "Re-save the model with model.save(dir_path, overwrite=True), or pass the folder that holds the right file."
    try:
        saved = torch.load(file, map_location="cpu", weights_only=False)
    except PermissionError:
        raise
    except Exception as err:  # a truncated or foreign file fails in many ways: unpickling, zip reading, EOF...
        raise ValueError(f"{not_ours}: torch.load failed ({type(err).__name__}). {fix}") from err
    if isinstance(saved, dict) and all(k in saved for k in _SAVED_KEYS):
        return saved
    if isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        what = "only weights (a state_dict, as torch.save(model.module.state_dict(), ...) writes)"
    elif isinstance(saved, dict):
        what = f"a dict without the keys {[k for k in _SAVED_KEYS if k not in saved]}"
    else:
        what = f"a {type(saved).__name__}, not the dict that model.save writes"
    raise ValueError(f"{not_ours}: it holds {what}. {fix}")


class BaseModel:
    """Subclasses set ``_module_cls`` and may override ``_module_kwargs`` and ``_default_plan``."""

    _module_cls: type[BaseModule]
    _default_plan: dict = {}

    # ------------------------------------------------------------------ set-up

    @classmethod
    def setup_anndata(
        cls, adata: ad.AnnData, layer: str | None = None, batch_key: str | None = None, labels_key: str | None = None
    ) -> None:
        """Check that ``adata`` holds raw counts and record where counts, batch and labels live."""
        _adata.setup_anndata(adata, layer=layer, batch_key=batch_key, labels_key=labels_key)

    def __init__(self, adata: ad.AnnData, **model_kwargs) -> None:
        self.adata = adata
        self.registry = _adata.get_registry(adata, type(self).__name__)
        _check_model_arguments(model_kwargs)
        self.var_names = pd.Index(adata.var_names).copy()
        self.init_params = dict(model_kwargs)
        self.summary_stats = {
            "n_vars": adata.n_vars,
            "n_batch": len(self.registry["batch_categories"]),
            "n_labels": len(self.registry["labels_categories"]),
        }
        self.module = self._module_cls(**self._module_kwargs(adata, **model_kwargs))
        self.device = torch.device("cpu")
        self.history: dict[str, pd.DataFrame] = {}
        self.is_trained = False
        self.train_indices = self.validation_indices = None

    def _module_kwargs(self, adata: ad.AnnData, **model_kwargs) -> dict:
        return {"n_input": adata.n_vars, **model_kwargs}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.init_params.items())
        return (
            f"{type(self).__name__}({params}) on {self.adata.n_obs} cells x {self.adata.n_vars} genes, "
            f"{self.summary_stats['n_batch']} batch(es); trained: {self.is_trained}"
        )

    # ------------------------------------------------------------------ data

    def _validate_anndata(self, adata: ad.AnnData | None) -> ad.AnnData:
        """Return the AnnData to use, checking that a new one matches what the model was built on."""
        if adata is None or adata is self.adata:
            return self.adata
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"expected an AnnData, got {type(adata).__name__}")
        if not self.var_names.equals(pd.Index(adata.var_names)):
            missing = self.var_names.difference(adata.var_names)
            raise ValueError(
                f"The genes of this AnnData ({adata.n_vars}) differ from the {len(self.var_names)} the model was "
                f"trained on ({len(missing)} missing, e.g. {list(missing[:3])}). Subset and order them the "
                "same way: adata = adata[:, model.var_names].copy()."
            )
        _adata.check_counts(_adata._matrix(adata, self.registry["layer"]), "the new AnnData's counts")
        return adata

    def _data(self, adata: ad.AnnData | None = None) -> _adata.TensorData:
        adata = self._validate_anndata(adata)
        return _adata.TensorData(adata, self.registry, self.device)

    @torch.no_grad()
    def _forward_batches(self, adata: ad.AnnData | None, batch_size: int, indices=None):
        """Yield ``(tensors, inference_outputs)`` over cells in order, in eval mode."""
        check_int("batch_size", batch_size, 1)  # one cell per batch is fine here: BatchNorm is in eval mode
        data = self._data(adata)
        self.module.eval()
        indices = np.arange(data.n_obs) if indices is None else np.asarray(indices)
        for tensors in data.batches(indices, batch_size):
            yield tensors, self.module.inference(**self.module._get_inference_input(tensors))

    # ------------------------------------------------------------------ training

    def _default_max_epochs(self) -> int:
        return int(min(round(20000 / self.adata.n_obs * 400), 400))

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        train_size: float = 0.9,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        plan_kwargs: dict | None = None,
        device: str | torch.device = "auto",
        progress_bar: bool = True,
    ) -> None:
        """Fit the model; curves go to ``self.history`` (a dict of one-column DataFrames, as scvi-tools).

        ``plan_kwargs`` takes ``lr``, ``eps``, ``weight_decay`` and ``n_epochs_kl_warmup``.
        """
        plan = {**self._default_plan, **(plan_kwargs or {})}
        unknown = set(plan) - _PLAN_KEYS
        if unknown:
            raise TypeError(f"unknown plan_kwargs {sorted(unknown)}; accepted: {sorted(_PLAN_KEYS)}")
        if max_epochs is None:
            max_epochs = self._default_max_epochs()
        # every argument is checked before the model changes; train_size in split_indices, which draws
        # the split (the first draw of the run, before and after this check was added: same numbers)
        check_train_arguments(max_epochs, batch_size, early_stopping_patience, **plan)
        device = resolve_device(device)
        train_indices, validation_indices = split_indices(self.adata.n_obs, train_size)
        self.device = device
        self.module.to(self.device)
        data = self._data()
        self.train_indices, self.validation_indices = train_indices, validation_indices
        self._on_train_start(data)
        history = train_module(
            self.module, data, self.train_indices, self.validation_indices, max_epochs=max_epochs,
            batch_size=batch_size, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience, progress_bar=progress_bar, **plan,
        )
        # append, so that a second call to train() continues the curves
        for key, values in history.items():
            df = pd.DataFrame({key: values})
            if key in self.history:
                df.index += len(self.history[key])
                df = pd.concat([self.history[key], df])
            df.index.name = "epoch"
            self.history[key] = df
        self.is_trained = True

    def _on_train_start(self, data: _adata.TensorData) -> None:
        """Hook for statistics computed from the training data (scVI's library-size prior)."""

    def _check_if_trained(self, method: str) -> None:
        """Warn, as scvi-tools does, when ``method`` is asked for output of a model never trained: its
        numbers would come from the random initial weights. Every public output method calls this."""
        if not self.is_trained:
            name = type(self).__name__
            warnings.warn(
                f"{name}.{method}() was called on a model that has not been trained, so its output comes from "
                f"random initial weights. Make sure the model is trained first: call model.train(), or load a "
                f"trained one with {name}.load(dir_path, adata).",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )

    # ------------------------------------------------------------------ outputs

    def get_latent_representation(
        self, adata: ad.AnnData | None = None, give_mean: bool = True, batch_size: int = 1024
    ) -> np.ndarray:
        """(n_cells, n_latent): the posterior mean of z (``give_mean=True``) or one sample of it."""
        self._check_if_trained("get_latent_representation")
        out = []
        for _, inf in self._forward_batches(adata, batch_size):
            out.append((inf.get("qz_m", inf["z"]) if give_mean else inf["z"]).cpu())
        return torch.cat(out).numpy()

    # ------------------------------------------------------------------ persistence

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Write weights, constructor arguments, registry, gene names and history to ``dir_path``."""
        path = Path(dir_path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model_class": type(self).__name__,
                "state_dict": {k: v.cpu() for k, v in self.module.state_dict().items()},
                "init_params": self.init_params,
                "registry": self.registry,
                "var_names": list(self.var_names),
                "history": {k: v[k].tolist() for k, v in self.history.items()},
                "is_trained": self.is_trained,
            },
            path / "model.pt",
        )
        if save_anndata:
            self.adata.write_h5ad(path / "adata.h5ad")

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: ad.AnnData | None = None, device: str = "cpu"):
        """Rebuild a saved model on ``adata`` (or on the AnnData saved with it)."""
        path = Path(dir_path)
        if path.is_file():
            raise ValueError(f"{path} is a file; pass the folder that holds it: {cls.__name__}.load({str(path.parent)!r}, adata).")
        if not (path / "model.pt").exists():
            raise FileNotFoundError(f"no saved model in {path} (expected {path / 'model.pt'}).")
        saved = _read_model_file(path / "model.pt")
        if saved["model_class"] != cls.__name__:
            raise TypeError(f"{path} holds a {saved['model_class']}; load it with that class, not {cls.__name__}.")
        if adata is None:
            if not (path / "adata.h5ad").exists():
                raise ValueError("pass the AnnData to load the model on (it was saved without one).")
            adata = ad.read_h5ad(path / "adata.h5ad")
        if list(adata.var_names) != saved["var_names"]:
            raise ValueError(
                f"The genes of this AnnData ({adata.n_vars}) differ from the {len(saved['var_names'])} the model "
                "was trained on. Subset and order them the same way before loading."
            )
        adata.uns[_adata.REGISTRY_KEY] = {
            k: (v if v is not None else "") for k, v in saved["registry"].items()
        }
        model = cls(adata, **saved["init_params"])
        try:
            model.module.load_state_dict(saved["state_dict"])
        except (RuntimeError, TypeError) as err:  # torch lists every missing or misshapen tensor
            raise ValueError(
                f"{path / 'model.pt'} is not a mini_scvi model file (corrupt or written by something else): its "
                f"weights do not fit a {cls.__name__} built with {saved['init_params']}. Re-save the model with "
                "model.save(dir_path, overwrite=True)."
            ) from err
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        model.history = {k: pd.DataFrame({k: v}).rename_axis("epoch") for k, v in saved["history"].items()}
        model.is_trained = saved["is_trained"]
        return model

