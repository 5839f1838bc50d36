"""Where one training step of SCVI and AUTOZI spends its time, beside its matrix-product floor (issue 16).

For each data set of ``sizes.py`` (700 x 765, 2,638 x 1,200, 6,000 x 200) and each model (default
architecture: n_hidden 128, n_latent 10, one layer, ZINB, batch size 128, Adam as in training),
a step is run as ``train.py`` runs it, with a clock read between its stages:

  minibatch   the data layer: densify the CSR rows (or gather dense rows), non-zero positions
  inference   encoder: log1p, Linear-BatchNorm-ReLU-Dropout, mean / variance, reparameterized z
  generative  decoder: softmax frequencies, dropout logits, theta (AutoZI: pi_tilde and delta)
  likelihood  the ZINB (AutoZI: NB and ZINB mixture) forward, summed over genes
  kl+loss     the KL terms and the loss assembly
  backward    zero_grad + loss.backward()
  optimizer   Adam (fused) step
  bookkeeping the finite-loss check and the per-epoch sums (``.item()``)

and per epoch, amortized over its steps: the shuffle and CSR row gather, refreshing the NaN-restore
snapshot of the state (``train.py``), and the validation pass a ``train_size=0.9`` run makes.

The floor is the step's matrix products alone: for every Linear layer the forward GEMM and the two
backward GEMMs (input gradient, weight gradient; no input gradient for the first encoder layer, whose
input is data), at the same shapes, timed with nothing else around them. Also timed: the likelihood
forward + backward on its own (the part of ``backward`` it accounts for), and a whole epoch of
``train_module`` (``train_size=1.0``, as the benchmark trains), to check that the stages add up.

Medians over ``--steps`` steps after a warm-up epoch. Run:
``.venv/bin/python benchmarks/step_profile.py [--threads 1] [--steps 60]``.
Results: benchmarks/results/step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sizes  # noqa: E402

import mini_scvi  # noqa: E402
from mini_scvi.model import AUTOZI, SCVI  # noqa: E402
from mini_scvi.train import _epoch_sums, train_module  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("minibatch", "inference", "generative", "likelihood", "kl+loss", "backward", "optimizer", "bookkeeping")
pc = time.perf_counter


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = pc()
        fn()
        times.append(pc() - t)
    return 1e3 * float(np.median(times))


def gemm_floor_ms(module: torch.nn.Module, n_genes: int, batch: int, reps: int) -> tuple[float, list]:
    """Forward + backward GEMMs of every Linear at batch size ``batch``, timed alone (ms per step)."""
    work = []
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        if name == "decoder.px_r_decoder" and getattr(module, "dispersion", None) != "gene-cell":
            continue  # built but not called: theta is a parameter unless dispersion='gene-cell'
        n_out, n_in = layer.weight.shape
        x, g = torch.randn(batch, n_in), torch.randn(batch, n_out)
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        data_input = n_in == n_genes and name.endswith("layers.0.0")  # encoder's first layer: x is data
        work.append((name, x, g, w, b, data_input))

    def run():
        for _, x, g, w, b, data_input in work:
            torch.addmm(b, x, w.t())      # forward
            g.t().mm(x)                   # weight gradient
            if not data_input:
                g.mm(w)                   # input gradient
    flops = sum(2 * x.shape[0] * w.shape[0] * w.shape[1] * (2 if d else 3) for _, x, _, w, _, d in work)
    return median_ms(run, reps), [{"layer": n, "shape": list(w.shape)} for n, _, _, w, _, _ in work], flops


def build(model_name: str, adata):
    mini_scvi.settings.seed = 0
    cls = {"SCVI": SCVI, "AUTOZI": AUTOZI}[model_name]
    cls.setup_anndata(adata, layer="counts")
    model = cls(adata)
    module = model.module
    data = model._data()
    model._on_train_start(data)
    return model, module, data


def profile_steps(module, data, n_steps: int, lr: float) -> dict:
    """Stage times (ms) of ``n_steps`` training steps, after one untimed epoch."""
    n_obs = data.n_obs
    idx = np.arange(n_obs)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, eps=0.01, weight_decay=1e-6, fused=True)
    module.train()
    ll_time = [0.0]
    inner = module.log_likelihood

    def timed_ll(*a, **k):
        t = pc()
        out = inner(*a, **k)
        ll_time[0] += pc() - t
        return out

    module.log_likelihood = timed_ll  # instance attribute: loss() calls it through self
    rec = {s: [] for s in STAGES}
    done, warm = 0, True
    try:
        while done < n_steps:
            it = data.batches(idx, 128, shuffle=True)
            first = True
            while done < n_steps:
                t0 = pc()
                try:
                    tensors = next(it)
                except StopIteration:
                    break
                t1 = pc()
                inf = module.inference(**module._get_inference_input(tensors))
                t2 = pc()
                gen = module.generative(**module._get_generative_input(tensors, inf))
                t3 = pc()
                ll_time[0] = 0.0
                out = module.loss(tensors, inf, gen, kl_weight=0.5, n_obs=n_obs)
                t4 = pc()
                if not torch.isfinite(out.loss):
                    raise FloatingPointError
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                t5 = pc()
                optimizer.step()
                t6 = pc()
                n = out.reconstruction_loss.shape[0]
                sums = [out.loss.item() * n, out.reconstruction_loss.sum().item(), out.kl_local.sum().item(),
                        out.kl_global.item()]
                t7 = pc()
                del sums
                if warm or first:  # the first step of an epoch carries the epoch's row gather: timed apart
                    first = False
                    continue
                for s, v in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, ll_time[0], t4 - t3 - ll_time[0],
                                         t5 - t4, t6 - t5, t7 - t6)):
                    rec[s].append(1e3 * v)
                done += 1
            warm = False
    finally:
        del module.log_likelihood
    return {s: float(np.median(v)) for s, v in rec.items()}


def likelihood_alone_ms(module, data, reps: int) -> dict:
    """Forward and forward + backward of the likelihood on one real minibatch, leaves detached."""
    module.train()
    tensors = next(data.batches(np.arange(data.n_obs), 128, shuffle=True))
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors))
        gen = module.generative(**module._get_generative_input(tensors, inf))
    leaves = {k: (v.detach().clone().requires_grad_() if k in ("px_rate", "px_r", "px_dropout") else v.detach())
              for k, v in gen.items()}

    def fwd():
        with torch.no_grad():
            module.log_likelihood(tensors["X"], leaves, include_constant=False, nonzero=tensors["X_nonzero"])

    def fwd_bwd():
        ll = module.log_likelihood(tensors["X"], leaves, include_constant=False, nonzero=tensors["X_nonzero"])
        ll.sum().backward()
    return {"forward": median_ms(fwd, reps), "forward_backward": median_ms(fwd_bwd, reps)}


def per_epoch_ms(module, data, reps: int) -> dict:
    idx = np.arange(data.n_obs)
    state = module.state_dict()
    snap = {k: v.detach().clone() for k, v in state.items()}

    def refresh():
        for k, v in state.items():
            snap[k].copy_(v)

    def clone():  # what train.py did before: a fresh clone of the whole state every epoch
        {k: v.detach().clone() for k, v in module.state_dict().items()}

    def shuffle_gather():
        it = data.batches(idx, 128, shuffle=True)
        next(it)  # the generator's first step does the per-epoch row gather (and the first densify)

    val_idx = np.sort(np.random.default_rng(0).permutation(data.n_obs)[: data.n_obs // 10])

    def validation():
        module.eval()
        with torch.no_grad():
            _epoch_sums(module, data, val_idx, 128, 1.0, len(idx) - len(val_idx), None, 0)
        module.train()
    return {"shuffle_and_row_gather": median_ms(shuffle_gather, reps),
            "snapshot_refresh": median_ms(refresh, reps), "snapshot_clone_before": median_ms(clone, reps),
            "validation_pass_10pct": median_ms(validation, max(3, reps // 5))}


def epoch_ms(module, data, epochs: int, lr: float) -> float:
    idx = np.arange(data.n_obs)
    train_module(module, data, idx, idx[:0], max_epochs=1, lr=lr, progress_bar=False)  # warm-up
    t = pc()
    train_module(module, data, idx, idx[:0], max_epochs=epochs, lr=lr, progress_bar=False)
    return 1e3 * (pc() - t) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of train_module timed whole")
    parser.add_argument("--sizes", nargs="+", default=list(sizes.SIZES))
    parser.add_argument("--models", nargs="+", default=["SCVI", "AUTOZI"])
    parser.add_argument("--out", default=str(RESULTS / "step_profile"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        adata = sizes.load(size)
        for model_name in args.models:
            lr = 1e-2 if model_name == "AUTOZI" else 1e-3
            model, module, data = build(model_name, adata.copy())
            steps_per_epoch = -(-data.n_obs // 128)
            stages = profile_steps(module, data, args.steps, lr)
            floor, layers, flops = gemm_floor_ms(module, data.n_vars, 128, 4 * args.steps)
            ll = likelihood_alone_ms(module, data, args.steps)
            epoch = per_epoch_ms(module, data, 10)
            whole = epoch_ms(module, data, args.epochs, lr)
            step = sum(stages.values())
            amortized = {k: v / steps_per_epoch for k, v in epoch.items()}
            row = {"size": size, "model": model_name, "n_cells": data.n_obs, "n_genes": data.n_vars,
                   "steps_per_epoch": steps_per_epoch, "stages_ms": stages, "step_ms": step,
                   "per_epoch_ms": epoch, "per_epoch_per_step_ms": amortized,
                   "likelihood_alone_ms": ll, "floor_ms": floor, "floor_gflop": flops / 1e9,
                   "floor_layers": layers, "step_over_floor": step / floor,
                   "train_module_epoch_ms": whole, "train_module_step_ms": whole / steps_per_epoch}
            rows.append(row)
            print(f"{size:8s} {model_name:6s} step {step:6.2f} ms (train_module {whole / steps_per_epoch:6.2f}) "
                  f"floor {floor:5.2f} ms ({step / floor:4.1f}x)  " +
                  " ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)
    result = {"settings": {"threads": args.threads, "steps": args.steps, "batch_size": 128, "epochs": args.epochs},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]},
              "mini_scvi": mini_scvi.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    head = ("| data | model | " + " | ".join(STAGES) + " | step | train_module step | floor (GEMMs) | step / floor | "
            "likelihood fwd+bwd alone | validation pass / step | snapshot / step |")
    lines = [f"Milliseconds per training step (batch 128, medians), {args.threads} torch thread(s), "
             f"load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores.", "",
             head, "|" + "---|" * (len(STAGES) + 9)]
    for r in rows:
        s = r["stages_ms"]
        lines.append(f"| {r['size']} ({r['n_cells']} x {r['n_genes']}) | {r['model']} | " +
                     " | ".join(f"{s[k]:.2f}" for k in STAGES) +
                     f" | **{r['step_ms']:.2f}** | {r['train_module_step_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['step_over_floor']:.1f}x | {r['likelihood_alone_ms']['forward_backward']:.2f} | "
                     f"{r['per_epoch_per_step_ms']['validation_pass_10pct']:.2f} | "
                     f"{r['per_epoch_per_step_ms']['snapshot_refresh']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
