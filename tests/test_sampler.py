"""Tests of the SAPTS overlap sampler (apts_jax.data.sampler)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from apts_jax.data import OverlapSampler, plain_minibatches

CONFIGS = [
    # n, b, N, rho, sigma, drop_last
    (1000, 100, 4, 0.05, 0.1, True),
    (1000, 100, 4, 0.05, 0.1, False),
    (997, 60, 3, 0.3, 0.25, True),
    (997, 60, 3, 0.3, 0.25, False),
    (500, 64, 1, 0.05, 0.5, False),
    (250, 40, 8, 0.0, 0.0, False),
    (101, 100, 2, 0.6, 0.9, False),  # rho >= 0.5: minibatch k and k+2 may overlap too
]


def expected_sizes(n, b, N, rho, sigma):
    m = b // N
    c = math.floor(round(sigma * m, 9)) if N > 1 else 0
    p = m - c
    u = c + N * p
    o = math.floor(round(rho * u, 9))
    return m, c, p, u, o, u - o


def test_sizes_hand_computed():
    s = OverlapSampler(1000, 100, 4, overlap=0.05, subdomain_overlap=0.1)
    # m = 25, c = floor(2.5) = 2, p = 23, u = 2 + 4 * 23 = 94, o = floor(4.7) = 4, f = 90
    assert (s.microbatch_size, s.shared_size, s.private_size) == (25, 2, 23)
    assert (s.minibatch_size, s.overlap_size, s.stride) == (94, 4, 90)
    assert s.batches_per_epoch == (1000 - 4) // 90 == 11 and s.unused_per_epoch == 6
    e = s.epoch(0)
    assert e.minibatches.shape == (11, 94) and e.microbatches.shape == (11, 4, 25)
    assert e.minibatches.dtype == np.int32 and e.microbatches.dtype == np.int32
    padded = OverlapSampler(1000, 100, 4, overlap=0.05, subdomain_overlap=0.1, drop_last=False)
    assert padded.batches_per_epoch == 12 and padded.unused_per_epoch == 0


def test_rounding_is_exact_decimal():
    # 0.29 * 100 == 28.999999999999996 in floating point; the sampler rounds the decimal 29.
    s = OverlapSampler(1000, 100, 1, overlap=0.29)
    assert s.overlap_size == 29
    s = OverlapSampler(1000, 200, 2, overlap=0.0, subdomain_overlap=0.29)
    assert s.shared_size == 29
    s = OverlapSampler(1000, 100, 1, overlap=0.999)
    assert s.overlap_size == 99 and s.stride == 1


@pytest.mark.parametrize("n, b, N, rho, sigma, drop_last", CONFIGS)
def test_structure_and_exact_overlaps(n, b, N, rho, sigma, drop_last):
    s = OverlapSampler(n, b, N, overlap=rho, subdomain_overlap=sigma, seed=3,
                       drop_last=drop_last)
    m, c, p, u, o, f = expected_sizes(n, b, N, rho, sigma)
    assert (s.microbatch_size, s.shared_size, s.private_size) == (m, c, p)
    assert (s.minibatch_size, s.overlap_size, s.stride) == (u, o, f)
    e = s.epoch(5)
    K = s.batches_per_epoch
    pi = e.permutation
    assert sorted(pi.tolist()) == list(range(n))
    assert e.minibatches.shape == (K, u) and e.microbatches.shape == (K, N, m)
    assert e.minibatch_mask.shape == (K, u) and e.microbatch_mask.shape == (K, N, m)
    for k in range(K):
        mb, mask = e.minibatches[k], e.minibatch_mask[k]
        assert len(set(mb.tolist())) == u  # distinct samples within a minibatch
        # window definition, with wrap-around filler only in the padded last minibatch
        pos = k * f + np.arange(u)
        np.testing.assert_array_equal(mb, pi[pos % n])
        np.testing.assert_array_equal(mask, pos < n)
        if k + 1 < K:  # consecutive minibatches share exactly o samples: tail of k = head of k+1
            np.testing.assert_array_equal(mb[f:], e.minibatches[k + 1][:o])
            valid_next = set(e.minibatches[k + 1][e.minibatch_mask[k + 1]].tolist())
            assert len(set(mb.tolist()) & valid_next) == o
        # microbatches: all contain the same shared part S (the first c entries), the private
        # parts partition the rest of the minibatch
        micro = e.microbatches[k]
        S = set(mb[:c].tolist())
        for i in range(N):
            assert len(set(micro[i].tolist())) == m
            np.testing.assert_array_equal(micro[i][:c], mb[:c])
            np.testing.assert_array_equal(micro[i][c:], mb[c + i * p: c + (i + 1) * p])
            np.testing.assert_array_equal(e.microbatch_mask[k, i][c:],
                                          mask[c + i * p: c + (i + 1) * p])
            for j in range(i + 1, N):
                assert set(micro[i].tolist()) & set(micro[j].tolist()) == S
        assert set(micro.reshape(-1).tolist()) == set(mb.tolist())
        counts = Counter(micro.reshape(-1).tolist())
        assert all(counts[x] == (N if x in S else 1) for x in mb.tolist())


@pytest.mark.parametrize("n, b, N, rho, sigma, drop_last", CONFIGS)
def test_every_sample_once_outside_overlaps(n, b, N, rho, sigma, drop_last):
    s = OverlapSampler(n, b, N, overlap=rho, subdomain_overlap=sigma, seed=11,
                       drop_last=drop_last)
    e = s.epoch(0)
    o, K, f = s.overlap_size, s.batches_per_epoch, s.stride
    # "fresh" part of each minibatch: everything for k = 0, the entries after the overlap with the
    # previous minibatch for k >= 1; valid (non-filler) slots only
    fresh = [e.minibatches[0][e.minibatch_mask[0]]]
    for k in range(1, K):
        fresh.append(e.minibatches[k][o:][e.minibatch_mask[k][o:]])
    fresh = np.concatenate(fresh)
    assert len(fresh) == len(set(fresh.tolist()))  # exactly once
    covered = n if not drop_last else K * f + o
    assert sorted(fresh.tolist()) == sorted(e.permutation[:covered].tolist())
    assert n - covered == s.unused_per_epoch < f
    if not drop_last:
        assert sorted(fresh.tolist()) == list(range(n))  # padding mode: every sample, every epoch
    # occurrence counts over valid slots: overlap samples twice, all others once (for rho < 0.5)
    if 2 * o <= s.minibatch_size:
        counts = Counter(e.minibatches[e.minibatch_mask].tolist())
        shared = set()
        for k in range(K - 1):
            shared |= set(e.minibatches[k][f:].tolist())
        assert all(v == (2 if x in shared else 1) for x, v in counts.items())
        assert len(shared) == o * (K - 1)


def test_padding_details():
    s = OverlapSampler(105, 20, 2, overlap=0.1, subdomain_overlap=0.0, drop_last=False, seed=1)
    # u = 20, o = 2, f = 18, full windows = (105 - 2) // 18 = 5 -> covers 92, rest 13 -> K = 6
    assert s.batches_per_epoch == 6
    e = s.epoch(0)
    assert e.minibatch_mask[:5].all()
    last_valid = 105 - 5 * 18
    assert e.minibatch_mask[5].sum() == last_valid == 15
    np.testing.assert_array_equal(e.minibatches[5][last_valid:], e.permutation[: 20 - last_valid])
    dropped = OverlapSampler(105, 20, 2, overlap=0.1, subdomain_overlap=0.0, seed=1)
    assert dropped.batches_per_epoch == 5 and dropped.unused_per_epoch == 13
    assert dropped.epoch(0).minibatch_mask.all()
    # exact fit: nothing to pad
    exact = OverlapSampler(92, 20, 2, overlap=0.1, subdomain_overlap=0.0, drop_last=False)
    assert exact.batches_per_epoch == 5 and exact.epoch(0).minibatch_mask.all()


def test_determinism_and_seeds():
    kw = dict(overlap=0.05, subdomain_overlap=0.1)
    a = OverlapSampler(600, 64, 4, seed=7, **kw)
    b = OverlapSampler(600, 64, 4, seed=7, **kw)
    for epoch in (0, 3):
        ea, eb = a.epoch(epoch), b.epoch(epoch)
        for x, y in zip(ea, eb, strict=True):
            np.testing.assert_array_equal(x, y)
    # an epoch can be regenerated on its own, in any order
    np.testing.assert_array_equal(a.epoch(3).minibatches, b.epoch(3).minibatches)
    np.testing.assert_array_equal(a.epoch(0).microbatches,
                                  next(b.epochs()).microbatches)
    c = OverlapSampler(600, 64, 4, seed=8, **kw)
    assert not np.array_equal(a.epoch(0).minibatches, c.epoch(0).minibatches)
    assert not np.array_equal(a.epoch(0).minibatches, a.epoch(1).minibatches)
    # shapes are the same every epoch (no recompilation of a jitted step)
    assert {a.epoch(e).microbatches.shape for e in range(3)} == {(a.batches_per_epoch, 4, 16)}


def test_plain_minibatches():
    pb = plain_minibatches(103, 10, seed=2, epoch=1)
    assert pb.indices.shape == (10, 10) and pb.mask.all()
    flat = pb.indices.reshape(-1)
    assert len(set(flat.tolist())) == 100  # disjoint
    same_perm = OverlapSampler(103, 10, seed=2, overlap=0.0).permutation(1)
    np.testing.assert_array_equal(flat, same_perm[:100])
    padded = plain_minibatches(103, 10, seed=2, epoch=1, drop_last=False)
    assert padded.indices.shape == (11, 10) and padded.mask.sum() == 103
    assert sorted(padded.indices[padded.mask].tolist()) == list(range(103))
    assert not np.array_equal(plain_minibatches(103, 10, seed=3).indices,
                              plain_minibatches(103, 10, seed=2).indices)


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        ((100, 10, 3), {}, "batch_size \\(10\\) is not divisible by num_subdomains \\(3\\)"),
        ((100, 10, 2), {"overlap": 1.0}, "overlap must be in \\[0, 1\\), got 1.0"),
        ((100, 10, 2), {"overlap": -0.1}, "overlap must be in \\[0, 1\\)"),
        ((100, 10, 2), {"overlap": float("nan")}, "overlap must be in \\[0, 1\\)"),
        ((100, 10, 2), {"subdomain_overlap": 1.5}, "subdomain_overlap must be in \\[0, 1\\)"),
        ((100, 10, 2), {"overlap": "0.1"}, "overlap must be a number"),
        ((100, 10, 2), {"overlap": True}, "overlap must be a number"),
        ((50, 64, 2), {}, "batch larger than the data set.*63 distinct.*num_samples=50"),
        ((100, 0, 1), {}, "batch_size must be >= 1"),
        ((100, 10, 0), {}, "num_subdomains must be >= 1"),
        ((100, 10.0, 1), {}, "batch_size must be an int"),
        ((0, 10, 1), {}, "num_samples must be >= 1"),
        ((100, 10, 1), {"seed": -1}, "seed must be >= 0"),
    ],
)
def test_validation(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OverlapSampler(*args, **kwargs)


def test_validation_misc():
    with pytest.raises(ValueError, match="batch larger than the data set"):
        plain_minibatches(9, 10)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        OverlapSampler(100, 10).epoch(-1)
    # the shared part shrinks the distinct minibatch: u = 64 - 3 * 4 = 52 <= 60 is accepted
    s = OverlapSampler(60, 64, 4, overlap=0.0, subdomain_overlap=0.25)
    assert s.minibatch_size == 52 and s.batches_per_epoch == 1
