"""Memory bank algorithms: greedy k-center coreset and nearest-neighbour distances."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.scorer.memory_bank import (
    features_to_patches,
    greedy_coreset,
    greedy_coreset_of,
    nearest_distances,
    random_projection,
    take_rows,
)


def _clustered(n_clusters: int, per_cluster: int, dim: int, seed: int) -> np.ndarray:
    """Clusters of very different sizes: a random subset misses the small ones, k-center does not."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 10
    sizes = np.maximum(1, (per_cluster * rng.pareto(1.0, n_clusters)).astype(int))
    return np.concatenate([c + rng.standard_normal((s, dim)) * 0.3 for c, s in zip(centres, sizes)]).astype(np.float32)


def _brute_force(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    return np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def _covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance of any point to its nearest chosen point (what k-center minimises)."""
    return float(_brute_force(points, points[chosen]).max())


def test_coreset_is_deterministic_for_a_seed():
    x = _clustered(12, 20, 16, seed=0)
    first = greedy_coreset(x, 30, seed=3)
    assert np.array_equal(first, greedy_coreset(x, 30, seed=3))
    assert np.array_equal(first, greedy_coreset(x.copy(), 30, seed=3))
    high = _clustered(12, 20, 300, seed=1)  # above projection_dim: the projection is seeded too
    assert np.array_equal(greedy_coreset(high, 30, seed=5), greedy_coreset(high, 30, seed=5))


@pytest.mark.parametrize("dim", [8, 64, 300])
def test_coreset_covers_better_than_random_subsets(dim):
    """k-center property: the chosen set's covering radius is no worse than random subsets of the same size
    (at 300 dims the greedy step runs on a 128-d random projection; the radius is measured in full dims)."""
    x = _clustered(25, 30, dim, seed=dim)
    size = 40
    chosen = greedy_coreset(x, size, seed=0)
    greedy = _covering_radius(x, chosen)
    rng = np.random.default_rng(1)
    random_radii = [_covering_radius(x, rng.choice(len(x), size, replace=False)) for _ in range(10)]
    assert greedy <= min(random_radii)
    # Greedy farthest-point is a 2-approximation: every point is within the radius at which it stopped.
    assert greedy > 0


def test_coreset_picks_the_far_outlier_first_after_the_seed_point():
    x = np.zeros((50, 4), np.float32)
    x[:, 0] = np.linspace(0, 1, 50)
    x[17] = (100, 0, 0, 0)
    chosen = greedy_coreset(x, 3, seed=0)
    assert 17 in chosen[:2]


def test_coreset_size_handling():
    x = _clustered(5, 10, 4, seed=2)
    n = len(x)
    for size in (n, n + 1, 10 * n):
        np.testing.assert_array_equal(greedy_coreset(x, size), np.arange(n))
    one = greedy_coreset(x, 1, seed=0)
    assert one.shape == (1,) and 0 <= one[0] < n
    for size in (2, n // 2, n - 1):
        chosen = greedy_coreset(x, size, seed=0)
        assert chosen.shape == (size,) and chosen.dtype.kind == "i"
        assert len(np.unique(chosen)) == size and chosen.min() >= 0 and chosen.max() < n
        assert chosen[0] == greedy_coreset(x, 1, seed=0)[0]  # selection order: smaller sets are prefixes
        np.testing.assert_array_equal(chosen, greedy_coreset(x, n - 1, seed=0)[:size])


def test_coreset_with_duplicate_points_never_repeats_an_index():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    chosen = greedy_coreset(x, 3, seed=0)
    assert sorted({int(i) // 10 for i in chosen}) == [0, 1, 2]


def test_nearest_distances_match_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((300, 24)).astype(np.float32) * 3
    queries = rng.standard_normal((1000, 24)).astype(np.float32) * 3
    expected = _brute_force(queries, bank)
    for chunk in (1000, 333, 64):
        got = nearest_distances(queries, bank, chunk=chunk)
        assert got.shape == (1000,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_nearest_distance_of_a_bank_point_is_zero_not_nan():
    rng = np.random.default_rng(1)
    bank = (rng.standard_normal((50, 16)) * 20 + 100).astype(np.float32)  # large norms: cancellation
    got = nearest_distances(bank[[3, 7]], bank)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    assert got.max() <= 1e-3 * np.linalg.norm(bank[3])
    assert nearest_distances(bank[:0], bank).shape == (0,)


def test_features_to_patches_order_is_image_y_x():
    f = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # [N, D, h, w]
    p = features_to_patches(f)
    assert p.shape == (2 * 4 * 5, 3) and p.flags["C_CONTIGUOUS"]
    n, y, x = 1, 2, 3
    np.testing.assert_array_equal(p[n * 20 + y * 5 + x], f[n, :, y, x])


def test_random_projection_roughly_keeps_distances():
    x = np.random.default_rng(42).standard_normal((40, 512)).astype(np.float32)
    proj = random_projection(512, 256, seed=0)
    assert proj.shape == (256, 512)
    np.testing.assert_array_equal(proj, random_projection(512, 256, seed=0))
    d_before = np.linalg.norm(x[:20] - x[20:], axis=1)
    d_after = np.linalg.norm((x[:20] - x[20:]) @ proj.T, axis=1)
    ratio = d_after / d_before
    assert 0.8 < ratio.min() and ratio.max() < 1.2


def test_a_coreset_over_parts_is_the_coreset_of_their_kept_rows_stacked():
    """A stream refit selects from frames without stacking them: the same rows must come out as from the stack."""
    rng = np.random.default_rng(7)
    parts = [rng.normal(size=(n, 160)).astype(dtype) for n, dtype in ((50, np.float32), (80, np.float16), (60, np.float16))]
    eligible = [None, rng.random(80) < 0.7, np.zeros(60, bool)]
    eligible[2][:5] = True
    stacked = np.concatenate([p if m is None else p[m] for p, m in zip(parts, eligible)]).astype(np.float32)
    chosen = greedy_coreset_of(parts, 40, seed=3, eligible=eligible)
    np.testing.assert_array_equal(chosen, greedy_coreset(stacked, 40, seed=3))
    np.testing.assert_array_equal(take_rows(parts, chosen, eligible), stacked[np.sort(chosen)])
    np.testing.assert_array_equal(greedy_coreset_of(parts, 10_000, eligible=eligible), np.arange(stacked.shape[0]))


def test_nearest_distances_keeps_its_temporary_small_against_a_large_reference():
    """A stream refit scores thousands of patches against tens of thousands: the [chunk, M] product must stay
    bounded (it took 1.8 GB of RSS in bench_daemon --stream before), with the same distances."""
    import tracemalloc

    from edge_inspect.scorer.memory_bank import CHUNK_BYTES

    rng = np.random.default_rng(0)
    queries = rng.normal(size=(5000, 8)).astype(np.float32)
    bank = rng.normal(size=(20000, 8)).astype(np.float32)
    tracemalloc.start()
    try:
        got = nearest_distances(queries, bank)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < CHUNK_BYTES + 16 * 2**20, f"peak {peak / 2**20:.0f} MB"
    small = queries[:50]
    exact = np.sqrt(((small[:, None, :] - bank[None, :, :]) ** 2).sum(-1).min(1))
    np.testing.assert_allclose(got[:50], exact, rtol=1e-4, atol=1e-4)


def test_the_daemon_keeps_numpy_blas_to_one_thread():
    from threadpoolctl import threadpool_info

    from edge_inspect.daemon.daemon import limit_background_blas

    limits = limit_background_blas()
    try:
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    finally:
        limits.restore_original_limits()


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def test_freed_heap_goes_back_to_the_system_after_a_refit():
    """A refit's temporaries are heap chunks between live ones; glibc keeps such pages mapped, so the daemon's
    RSS stayed at a refit's peak. release_free_heap (called after every refit) hands them back."""
    import platform

    from edge_inspect.feedback.service import release_free_heap

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; elsewhere release_free_heap is a no-op")
    temporaries, live = [], []
    for _ in range(2000):  # 96 KB each (under the mmap threshold: on the heap), each followed by a live one
        temporaries.append(np.ones(12_000))
        live.append(np.ones(200))
    del temporaries
    held = _rss_mb()
    assert release_free_heap()
    assert held - _rss_mb() > 100, "freed pages stayed mapped"
    assert len(live) == 2000
