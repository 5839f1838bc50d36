"""The stored models of ``make models`` still load and still score what their records say.

A change to a module (a layer, a parameter name) or to a likelihood changes what a stored model's
weights mean: this test then fails, and ``make models`` must be run again (and the chapters
re-executed). Evaluating a stored model is one pass, so the only float differences between CPUs
are last-bit ones: the tolerance below is far smaller than any real change to the model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

_spec = importlib.util.spec_from_file_location("make_models", MODELS / "make_models.py")
make_models = importlib.util.module_from_spec(_spec)
sys.modules["make_models"] = make_models  # dataclasses look their module up while the file executes
_spec.loader.exec_module(make_models)

# nats per cell: a one-pass evaluation moves by ~1e-5 between kernel sets; a wrong likelihood by far more
ELBO_ATOL = 5e-3
RECORD_KEYS = {"commit", "seed", "epochs", "threads", "wall_time_s", "held_out_elbo", "model", "data"}


@lru_cache(maxsize=None)
def _split(name: str):
    return make_models.split_data(name)


def _record(name: str) -> dict:
    return json.loads((MODELS / name / "record.json").read_text())


def test_every_model_the_chapters_use_is_stored():
    stored = {p.parent.name for p in MODELS.glob("*/model.pt")}
    assert stored == set(make_models.SPECS), (
        f"models/ holds {sorted(stored)}, make_models.py defines {sorted(make_models.SPECS)}: run `make models`"
    )


@pytest.mark.parametrize("name", sorted(make_models.SPECS))
def test_stored_model_loads_and_scores_its_record(name):
    record = _record(name)
    assert RECORD_KEYS <= set(record), f"record of {name} lacks {sorted(RECORD_KEYS - set(record))}"
    spec = make_models.SPECS[name]
    assert record["model"] == spec.model_cls.__name__ and record["data"] == spec.data
    assert record["model_kwargs"] == spec.model and record["setup_anndata"] == spec.setup, (
        f"models/{name} was trained with other settings than make_models.py now gives: run `make models {name}`"
    )
    adata_train, adata_held_out = _split(name)
    model = make_models.load(name, adata_train)
    assert model.is_trained
    assert len(model.history["elbo_train"]) == record["epochs"]
    elbo = make_models.held_out_elbo(model, adata_held_out)
    assert elbo == pytest.approx(record["held_out_elbo"], abs=ELBO_ATOL), (
        f"models/{name}: held-out ELBO {elbo:.4f} with the current code, {record['held_out_elbo']:.4f} in its "
        "record. The module or the likelihood changed since it was trained: run `make models` and re-execute "
        "the chapters."
    )


def test_held_out_elbo_is_reproducible_and_sensitive():
    """The score used above is seeded (same value twice) and moves when the weights move."""
    name = "pbmc3k_scvi_zinb"
    adata_train, adata_held_out = _split(name)
    model = make_models.load(name, adata_train)
    first = make_models.held_out_elbo(model, adata_held_out)
    assert make_models.held_out_elbo(model, adata_held_out) == first
    with __import__("torch").no_grad():
        model.module.px_r += 0.01  # every log theta up by 1%: a small change to the likelihood
    assert abs(make_models.held_out_elbo(model, adata_held_out) - first) > 10 * ELBO_ATOL
