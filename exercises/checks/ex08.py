"""Checks for exercises/ex08_comparing.ipynb (chapter 8: comparing two implementations).

The references are SciPy's (Student's t quantiles, ``scipy.stats.ttest_ind``) and, for the
bootstrap, a percentile bootstrap run with many more resamples than the student's, so that its
Monte Carlo error is negligible. Simulated paired runs with a known true difference let the checks
also test what an interval is for: covering the truth at its stated rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._common import _SEED, _call, _deterministic, _fail, _pass, add_questions

__all__ = ["check_paired_t_interval", "check_bootstrap_interval", "check_welch_interval"]

add_questions({
    "ex08-paired": (
        "abcd",
        "0ee79e64f712e501f531b2a3860e09a4e0b6f605f71cd51bf1c52abe7bd04c98",
        "write each score as (what the run shares with the other implementation) + (what is its own): "
        "which part is left in a per-run difference, and which part is left in each implementation's "
        "spread?",
    ),
})


def simulated_runs(rng: np.random.Generator, n_runs: int, true_difference: float, run_sd: float = 1.0,
                   noise_sd: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Scores of implementations A and B on ``n_runs`` shared runs (data set, seed): each run moves
    both by the same N(0, run_sd^2) amount, each implementation adds N(0, noise_sd^2) of its own,
    and A is ``true_difference`` above B on average."""
    run = rng.normal(0.0, run_sd, n_runs)
    a = run + true_difference + rng.normal(0.0, noise_sd, n_runs)
    b = run + rng.normal(0.0, noise_sd, n_runs)
    return a, b


def _t(level: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, df))


def _paired_variants(a: np.ndarray, b: np.ndarray, level: float) -> dict[str, tuple[float, float, float]]:
    """The right interval and the usual wrong ones, to tell the student which mistake was made."""
    from scipy import stats

    d = a - b
    n, m = len(d), d.mean()
    se, se0 = d.std(ddof=1) / math.sqrt(n), d.std(ddof=0) / math.sqrt(n)
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=level)
    z = float(stats.norm.ppf((1 + level) / 2))
    one_sided = float(stats.t.ppf(level, n - 1))
    return {
        "right": (m, m - _t(level, n - 1) * se, m + _t(level, n - 1) * se),
        "normal": (m, m - z * se, m + z * se),
        "ddof0": (m, m - _t(level, n - 1) * se0, m + _t(level, n - 1) * se0),
        "unpaired": (m, float(welch.low), float(welch.high)),
        "one-sided": (m, m - one_sided * se, m + one_sided * se),
    }


def _triple(name: str, out, what: str) -> tuple[float, ...]:
    if not isinstance(out, (tuple, list)) or len(out) != len(what.split(",")):
        _fail(name, f"should return a tuple {what}.")
    try:
        values = tuple(float(v) for v in out)
    except (TypeError, ValueError):
        _fail(name, f"should return numbers {what}, got {[type(v).__name__ for v in out]}.")
    if not all(math.isfinite(v) for v in values):
        _fail(name, f"returned nan or inf {what}.")
    return values


def _same(got, expected, rel: float = 1e-7) -> bool:
    return all(abs(g - e) <= rel * (1 + abs(e)) for g, e in zip(got, expected))


@_deterministic
def check_paired_t_interval(paired_t_interval: Callable) -> None:
    """``paired_t_interval(a, b, level=0.95) -> (mean_difference, low, high)``: the t interval for the
    mean of the per-run differences a - b, against SciPy's t quantiles, and its coverage on simulated
    runs with a known difference."""
    name = "paired_t_interval"
    hints = {
        "normal": "with a handful of runs the standard error is itself uncertain: the multiplier comes from "
                  "Student's t with n - 1 degrees of freedom, not from the normal distribution.",
        "ddof0": "the spread of the differences is estimated from the same n numbers as their mean: use the "
                 "sample standard deviation with n - 1 degrees of freedom.",
        "unpaired": "this is the interval of two independent samples: pair the runs, and work with one "
                    "difference per run.",
        "one-sided": "a two-sided interval leaves the same share, half of 1 - level, outside on each side.",
    }
    generic = ("the interval is centred on the mean per-run difference and is a t multiple of its standard "
               "error (chapter 8; the statement).")
    rng = np.random.default_rng(_SEED)
    cases = []
    for n, level in [(5, 0.95), (3, 0.95), (10, 0.9), (40, 0.99), (2, 0.95), (8, 0.5)]:
        a, b = simulated_runs(rng, n, 0.3)
        cases.append((f"for {n} runs at level {level}", a, b, level))
    for where, a, b, level in cases:
        oa, ob = a.copy(), b.copy()
        out = _triple(name, _call(paired_t_interval, name, a, b, level=level), "(mean_difference, low, high)")
        if not (np.array_equal(oa, a) and np.array_equal(ob, b)):
            _fail(name, "the function modified its inputs in place.")
        variants = _paired_variants(oa, ob, level)
        if _same(out, variants["right"]):
            continue
        if abs(out[0] + variants["right"][0]) <= 1e-7 * (1 + abs(out[0])):
            _fail(name, f"the difference has the wrong sign {where}.", "the statement asks for a - b.")
        wrong = next((k for k, v in variants.items() if k != "right" and _same(out, v, 1e-6)), None)
        _fail(name, f"wrong interval {where}.", hints.get(wrong, generic))
    # what the interval is for: it covers the true difference in `level` of all experiments
    truth, n_exp, hits = 0.3, 2000, 0
    for _ in range(n_exp):
        a, b = simulated_runs(rng, 4, truth)
        _, low, high = _triple(name, _call(paired_t_interval, name, a, b), "(mean_difference, low, high)")
        hits += low <= truth <= high
    se = math.sqrt(0.95 * 0.05 / n_exp)
    if abs(hits / n_exp - 0.95) > 4 * se:
        _fail(name, f"the 95% interval covers the true difference in {hits / n_exp:.1%} of {n_exp} simulated "
              "experiments with 4 runs each.", generic)
    _pass(name, f"matches the t interval on {len(cases)} sets of paired runs (2 to 40 runs, levels 0.5 to 0.99) "
          f"and covers the true difference at its stated rate in {n_exp} simulated experiments.")


def _ref_bootstrap(d: np.ndarray, level: float, n_boot: int = 400_000) -> tuple[float, float]:
    rng = np.random.default_rng(_SEED + 1)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 50_000):  # in chunks, to keep the index array small
        idx = rng.integers(0, len(d), size=(min(50_000, n_boot - start), len(d)))
        means[start:start + len(idx)] = d[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@_deterministic
def check_bootstrap_interval(bootstrap_interval: Callable) -> None:
    """``bootstrap_interval(a, b, level=0.95, n_boot=10_000, seed=0) -> (low, high)``: the percentile
    bootstrap interval of the mean per-run difference a - b, resampling runs. Checked against a
    bootstrap with 400,000 resamples, within its own Monte Carlo error, on skewed differences (where
    a percentile interval is not symmetric), and for reproducibility from ``seed``."""
    name = "bootstrap_interval"
    generic = ("resample the runs with replacement, as many runs as there are, n_boot times; the interval's "
               "ends are read off the distribution of the resampled mean differences (the statement; "
               "chapter 8).")
    rng = np.random.default_rng(_SEED)
    cases = []
    for n, level in [(12, 0.95), (6, 0.9), (30, 0.95)]:
        b = rng.normal(5.0, 1.0, n)
        a = b + rng.exponential(1.0, n) - 0.5  # skewed per-run differences
        cases.append((f"for {n} runs with skewed differences at level {level}", a, b, level))
    for where, a, b, level in cases:
        oa, ob = a.copy(), b.copy()
        out = _call(bootstrap_interval, name, a, b, level=level, n_boot=20_000, seed=7)
        low, high = _triple(name, out, "(low, high)")
        if not (np.array_equal(oa, a) and np.array_equal(ob, b)):
            _fail(name, "the function modified its inputs in place.")
        again = _triple(name, _call(bootstrap_interval, name, a, b, level=level, n_boot=20_000, seed=7), "(low, high)")
        if again != (low, high):
            _fail(name, "two calls with the same seed give different intervals.",
                  "build the random generator from the seed argument, inside the function, so that a result "
                  "can be reproduced.")
        d = oa - ob
        ref_low, ref_high = _ref_bootstrap(d, level)
        width = ref_high - ref_low
        if high - low < 0.05 * width:
            _fail(name, f"the interval has (almost) no width {where}.",
                  "a resample that is a reordering of the runs always has the same mean: draw with replacement.")
        if low > high:
            _fail(name, f"low is above high {where}.")
        tol = 0.04 * width  # several Monte Carlo standard errors of a quantile from 20,000 resamples
        if abs(low - ref_low) > tol or abs(high - ref_high) > tol:
            mean = d.mean()
            symmetric = abs((high - mean) - (mean - low)) < 0.02 * width
            if high - low > 1.3 * width:
                hint = ("too wide: keep each run's two scores together when resampling (resample runs, not "
                        "a and b separately); the run effect cancels only within a pair.")
            elif symmetric:
                hint = ("your interval is symmetric about the mean, the percentile bootstrap's is not when the "
                        "differences are skewed: take its ends from the resampled means themselves.")
            else:
                hint = generic
            _fail(name, f"wrong interval {where}.", hint)
    _pass(name, f"matches a 400,000-resample percentile bootstrap on {len(cases)} sets of skewed paired runs "
          "(within Monte Carlo error) and is reproducible from its seed.")


@_deterministic
def check_welch_interval(welch_interval: Callable) -> None:
    """``welch_interval(a, b, level=0.95) -> (difference, low, high)``: the Welch t interval for
    mean(a) - mean(b) of two independent samples, against ``scipy.stats.ttest_ind(a, b,
    equal_var=False).confidence_interval``."""
    from scipy import stats

    name = "welch_interval"
    generic = ("two independent samples with their own variances: the standard error of the difference of "
               "the means combines both, and the t multiplier uses the Welch-Satterthwaite degrees of freedom "
               "(the statement).")
    rng = np.random.default_rng(_SEED)
    cases = [
        ("for samples of 5 and 9 with different spreads", rng.normal(1.0, 0.5, 5), rng.normal(0.0, 2.0, 9), 0.95),
        ("for samples of 12 and 4", rng.normal(0.3, 1.0, 12), rng.normal(0.0, 0.3, 4), 0.9),
        ("for paired-looking samples of 6 each", *simulated_runs(rng, 6, 0.3), 0.95),
        ("at level 0.99", rng.normal(0.0, 1.0, 20), rng.normal(0.5, 3.0, 15), 0.99),
    ]
    for where, a, b, level in cases:
        oa, ob = a.copy(), b.copy()
        out = _triple(name, _call(welch_interval, name, a, b, level=level), "(difference, low, high)")
        if not (np.array_equal(oa, a) and np.array_equal(ob, b)):
            _fail(name, "the function modified its inputs in place.")
        res = stats.ttest_ind(oa, ob, equal_var=False)
        ci = res.confidence_interval(confidence_level=level)
        expected = (oa.mean() - ob.mean(), float(ci.low), float(ci.high))
        if _same(out, expected, 1e-6):
            continue
        pooled = stats.ttest_ind(oa, ob, equal_var=True).confidence_interval(confidence_level=level)
        se = math.sqrt(oa.var(ddof=1) / len(oa) + ob.var(ddof=1) / len(ob))
        z = float(stats.norm.ppf((1 + level) / 2))
        if abs(out[0] + expected[0]) <= 1e-7 * (1 + abs(expected[0])):
            hint = "the statement asks for mean(a) - mean(b)."
        elif _same(out, (expected[0], float(pooled.low), float(pooled.high)), 1e-6):
            hint = "this is the pooled (equal-variance) interval: Welch's lets each sample keep its own variance."
        elif _same(out, (expected[0], expected[0] - z * se, expected[0] + z * se), 1e-6):
            hint = "the multiplier comes from Student's t with the Welch-Satterthwaite degrees of freedom, not the normal."
        else:
            hint = generic
        _fail(name, f"wrong interval {where}.", hint)
    _pass(name, f"matches scipy.stats.ttest_ind(equal_var=False) on {len(cases)} pairs of samples (unequal sizes "
          "and spreads, levels 0.9 to 0.99).")
