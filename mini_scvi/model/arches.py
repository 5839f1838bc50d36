"""Mapping a query onto a trained reference with scArches (Lotfollahi et al. 2022), as scvi-tools'
``ArchesMixin`` does it::

    query = SCVI.prepare_query_anndata(query, reference)       # the reference's genes, in its order
    model = SCVI.load_query_data(query, reference)             # reference weights + new batch columns
    model.train(max_epochs=200)                                # learns the new columns only
    z = model.get_latent_representation()                      # query cells in the reference's space

The batch enters every layer that takes it as one-hot columns appended to the layer's input
(``mini_scvi/nn.py``). A query batch the reference never saw gets new columns at the end of those
weight matrices (and of every per-batch parameter: gene-batch dispersion, AutoZI's gene-batch
Beta logits, and the library-size prior, computed from the query). Reference categories keep
their codes; the new ones come after them.

Freezing, unless ``unfrozen=True``:

- every reference parameter gets ``requires_grad=False``: Adam skips it entirely;
- an expanded matrix is one tensor holding reference columns and new ones: it keeps
  ``requires_grad=True`` and a gradient hook sets the gradient of its reference columns to 0,
  so Adam's moments and step for them are exactly 0. Adam's weight decay would still move them
  (it adds ``weight_decay * w`` to the gradient after the hook), so a query model trains with
  ``weight_decay=0`` and refuses any other value (scvi-tools' tutorials pass 0 for this reason);
- BatchNorm layers stay in eval mode during query training (a forward pre-hook switches them
  back): they normalize with the reference's running statistics and never update them, and
  ``freeze_dropout=True`` does the same for dropout.

So every number of the reference is bit for bit what it was; only the new columns learn.
scvi-tools by default also trains the decoder's BatchNorm (``freeze_batchnorm_decoder=False``) and
the library encoder; here the defaults freeze both, and ``freeze_batchnorm_decoder=False`` lets the
decoder's BatchNorm (weights and statistics) learn as in scvi-tools.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .. import _adata
from ..train import resolve_device

MIN_VAR_NAME_RATIO = 0.8  # fewer of the reference's genes than this in the query: warn, as scvi-tools


class ArchesMixin:
    """``load_query_data`` and ``prepare_query_anndata`` for a ``BaseModel`` with a batch covariate."""

    _frozen_reference = False  # True on a model made by load_query_data (unless unfrozen=True)

    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference_model,
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = True,
        device: str | torch.device = "cpu",
    ):
        """A model of the reference extended to the batches of ``adata``, ready for ``train()``.

        ``reference_model``: a trained model of this class, or a directory written by its ``save()``.
        ``adata`` must have the reference's genes in its order (see ``prepare_query_anndata``), raw
        counts where the reference had them, and the reference's ``batch_key`` column with at
        least one new batch. ``adata`` is registered with the reference's set-up, its batch
        categories extended (reference first, then the batches present in the query).

        Unless ``unfrozen=True`` only the new batch columns learn (module docstring): BatchNorm layers
        (``freeze_batchnorm_encoder`` / ``_decoder``) and, with ``freeze_dropout``, dropout run in
        eval mode, and ``train()`` uses ``weight_decay=0``. Saved and loaded again, a query model is
        an ordinary model of n_ref + n_new batches, with nothing frozen.
        """
        ref = _load_reference(cls, reference_model)
        if not ref["is_trained"]:
            raise ValueError("The reference model is not trained: call reference.train() before mapping a query on it.")
        if not pd.Index(ref["var_names"]).equals(pd.Index(adata.var_names)):
            raise ValueError(
                f"The query's {adata.n_vars} genes are not the reference's {len(ref['var_names'])} in the same "
                f"order. Call {cls.__name__}.prepare_query_anndata(adata, reference_model) first."
            )
        registry = ref["registry"]
        if registry["batch_key"] is None:
            raise ValueError("The reference was set up without batch_key: scArches maps a query as new batches.")
        ref_cats = list(registry["batch_categories"])
        present = set(adata.obs[registry["batch_key"]].astype(str)) if registry["batch_key"] in adata.obs else set()
        query_cats = [c for c in _adata._categories(adata, registry["batch_key"], "batch") if c in present]
        new_cats = [c for c in query_cats if c not in ref_cats]
        if not new_cats:
            raise ValueError(
                f"Every batch of the query ({query_cats}) is already one of the reference's; there is nothing "
                "to learn. Use the reference itself: reference.get_latent_representation(adata)."
            )
        _adata.check_counts(_adata._matrix(adata, registry["layer"]), "the query's counts")
        if registry["labels_key"] is not None:  # the codes the model will read; fails clearly here
            _adata._codes(adata, registry["labels_key"], registry["labels_categories"], "labels")
        adata.uns[_adata.REGISTRY_KEY] = {
            **{k: ("" if v is None else v) for k, v in registry.items()},
            "batch_categories": ref_cats + new_cats,
        }
        model = cls(adata, **ref["init_params"])
        frozen_cols = _transfer_weights(model.module, ref["state_dict"], len(ref_cats), len(new_cats))
        if not unfrozen:
            _freeze_reference(
                model.module, frozen_cols, freeze_dropout, freeze_batchnorm_encoder, freeze_batchnorm_decoder
            )
            model._frozen_reference = True
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        model.is_trained = False
        return model

    @classmethod
    def prepare_query_anndata(
        cls, adata: ad.AnnData, reference_model, return_reference_var_names: bool = False, inplace: bool = True
    ) -> ad.AnnData | pd.Index:
        """Put the query's genes in the reference's order, dropping the others and zero-filling the
        reference genes the query lacks (with a warning that says how many).

        Returns the prepared AnnData: ``adata`` itself, changed, when ``inplace=True``, otherwise a
        new one. Zero-filled genes get no ``varm`` rows, so ``varm`` is dropped when any are added.
        ``return_reference_var_names=True`` returns the reference's gene names only.
        """
        var_names = pd.Index(_load_reference(cls, reference_model)["var_names"])
        if return_reference_var_names:
            return var_names
        if var_names.equals(pd.Index(adata.var_names)):
            return adata
        n_found = len(var_names.intersection(adata.var_names))
        if n_found == 0:
            raise ValueError(
                f"None of the reference's {len(var_names)} genes (e.g. {list(var_names[:3])}) is in the query "
                f"(e.g. {list(adata.var_names[:3])}): name the genes the same way (symbols vs. Ensembl ids?)."
            )
        missing = var_names.difference(adata.var_names)
        out = adata
        if len(missing):
            low = n_found / len(var_names) < MIN_VAR_NAME_RATIO
            warnings.warn(
                f"{len(missing)} of the reference's {len(var_names)} genes are not in the query "
                f"(e.g. {list(missing[:3])}): they are filled with zero counts."
                + (f" Fewer than {MIN_VAR_NAME_RATIO:.0%} of them are present: expect a poor mapping." if low else ""),
                UserWarning,
                stacklevel=2,
            )
            out = _zero_padded(adata, missing)
        out = out[:, var_names].copy()
        if inplace:
            adata._init_as_actual(out)  # as scvi-tools: anndata has no public in-place replacement
            return adata
        return out

    def train(self, *args, plan_kwargs: dict | None = None, **kwargs) -> None:
        """``BaseModel.train``. A query model from ``load_query_data`` trains with ``weight_decay=0``:
        weight decay would shrink the frozen reference columns of the expanded matrices."""
        if self._frozen_reference:
            plan_kwargs = dict(plan_kwargs or {})
            if plan_kwargs.setdefault("weight_decay", 0.0) != 0.0:
                raise ValueError(
                    f"weight_decay={plan_kwargs['weight_decay']} would move the frozen reference weights (Adam adds "
                    "weight_decay * w to every entry's gradient). Train a query with weight_decay=0, or load it "
                    "with load_query_data(..., unfrozen=True)."
                )
        super().train(*args, plan_kwargs=plan_kwargs, **kwargs)


# --------------------------------------------------------------------------- helpers


def _load_reference(cls, reference_model) -> dict:
    """What ``BaseModel.save`` writes, from a directory or from a model in memory."""
    if isinstance(reference_model, (str, os.PathLike)):
        path = Path(reference_model) / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"no saved reference model in {reference_model} (expected {path}).")
        ref = torch.load(path, map_location="cpu", weights_only=False)
    elif hasattr(reference_model, "module") and hasattr(reference_model, "registry"):
        ref = {
            "model_class": type(reference_model).__name__,
            "state_dict": {k: v.detach().cpu().clone() for k, v in reference_model.module.state_dict().items()},
            "init_params": dict(reference_model.init_params),
            "registry": dict(reference_model.registry),
            "var_names": list(reference_model.var_names),
            "is_trained": reference_model.is_trained,
        }
    else:
        raise TypeError(
            f"reference_model must be a {cls.__name__} or a directory it was saved to, "
            f"got {type(reference_model).__name__}."
        )
    if ref["model_class"] != cls.__name__:
        raise TypeError(
            f"The reference is a {ref['model_class']}; map a query onto it with {ref['model_class']}, not {cls.__name__}."
        )
    return ref


@torch.no_grad()
def _transfer_weights(module: nn.Module, ref_state: dict, n_ref: int, n_new: int) -> dict[str, int]:
    """Copy the reference into ``module`` (built for n_ref + n_new batches). Returns, for each
    parameter that grew, how many of its leading columns (last dimension) hold the reference."""
    state = module.state_dict()
    frozen_cols = {}
    for key, r in ref_state.items():
        t = state[key]
        if t.shape == r.shape:
            t.copy_(r)
        elif key in ("library_log_means", "library_log_vars"):
            t[:n_ref] = r  # the new batches keep the prior computed from the query's own cells
        else:
            r = r.reshape(*t.shape[:-1], -1)  # (G,) -> (G, 1): a gene-batch parameter of a 1-batch reference
            k, n_cols = r.shape[-1], t.shape[-1]
            # FCLayers skips a covariate with one category: a 1-batch reference had no column for it
            if n_cols - k != n_new and not (n_ref == 1 and n_cols - k == n_new + 1):
                raise RuntimeError(f"{key}: cannot extend {tuple(r.shape)} to {tuple(t.shape)} by {n_new} batch(es).")
            t[..., :k] = r
            t[..., k : n_cols - n_new] = 0.0  # that missing column acted as zeros
            frozen_cols[key] = n_cols - n_new
    module.load_state_dict(state)
    return frozen_cols


def _zero_grad_of_first_columns(n_frozen: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[..., :n_frozen] = 0.0  # the reference's columns; the new batches' columns keep theirs
        return grad

    return hook


def _stay_in_eval(layer: nn.Module, args) -> None:
    """Forward pre-hook: whatever ``module.train()`` said, this layer runs in eval mode (a BatchNorm
    uses and keeps the reference's running statistics; a Dropout drops nothing)."""
    layer.eval()


def _freeze_reference(module, frozen_cols, freeze_dropout, freeze_batchnorm_encoder, freeze_batchnorm_decoder) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(name in frozen_cols)
        if name in frozen_cols:
            p.register_hook(_zero_grad_of_first_columns(frozen_cols[name]))
    for name, layer in module.named_modules():
        if isinstance(layer, nn.BatchNorm1d):
            if freeze_batchnorm_decoder if name.startswith("decoder") else freeze_batchnorm_encoder:
                layer.register_forward_pre_hook(_stay_in_eval)
            else:  # this BatchNorm learns on the query: weights and running statistics
                layer.requires_grad_(True)
        elif isinstance(layer, nn.Dropout) and freeze_dropout:
            layer.register_forward_pre_hook(_stay_in_eval)


def _zero_padded(adata: ad.AnnData, genes: pd.Index) -> ad.AnnData:
    """``adata`` with zero-count columns appended for ``genes`` (X and every layer)."""
    def pad(M):
        if sp.issparse(M):
            return sp.hstack([M, sp.csr_matrix((adata.n_obs, len(genes)), dtype=M.dtype)], format="csr")
        M = np.asarray(M)
        return np.hstack([M, np.zeros((adata.n_obs, len(genes)), dtype=M.dtype)])

    return ad.AnnData(
        X=None if adata.X is None else pad(adata.X),
        obs=adata.obs.copy(),
        var=pd.concat([adata.var, pd.DataFrame(index=genes)]),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        layers={k: pad(v) for k, v in adata.layers.items()},
    )
