"""Memory bank algorithms as plain numpy functions: coreset selection and nearest-neighbour distances.

Example:
    patches = features.transpose(0, 2, 3, 1).reshape(-1, d)      # [N*h*w, D]
    bank = patches[greedy_coreset(patches, 2048, seed=0)]
    dist = nearest_distances(query_patches, bank)                # [n]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def random_projection(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """Gaussian random projection [dim_out, dim_in] (Johnson-Lindenstrauss): distances roughly kept."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_out, dim_in)) / np.sqrt(dim_out)).astype(np.float32)


def greedy_coreset(patches: np.ndarray, size: int, seed: int = 0, projection_dim: int = 128) -> np.ndarray:
    """Greedy k-center selection (PatchCore): each step adds the patch farthest from the chosen set.

    Distances are computed on a random projection for speed; the result is deterministic for a seed.
    Returns the indices of the chosen patches, in selection order.
    """
    return greedy_coreset_of([patches], size, seed, projection_dim)


def greedy_coreset_of(parts: Sequence[np.ndarray], size: int, seed: int = 0, projection_dim: int = 128,
                      eligible: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """greedy_coreset over the rows of `parts` stacked, without stacking them, and over only the rows
    `eligible` marks (a bool mask per part, None = all): indices into the stacked eligible rows, the same
    selection as greedy_coreset(np.concatenate([part[mask] ...])). A stream refit selects from hundreds of
    frames (float16) beside the scorer; a float32 copy of them all cost ~300 MB at the default store size."""
    masks = [np.ones(p.shape[0], bool) if m is None else np.asarray(m, bool) for p, m in zip(parts, eligible or [None] * len(parts))]
    n = int(sum(int(m.sum()) for m in masks))
    if size < 1:
        raise ValueError(f"coreset size must be at least 1, got {size}")
    if size >= n:
        return np.arange(n)
    dim = parts[0].shape[1]
    projection = random_projection(dim, projection_dim, seed).T if projection_dim and dim > projection_dim else None
    x = np.empty((n, projection.shape[1] if projection is not None else dim), np.float32)
    at = 0
    for part, mask in zip(parts, masks):
        rows = np.asarray(part if mask.all() else part[mask], np.float32)
        x[at : at + rows.shape[0]] = rows @ projection if projection is not None else rows
        at += rows.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    sq = np.einsum("ij,ij->i", x, x)
    min_d = np.full(n, np.inf, dtype=np.float32)
    for i in range(1, size):
        c = x[chosen[i - 1]]
        d = sq - 2.0 * (x @ c) + sq[chosen[i - 1]]
        np.minimum(min_d, d, out=min_d)
        chosen[i] = int(np.argmax(min_d))
    return chosen


def take_rows(parts: Sequence[np.ndarray], rows: np.ndarray, eligible: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Rows of the stacked eligible rows of `parts` (greedy_coreset_of's indices), float32, in ascending
    order of `rows`, without stacking the parts."""
    rows = np.sort(np.asarray(rows, np.int64))
    picked = []
    at = 0
    for part, mask in zip(parts, eligible or [None] * len(parts)):
        positions = np.arange(part.shape[0]) if mask is None else np.flatnonzero(mask)
        inside = rows[(rows >= at) & (rows < at + positions.size)]
        if inside.size:
            picked.append(np.asarray(part[positions[inside - at]], np.float32))
        at += positions.size
    return np.concatenate(picked) if picked else np.zeros((0, parts[0].shape[1]), np.float32)


CHUNK_BYTES = 16 * 2**20  # the largest temporary of nearest_distances: queries x bank rows in float32 (a
# daemon refit runs beside the scorer; with one BLAS thread 16 MB products were as fast as 64 MB ones: 0.88 vs
# 1.01 s for 8192 queries against 28,000 rows of 152)


def nearest_distances(queries: np.ndarray, bank: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean distance of each query row to its nearest bank row (matrix-product form, chunked so the
    [chunk, M] product stays under CHUNK_BYTES: a refit against a large reference must not cost a GB)."""
    bank = np.asarray(bank, dtype=np.float32)
    chunk = max(1, min(chunk, CHUNK_BYTES // (4 * max(1, bank.shape[0]))))
    bank_t = np.ascontiguousarray(bank.T)
    bank_sq = np.einsum("ij,ij->i", bank, bank)
    out = np.empty(queries.shape[0], dtype=np.float32)
    for start in range(0, queries.shape[0], chunk):
        q = np.asarray(queries[start : start + chunk], dtype=np.float32)
        cross = q @ bank_t  # [n, M]; worked on in place: the temporaries cost as much as the product
        cross *= -2.0
        cross += bank_sq[None, :]
        d2 = cross.min(axis=1) + np.einsum("ij,ij->i", q, q)
        out[start : start + chunk] = np.sqrt(np.maximum(d2, 0.0))
        del cross  # before the next product is made, or two of them are alive at once
    return out


# What an unused bank slot holds: its |m|^2 term. Any real |f|^2 - 2 m.f + |m|^2 is far below it, so an
# unused slot is never the nearest; 1e30 leaves FP32 headroom (max 3.4e38) after adding |f|^2.
UNUSED_SQNORM = np.float32(1e30)


def bank_inputs(bank: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The scorer graph's two bank inputs for a bank [M, D] in a graph of `capacity` slots:
    -2 * bank^T [D, capacity] and |m|^2 [1, capacity], slots after M unused (zeros, UNUSED_SQNORM).

    Computed once per bank on the host, so the graph's per-frame head is the same MatMul + Add as
    with the bank as a constant; a new bank is new inputs, never a new graph."""
    bank = np.asarray(bank, np.float32)
    m, d = bank.shape
    if m > capacity:
        raise ValueError(f"a bank of {m} patches does not fit a scorer graph of capacity {capacity}")
    if m == 0:
        raise ValueError("an empty bank: nothing to compare frames with")
    neg2t = np.zeros((d, capacity), np.float32)
    neg2t[:, :m] = -2.0 * bank.T
    sqnorm = np.full((1, capacity), UNUSED_SQNORM, np.float32)
    sqnorm[0, :m] = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32)
    return neg2t, sqnorm


def features_to_patches(features: np.ndarray) -> np.ndarray:
    """[N, D, h, w] -> [N*h*w, D] (row order: image, y, x)."""
    n, d, h, w = features.shape
    return np.ascontiguousarray(features.transpose(0, 2, 3, 1).reshape(n * h * w, d))
