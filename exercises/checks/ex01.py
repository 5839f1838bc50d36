"""Checks for exercises/ex01_counts.ipynb (chapter 1: single-cell RNA-seq counts).

The functions work on SciPy sparse count matrices. The checks feed them matrices that hold some
zeros *explicitly* (a stored entry whose value is 0, which sparse formats allow and real files
contain) and matrices that refuse to be turned into dense arrays, so a function that counts stored
entries or calls ``.toarray()`` fails with a hint. References are NumPy on the dense copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from ._common import _SEED, _call, _check_array, _check_pair, _compare_np, _deterministic, _fail, _pass, add_questions

__all__ = ["check_sparsity", "check_library_size_and_genes", "check_gene_mean_var", "check_poisson_zero_fraction",
           "check_nb_theta_moments"]

add_questions({
    "ex01-jensen": (
        "abcd",
        "546dd0d33764e46e9e3d44ba0d3b084684e233ee1fc8994b0c948eb5183a2284",
        "draw exp(-s mu) as a function of the size factor s: is it straight, or curved, and which way? "
        "Then compare the average of the curve over cells with the curve at the average size factor.",
    ),
})


class _Densified(Exception):
    pass


class _SparseOnly(sp.csr_matrix):
    """A CSR matrix that refuses to become dense: the data sets of chapter 1 would not fit."""

    def toarray(self, *args, **kwargs):
        raise _Densified()

    def todense(self, *args, **kwargs):
        raise _Densified()


def _sparse_counts(rs: np.random.Generator, n_cells: int, n_genes: int, depth: float = 1.0,
                   explicit_zeros: bool = True, dtype=np.float32) -> sp.csr_matrix:
    """Overdispersed counts with some all-zero genes and, optionally, stored (explicit) zeros."""
    rate = rs.gamma(0.3, 2.0, size=(n_cells, n_genes)) * rs.gamma(2.0, 0.5, size=(n_cells, 1)) * depth
    rate[:, : max(1, n_genes // 10)] = 0.0  # genes never detected
    counts = rs.poisson(rate).astype(dtype)
    counts[:, -1] += 1  # every cell has at least one count
    x = sp.csr_matrix(counts)
    if explicit_zeros:  # store zeros explicitly: X.nnz counts them, X != 0 does not
        extra = rs.choice(n_cells * n_genes, size=max(1, n_cells * n_genes // 20), replace=False)
        rows, cols = np.divmod(extra, n_genes)
        free = counts[rows, cols] == 0
        coo = x.tocoo()
        data = np.r_[coo.data, np.zeros(free.sum(), dtype=dtype)]
        x = sp.csr_matrix((data, (np.r_[coo.row, rows[free]], np.r_[coo.col, cols[free]])), shape=x.shape)
    return x


def _sparse_only(x: sp.csr_matrix) -> _SparseOnly:
    out = _SparseOnly(x.shape, dtype=x.dtype)
    out.data, out.indices, out.indptr = x.data.copy(), x.indices.copy(), x.indptr.copy()
    return out


def _call_sparse(fn: Callable, name: str, x: sp.csr_matrix, *args):
    try:
        return _call(fn, name, _sparse_only(x), *args)
    except AssertionError as err:
        if isinstance(err.__cause__, _Densified):
            _fail(name, "the function turned the sparse matrix into a dense array.",
                  "the whole count matrix does not fit in memory as a dense array (chapter 1, 'Sparsity'): "
                  "use the sparse matrix's own sums, comparisons and element-wise operations.")
        raise


def _cases(rs: np.random.Generator) -> list[tuple[str, sp.csr_matrix]]:
    return [
        ("on counts with explicitly stored zeros", _sparse_counts(rs, 60, 40)),
        ("on counts without stored zeros", _sparse_counts(rs, 30, 25, depth=5.0, explicit_zeros=False)),
        ("on integer counts", _sparse_counts(rs, 20, 15, dtype=np.int32)),
        ("for a single cell", _sparse_counts(rs, 1, 30, depth=4.0)),
    ]


@_deterministic
def check_sparsity(sparsity: Callable) -> None:
    """``sparsity(X) -> (fraction_zero, n_never_detected)`` of a sparse count matrix, against NumPy on
    the dense copy."""
    name = "sparsity"
    rs = np.random.default_rng(_SEED)
    for where, x in _cases(rs):
        dense = x.toarray()
        out = _check_pair(name, _call_sparse(sparsity, name, x), "(fraction_zero, n_never_detected)")
        fraction, never = (float(_check_array(name, v, (), w)) for v, w in zip(out, ("fraction_zero", "n_never_detected")))
        if x.nnz != np.count_nonzero(dense) and math.isclose(fraction, 1 - x.nnz / dense.size, abs_tol=1e-12):
            _fail(name, f"wrong fraction of zeros {where}: stored zeros were counted as counts.",
                  "a sparse matrix may store a zero explicitly; X.nnz counts stored entries, not non-zero "
                  "counts.")
        if not math.isclose(fraction, float((dense == 0).mean()), rel_tol=1e-9, abs_tol=1e-12):
            _fail(name, f"wrong fraction of zeros {where}.",
                  "the fraction of zeros is taken over all cells x genes entries of the matrix, not over the "
                  "stored ones (chapter 1, 'Sparsity').")
        if never != int((dense.sum(axis=0) == 0).sum()):
            _fail(name, f"wrong number of never-detected genes {where}.",
                  "a gene is never detected when its count is 0 in every cell: look along the cells (axis 0) "
                  "of each gene, and mind the stored zeros.")
    _pass(name, "matches the fraction of zeros and the never-detected genes on 4 sparse matrices (stored "
          "zeros, integer counts, one cell) without densifying them.")


@_deterministic
def check_library_size_and_genes(library_size_and_genes: Callable) -> None:
    """``library_size_and_genes(X) -> (library_size, genes_detected)``, each (n_cells,), against NumPy."""
    name = "library_size_and_genes"
    rs = np.random.default_rng(_SEED)
    for where, x in _cases(rs):
        dense = x.toarray()
        out = _check_pair(name, _call_sparse(library_size_and_genes, name, x), "(library_size, genes_detected)")
        shape = (x.shape[0],)
        for value, what in zip(out, ("library_size", "genes_detected")):
            if np.shape(value) == (x.shape[0], 1):
                _fail(name, f"{what} has shape {np.shape(value)}, expected {shape}.",
                      "a sum over a sparse matrix's axis comes back as an (n, 1) matrix: flatten it to one "
                      "value per cell.")
        library = _check_array(name, out[0], shape, "library_size")
        genes = _check_array(name, out[1], shape, "genes_detected")
        _compare_np(name, library, dense.sum(axis=1), f"in library_size {where}",
                    "the library size of a cell is its total count over genes (chapter 1, 'Library size and "
                    "genes detected').", rtol=1e-9, atol=1e-9)
        if np.array_equal(genes, np.diff(x.indptr)) and x.nnz != np.count_nonzero(dense):
            _fail(name, f"wrong genes_detected {where}: stored zeros were counted as detections.",
                  "a sparse matrix may store a zero explicitly: count the genes whose count is above 0.")
        _compare_np(name, genes, (dense > 0).sum(axis=1), f"in genes_detected {where}",
                    "a gene is detected in a cell when its count there is above 0; count them per cell.",
                    rtol=0, atol=0)
    _pass(name, "matches the library sizes and genes detected per cell on 4 sparse matrices (stored zeros, "
          "integer counts, one cell) without densifying them.")


@_deterministic
def check_gene_mean_var(gene_mean_var: Callable) -> None:
    """``gene_mean_var(X) -> (mean, var)``, each (n_genes,): the mean and the unbiased variance of each
    gene's counts across cells, against NumPy (``var(ddof=1)``) on the dense copy."""
    name = "gene_mean_var"
    rs = np.random.default_rng(_SEED)
    cases = [c for c in _cases(rs) if c[1].shape[0] > 1]
    cases.append(("for two cells", _sparse_counts(rs, 2, 12, depth=3.0)))
    cases.append(("for deep cells (counts in the thousands)", _sparse_counts(rs, 40, 10, depth=2000.0)))
    for where, x in cases:
        dense = x.toarray().astype(np.float64)
        out = _check_pair(name, _call_sparse(gene_mean_var, name, x), "(mean, var)")
        mean = _check_array(name, out[0], (x.shape[1],), "mean")
        var = _check_array(name, out[1], (x.shape[1],), "var")
        _compare_np(name, mean, dense.mean(axis=0), f"in mean {where}",
                    "one mean per gene: average over the cells (axis 0).", rtol=1e-6, atol=1e-9)
        expected = dense.var(axis=0, ddof=1)
        n = x.shape[0]
        if np.allclose(var, expected * (n - 1) / n, rtol=1e-5, atol=1e-9) and not np.allclose(var, expected):
            _fail(name, f"wrong var {where}: it is (n - 1) / n times the unbiased variance.",
                  "the variance is estimated from the same cells as the mean: divide by n - 1 (chapter 1, "
                  "'How noisy is a count?').")
        _compare_np(name, var, expected, f"in var {where}",
                    "build the variance from per-gene sums the sparse matrix gives directly (of the counts "
                    "and of their squares, which stay sparse), as the unbiased estimate.", rtol=1e-5, atol=1e-8)
    _pass(name, f"matches NumPy's per-gene mean and unbiased variance on {len(cases)} sparse matrices "
          "(stored zeros, two cells, deep cells) without densifying them.")


def _ref_zero_fraction(mean: np.ndarray, library: np.ndarray) -> np.ndarray:
    s = library / library.mean()
    return np.exp(-np.outer(mean, s)).mean(axis=1)


@_deterministic
def check_poisson_zero_fraction(poisson_zero_fraction: Callable) -> None:
    """``poisson_zero_fraction(mean, library_size) -> (n_genes,)``: the expected fraction of zeros of
    each gene when cell n's count is Poisson with mean s_n mu_g, s_n = L_n / mean(L)."""
    name = "poisson_zero_fraction"
    hint = ("each cell's Poisson mean is the gene's mean scaled by the cell's size factor, its library size "
            "relative to the average cell; the expected fraction of zeros averages the zero probability over "
            "the cells (chapter 1, 'Zeros: more than a Poisson model predicts').")
    rs = np.random.default_rng(_SEED)
    mean = np.exp(rs.uniform(-5, 3, size=50))
    cases = [
        ("for library sizes that vary tenfold", mean, rs.lognormal(7.5, 0.6, size=300)),
        ("when every cell has the same library size", mean, np.full(40, 2000.0)),
        ("for two cells", mean[:10], np.array([500.0, 5000.0])),
        ("for integer library sizes", mean[:20], rs.integers(500, 15_000, size=100)),
    ]
    for where, m, lib in cases:
        om, ol = m.copy(), lib.copy()
        out = _check_array(name, _call(poisson_zero_fraction, name, m, lib), m.shape)
        if not (np.array_equal(om, m) and np.array_equal(ol, lib)):
            _fail(name, "the function modified its inputs in place.")
        expected = _ref_zero_fraction(om, ol.astype(np.float64))
        if "vary" in where and np.allclose(out, np.exp(-om), rtol=1e-6):
            _fail(name, f"wrong values {where}: the library sizes made no difference.",
                  "the average of exp(-s mu) over cells is not exp(-mu) when the size factors s vary: "
                  "average the zero probabilities, not the size factors.")
        _compare_np(name, out, expected, where, hint, rtol=1e-9, atol=1e-12)
    _pass(name, f"matches the Poisson zero fraction with library sizes on {len(cases)} inputs (tenfold and equal "
          "library sizes, two cells, integer library sizes).")


def _ref_theta(mean: np.ndarray, var: np.ndarray) -> float:
    return float(np.sum(mean**4) / np.sum((var - mean) * mean**2))


def _theta_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Genes scattered around NB curves, and the moments of NB counts drawn with theta = 1.5."""
    rs = np.random.default_rng(_SEED)
    mean = np.exp(rs.uniform(-3, 4, size=200))
    cases = [(f"for genes scattered around the NB curve of theta = {theta}", mean,
              (mean + mean**2 / theta) * rs.lognormal(0, 0.2, size=mean.size)) for theta in (0.5, 2.0, 20.0)]
    mu = np.exp(rs.uniform(-1, 3, size=80))
    draws = rs.negative_binomial(1.5, 1.5 / (1.5 + mu), size=(4000, mu.size)).astype(np.float64)
    return cases + [("on NB counts drawn with theta = 1.5", draws.mean(0), draws.var(0, ddof=1))]


@_deterministic
def check_nb_theta_moments(nb_theta_moments: Callable) -> None:
    """``nb_theta_moments(mean, var) -> float``: the common theta of the least-squares fit of
    var - mean = mean^2 / theta, against a direct NumPy computation, and on NB draws with a known theta."""
    name = "nb_theta_moments"
    hint = ("the NB variance is the Poisson part plus an overdispersion part proportional to mean^2; fit the "
            "one unknown of that part by least squares over the genes, and remember which of 1/theta and theta "
            "the fit gives (chapter 1, 'How noisy is a count?').")
    cases = _theta_cases()
    for where, m, v in cases:
        om, ov = m.copy(), v.copy()
        out = _call(nb_theta_moments, name, m, v)
        if not (np.array_equal(om, m) and np.array_equal(ov, v)):
            _fail(name, "the function modified its inputs in place.")
        try:
            value = float(out)
        except (TypeError, ValueError):
            _fail(name, f"should return one number, got {type(out).__name__}.", "theta is common to all genes.")
        expected = _ref_theta(om, ov)
        if math.isclose(value, 1 / expected, rel_tol=1e-6):
            _fail(name, f"got 1 / theta {where}.", "theta is the inverse dispersion: the fit gives its inverse.")
        if not math.isclose(value, expected, rel_tol=1e-7):
            _fail(name, f"wrong theta {where}.", hint)
        if "drawn" in where and abs(value - 1.5) > 0.15:
            _fail(name, "theta is not recovered from NB counts drawn with theta = 1.5.", hint)
    _pass(name, f"matches the least-squares moment fit on {len(cases)} sets of genes and recovers theta = 1.5 "
          "from NB counts.")
