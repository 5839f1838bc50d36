"""The one training loop, used by every model (chapter 2; KL warm-up in chapter 5).

Each epoch: shuffle the training cells, take Adam steps on minibatches, then evaluate the same
loss terms on the validation cells (every epoch by default; see ``check_val_every_n_epoch``). The KL weight ramps linearly from 0 to 1 over
``n_epochs_kl_warmup`` epochs, as in scvi-tools. History keeps, per epoch, every loss term on
both splits, named as scvi-tools names them (``elbo_train``, ``reconstruction_loss_validation``...).
"""

from __future__ import annotations

import math
from collections import defaultdict
from numbers import Real

import numpy as np
import torch
from tqdm import tqdm

from ._adata import TensorData
from .module import BaseModule


# --------------------------------------------------------------------------- argument checks
# Bad arguments are caught here, before any work, so that the user reads which argument is wrong
# and what it should be, instead of an error from deep inside torch (or, worse, no error at all).


def check_int(name: str, value, minimum: int, why: str = "") -> None:
    """Raise unless ``value`` is an integer >= ``minimum``; ``why`` explains the bound in the message."""
    # bool is a subclass of int, but batch_size=True is a mistake, not the number 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}.")


def check_number(
    name: str, value, low: float, high: float = math.inf,
    low_open: bool = False, high_open: bool = False, hint: str = "",
) -> None:
    """Raise unless ``value`` is a finite number in the interval from ``low`` to ``high``
    (``low_open``/``high_open`` exclude the end); ``hint`` ends the message."""
    if high == math.inf:
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number {interval}, got {value!r} ({type(value).__name__}).{hint}")
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not (math.isfinite(value) and inside):
        raise ValueError(f"{name} must be {interval}, got {value!r}.{hint}")


def check_train_arguments(max_epochs: int, batch_size: int, early_stopping_patience: int = 45, **plan) -> None:
    """Check the arguments of a training run; ``plan`` holds any of ``lr``, ``eps``, ``weight_decay``,
    ``n_epochs_kl_warmup`` and ``early_stopping_min_delta``. Nothing is drawn from the RNG."""
    check_int("max_epochs", max_epochs, 1, " (the number of passes over the training cells)")
    # a minibatch of one cell cannot be normalized: BatchNorm divides by its variance over the batch
    check_int("batch_size", batch_size, 2, " because BatchNorm needs at least 2 cells per minibatch in training")
    check_int("early_stopping_patience", early_stopping_patience, 1, " (epochs without improvement before stopping)")
    # lr = 0 would "train" without moving; torch accepts eps = 0 and weight_decay = 0
    for key, low_open in (("lr", True), ("eps", False), ("weight_decay", False)):
        if key in plan:
            hint = f" model.train() takes it as plan_kwargs={{'{key}': ...}}."
            check_number(key, plan[key], 0.0, low_open=low_open, hint=hint)
    if plan.get("n_epochs_kl_warmup") is not None:  # None (or 0): no warm-up
        # a negative value would make the KL weight negative
        check_int("n_epochs_kl_warmup", plan["n_epochs_kl_warmup"], 0, " (0 or None: no warm-up)")
    if "early_stopping_min_delta" in plan:
        check_number("early_stopping_min_delta", plan["early_stopping_min_delta"], 0.0)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists some twenty device types
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' (or 'cuda:0', ...) or 'mps', got {device!r}.") from None
    # checked here: torch would only fail later, when the model is moved, and with its own words
    if (resolved.type == "cuda" and not torch.cuda.is_available()) or (resolved.type == "mps" and not _mps_available()):
        raise ValueError(f"device={device!r}, but this machine's PyTorch cannot use it. Use device='auto' or 'cpu'.")
    return resolved


def split_indices(n_obs: int, train_size: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """A random train/validation split of ``range(n_obs)`` drawn from torch's (seeded) generator."""
    check_number("train_size", train_size, 0.0, 1.0, low_open=True, hint=" It is the share of cells used for training.")
    perm = torch.randperm(n_obs).numpy()
    n_train = int(math.ceil(train_size * n_obs))
    if n_train < 2:
        raise ValueError(f"{n_obs} cells with train_size={train_size} leave fewer than 2 training cells.")
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def kl_weight_at(epoch: int, n_epochs_kl_warmup: int | None) -> float:
    """Linear warm-up: 0 at epoch 0, 1 from epoch ``n_epochs_kl_warmup`` on."""
    if not n_epochs_kl_warmup:
        return 1.0
    return min(1.0, epoch / n_epochs_kl_warmup)


def _epoch_sums(module: BaseModule, data: TensorData, indices: np.ndarray, batch_size: int,
                kl_weight: float, n_obs: int, optimizer: torch.optim.Optimizer | None, epoch: int) -> dict:
    sums: dict[str, float] = defaultdict(float)
    for step, tensors in enumerate(data.batches(indices, batch_size, shuffle=optimizer is not None)):
        _, _, out = module(tensors, kl_weight=kl_weight, n_obs=n_obs)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"The loss became {out.loss.item()} at epoch {epoch}, step {step}. Usual causes: input that "
                "is not raw counts, or a learning rate that is too high for this model; try "
                "plan_kwargs={'lr': <smaller>}."
            )
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        n = out.reconstruction_loss.shape[0]
        sums["loss"] += out.loss.item() * n
        sums["reconstruction_loss"] += out.reconstruction_loss.sum().item()
        sums["kl_local"] += out.kl_local.sum().item()
        sums["kl_global"] = out.kl_global.item()
        sums["n"] += n
    return sums


def train_module(
    module: BaseModule,
    data: TensorData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    max_epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    n_epochs_kl_warmup: int | None = 400,
    early_stopping: bool = False,
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    progress_bar: bool = True,
    check_val_every_n_epoch: int | None = 1,
) -> dict[str, list[float]]:
    """Train ``module`` in place on ``data`` and return the per-epoch history.

    Defaults are scvi-tools': Adam(lr 1e-3, eps 0.01, weight_decay 1e-6), batch size 128,
    KL warm-up over 400 epochs, early stopping on ``elbo_validation`` with patience 45.

    ``check_val_every_n_epoch``: evaluate the validation cells every n-th epoch and at the last one
    (the other epochs' validation entries are NaN), or never with ``None``. The default 1 evaluates
    every epoch, which the book's validation curves use; scvi-tools skips the pass unless early
    stopping is on. Early stopping needs it every epoch, so it overrides the argument.
    """
    check_train_arguments(
        max_epochs, batch_size, early_stopping_patience, lr=lr, eps=eps, weight_decay=weight_decay,
        n_epochs_kl_warmup=n_epochs_kl_warmup, early_stopping_min_delta=early_stopping_min_delta,
    )
    if check_val_every_n_epoch is not None:
        check_int("check_val_every_n_epoch", check_val_every_n_epoch, 1, " (or None: no validation pass)")
    if early_stopping and len(val_idx):
        check_val_every_n_epoch = 1
    # fused: one kernel updates every parameter (on CPU too), instead of a Python loop over tensors
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, eps=eps, weight_decay=weight_decay, fused=True)
    n_obs = len(train_idx)
    history: dict[str, list[float]] = defaultdict(list)
    best, since_best = float("inf"), 0
    bar = tqdm(range(max_epochs), desc="Training", disable=not progress_bar, unit="epoch")
    # weights and BatchNorm statistics as they were after the last finite epoch: a NaN can reach
    # them one step before the loss shows it, so the whole state is restored on failure. The copy
    # is allocated once and refreshed in place at the start of every epoch. (The tensors of
    # ``state`` are the module's own: the optimizer and BatchNorm update them in place.)
    state = module.state_dict()
    last_good = {k: v.detach().clone() for k, v in state.items()}
    validate = len(val_idx) > 0 and check_val_every_n_epoch is not None
    for epoch in bar:
        kl_weight = kl_weight_at(epoch, n_epochs_kl_warmup)
        if epoch:
            for k, v in state.items():
                last_good[k].copy_(v)
        try:
            module.train()
            splits = {"train": _epoch_sums(module, data, train_idx, batch_size, kl_weight, n_obs, optimizer, epoch)}
            if validate and ((epoch + 1) % check_val_every_n_epoch == 0 or epoch == max_epochs - 1):
                module.eval()
                with torch.no_grad():
                    splits["validation"] = _epoch_sums(module, data, val_idx, batch_size, kl_weight, n_obs, None, epoch)
            elif validate:
                splits["validation"] = {"n": 1, **dict.fromkeys(("loss", "reconstruction_loss", "kl_local", "kl_global"), math.nan)}
        except FloatingPointError as err:
            module.load_state_dict(last_good)
            module.eval()
            raise FloatingPointError(f"{err} The model was restored to its state at the start of epoch {epoch}.") from None
        for split, s in splits.items():
            n = s["n"]
            rec, kl_l, kl_g = s["reconstruction_loss"] / n, s["kl_local"] / n, s["kl_global"]
            history[f"elbo_{split}"].append(rec + kl_l + kl_g / n_obs)  # negative ELBO per cell
            history[f"reconstruction_loss_{split}"].append(rec)
            history[f"kl_local_{split}"].append(kl_l)
            history[f"kl_global_{split}"].append(kl_g)
        history["train_loss_epoch"].append(splits["train"]["loss"] / splits["train"]["n"])
        history["kl_weight"].append(kl_weight)
        bar.set_postfix(train_loss=f"{history['train_loss_epoch'][-1]:.4g}")
        if early_stopping:
            monitor = history["elbo_validation" if len(val_idx) else "elbo_train"][-1]
            if monitor < best - early_stopping_min_delta:
                best, since_best = monitor, 0
            else:
                since_best += 1
                if since_best >= early_stopping_patience:
                    bar.close()
                    if progress_bar:
                        print(f"Early stopping at epoch {epoch + 1}: no improvement in {early_stopping_patience} epochs.")
                    break
    module.eval()
    return dict(history)
