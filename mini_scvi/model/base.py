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
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .. import _adata
from ..module import BaseModule
from ..train import resolve_device, split_indices, train_module

_PLAN_KEYS = {"lr", "eps", "weight_decay", "n_epochs_kl_warmup"}


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
        self.device = resolve_device(device)
        self.module.to(self.device)
        data = self._data()
        self.train_indices, self.validation_indices = split_indices(data.n_obs, train_size)
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

    # ------------------------------------------------------------------ outputs

    def get_latent_representation(
        self, adata: ad.AnnData | None = None, give_mean: bool = True, batch_size: int = 1024
    ) -> np.ndarray:
        """(n_cells, n_latent): the posterior mean of z (``give_mean=True``) or one sample of it."""
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
        if not (path / "model.pt").exists():
            raise FileNotFoundError(f"no saved model in {path} (expected {path / 'model.pt'}).")
        saved = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
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
        model.module.load_state_dict(saved["state_dict"])
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        model.history = {k: pd.DataFrame({k: v}).rename_axis("epoch") for k, v in saved["history"].items()}
        model.is_trained = saved["is_trained"]
        return model

