"""AutoZI's generative + likelihood before and after issue 16, side by side in one process.

"before": the slab's logit through logaddexp / logsigmoid, a validated Beta draw, and the NB and
ZINB terms in two passes (``nb_log_prob_fast`` and ``zinb_log_prob_fast``); "after": what
``mini_scvi/model/autozi.py`` does now (one softplus, ``validate_args=False``, one pass of
``nb_and_zinb_log_prob_fast``). Forward + backward on a real minibatch of 128 cells, interleaved
(before, after, before, ...), medians. Values agree to float rounding (checked here).

Run: ``.venv/bin/python benchmarks/autozi_step_ab.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sizes  # noqa: E402

import mini_scvi  # noqa: E402
from mini_scvi.distributions import nb_log_prob_fast, zinb_log_prob_fast  # noqa: E402
from mini_scvi.model import AUTOZI  # noqa: E402


def before(module, h, x, px_rate, px_r, nonzero):
    tau = module.minimal_dropout
    log_pi = torch.logaddexp(torch.full_like(h, math.log(tau)), math.log1p(-tau) + F.logsigmoid(h))
    zi = log_pi - (math.log1p(-tau) + F.logsigmoid(-h))
    ab = module.get_alphas_betas()
    delta = torch.distributions.Beta(ab["alpha_posterior"], ab["beta_posterior"]).rsample()
    delta = delta.unsqueeze(0).expand(x.shape[0], -1).clamp(1e-7, 1 - 1e-7)
    log_nb = torch.log(delta) + nb_log_prob_fast(x, px_rate, px_r, nonzero)
    log_zinb = torch.log1p(-delta) + zinb_log_prob_fast(x, px_rate, px_r, zi, nonzero)
    return torch.logaddexp(log_nb, log_zinb).sum(-1)


def after(module, h, x, px_rate, px_r, nonzero):
    tau = module.minimal_dropout
    zi = math.log(tau / (1 - tau)) + F.softplus(h - math.log(tau))
    ab = module.get_alphas_betas()
    delta = torch.distributions.Beta(ab["alpha_posterior"], ab["beta_posterior"], validate_args=False).rsample()
    g = {"px_rate": px_rate, "px_r": px_r, "px_dropout": zi, "delta": delta.unsqueeze(0).expand(x.shape[0], -1)}
    return module.log_likelihood(x, g, include_constant=False, nonzero=nonzero)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in ("pbmc700", "pbmc3k", "sim6000"):
        adata = sizes.load(size)
        mini_scvi.settings.seed = 0
        AUTOZI.setup_anndata(adata, layer="counts")
        model = AUTOZI(adata)
        module, data = model.module, model._data()
        t = next(data.batches(np.arange(data.n_obs), 128, shuffle=True))
        x, nz = t["X"], t["X_nonzero"]
        with torch.no_grad():
            inf = module.inference(**module._get_inference_input(t))
            px_scale, h, _ = module.decoder(inf["z"], t["batch"])
        leaves = [h.clone().requires_grad_(), (torch.exp(inf["library"]) * px_scale).requires_grad_(),
                  torch.exp(module.px_r.detach()).requires_grad_()]
        # same delta draw for the value check
        torch.manual_seed(1)
        v0 = before(module, *leaves[:1], x, *leaves[1:], nz)
        torch.manual_seed(1)
        v1 = after(module, *leaves[:1], x, *leaves[1:], nz)
        times = {"before": [], "after": []}
        for _ in range(args.reps):
            for name, fn in (("before", before), ("after", after)):
                s = time.perf_counter()
                fn(module, leaves[0], x, leaves[1], leaves[2], nz).sum().backward()
                times[name].append(time.perf_counter() - s)
                for leaf in leaves:
                    leaf.grad = None
        b, a = (1e3 * float(np.median(times[k])) for k in ("before", "after"))
        print(f"{size:8s} AutoZI generative tail + likelihood, fwd+bwd: before {b:.2f} ms, after {a:.2f} ms "
              f"({b / a:.2f}x); max |value change| {float((v0 - v1).detach().abs().max()):.2e} of {float(v0.detach().abs().mean()):.0f}")


if __name__ == "__main__":
    main()
