"""Deterministic minibatch samplers with overlap, for (S)APTS data-parallel training.

Two levels of overlap, both with exact integer sizes:

* consecutive minibatches share a fraction ``overlap`` of their samples (so that a secant pair or a
  trust-region ratio can be formed on common data, as in multi-batch L-BFGS / L-SR1);
* each minibatch is split into ``N = num_subdomains`` microbatches (one per subdomain / device) of
  equal size, all of which contain a common part ``S`` of ``subdomain_overlap`` times the
  microbatch size.

Definitions (``n`` samples, ``b = batch_size``, ``N = num_subdomains``, ``rho = overlap``,
``sigma = subdomain_overlap``)::

    m = b / N                 microbatch size (slots per subdomain); b % N == 0 is required
    c = floor(sigma * m)      shared part S, common to all N microbatches (c = 0 when N = 1)
    p = m - c                 private part P_i of each microbatch
    u = c + N * p             distinct samples per minibatch  (= b - (N - 1) * c <= b)
    o = floor(rho * u)        samples shared by consecutive minibatches
    f = u - o                 stride: fresh samples per minibatch (>= 1)

Each epoch ``e`` draws a permutation ``pi`` of ``0..n-1`` from ``numpy.random.default_rng([seed,
e])`` (so any epoch can be regenerated on its own, e.g. after a restart) and cuts it into
overlapping windows::

    pi:  [-------------------------------------------------------------------]
         [      M_0      ]
                    [      M_1      ]
                               [      M_2      ]          M_k = pi[k*f : k*f + u]
         |<--- f --->|<o>|                                 M_k and M_k+1 share o samples

    one minibatch M (u distinct samples) -> N microbatches of m slots:

         M       = [ S | P_0 | P_1 | ... | P_{N-1} ]     |S| = c, |P_i| = p
         micro_i = [ S | P_i ]                           (S first, in every microbatch)

Every sample of the covered part of ``pi`` is in exactly one minibatch, except the ``o`` samples
that two consecutive minibatches share (exactly two); inside a minibatch, every sample is in
exactly one microbatch, except the ``c`` samples of ``S`` (all ``N``). So each covered sample is
used exactly once per epoch outside the overlaps.

The number of minibatches per epoch is ``K = floor((n - o) / f)`` full windows, covering ``pi[:K*f +
o]``. The remaining ``r = n - o - K*f < f`` samples of the permutation:

* ``drop_last=True`` (default): are skipped this epoch (a different random set each epoch);
* ``drop_last=False``: go into one extra minibatch (only if ``r > 0``) ``pi[K*f : n]``, filled up to
  ``u`` entries with ``pi[0], pi[1], ...`` (wrap-around); the filler slots are ``False`` in the
  masks so a step can weight them out. Then every sample is used in every epoch.

All arrays have fixed shapes (``(K, u)`` and ``(K, N, m)``), so a jitted step does not recompile.
Fractions are rounded down in exact decimal arithmetic of the given float (``floor(0.29 * 100) =
29``, not 28). Indices are int32 (int64 if ``n >= 2**31``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np

__all__ = [
    "EpochBatches",
    "OverlapSampler",
    "PlainBatches",
    "plain_minibatches",
]


class EpochBatches(NamedTuple):
    """The index arrays of one epoch.

    Attributes:
      minibatches: ``(K, u)`` sample indices; row ``k`` is ``M_k = [S | P_0 | ... | P_{N-1}]``.
      microbatches: ``(K, N, m)`` sample indices; ``[k, i]`` is ``[S | P_i]`` of minibatch ``k``.
      minibatch_mask: ``(K, u)`` bool, ``False`` only for wrap-around filler (``drop_last=False``).
      microbatch_mask: ``(K, N, m)`` bool, likewise.
      permutation: ``(n,)`` the epoch's permutation ``pi``.
    """

    minibatches: np.ndarray
    microbatches: np.ndarray
    minibatch_mask: np.ndarray
    microbatch_mask: np.ndarray
    permutation: np.ndarray


class PlainBatches(NamedTuple):
    """Non-overlapping minibatches: ``indices`` ``(K, b)`` and ``mask`` ``(K, b)`` (see
    :func:`plain_minibatches`)."""

    indices: np.ndarray
    mask: np.ndarray


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    # repr() gives the shortest decimal that round-trips, so 0.29 is treated as 29/100 exactly.
    return Fraction(repr(float(value)))


class OverlapSampler:
    """The SAPTS overlap sampler; see the module docstring for the exact definitions.

    Args:
      num_samples: ``n``, the size of the training set.
      batch_size: ``b``, slots per minibatch summed over the subdomains (``N * m``).
      num_subdomains: ``N``, the number of microbatches per minibatch; must divide ``b``.
      overlap: ``rho`` in ``[0, 1)``, fraction of a minibatch shared with the next one (default
        0.05).
      subdomain_overlap: ``sigma`` in ``[0, 1)``, fraction of a microbatch that is common to all
        microbatches of the minibatch (default 0.05).
      seed: non-negative int; the epoch ``e`` permutation comes from
        ``numpy.random.default_rng([seed, e])``.
      drop_last: drop (default) or pad the last incomplete minibatch (see module docstring).

    Raises:
      ValueError: non-int sizes, ``b`` not divisible by ``N``, a fraction outside ``[0, 1)``, or a
        minibatch (``u`` distinct samples) larger than the data set.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_subdomains: int = 1,
        *,
        overlap: float = 0.05,
        subdomain_overlap: float = 0.05,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        n = _check_int("num_samples", num_samples, 1)
        b = _check_int("batch_size", batch_size, 1)
        N = _check_int("num_subdomains", num_subdomains, 1)
        rho = _check_fraction("overlap", overlap)
        sigma = _check_fraction("subdomain_overlap", subdomain_overlap)
        self.seed = _check_int("seed", seed, 0)
        if b % N:
            raise ValueError(
                f"batch_size ({b}) is not divisible by num_subdomains ({N}): each of the {N}"
                f" microbatches must hold batch_size / num_subdomains samples"
            )
        m = b // N
        c = math.floor(sigma * m) if N > 1 else 0
        p = m - c
        u = c + N * p
        o = math.floor(rho * u)
        if u > n:
            raise ValueError(
                f"batch larger than the data set: a minibatch holds {u} distinct samples"
                f" (batch_size={b}, num_subdomains={N}, shared part {c}) but num_samples={n}"
            )
        self.num_samples = n
        self.batch_size = b
        self.num_subdomains = N
        self.overlap = float(overlap)
        self.subdomain_overlap = float(subdomain_overlap)
        self.drop_last = bool(drop_last)
        #: ``m``: slots per microbatch.
        self.microbatch_size = m
        #: ``c``: size of the part common to all microbatches of a minibatch.
        self.shared_size = c
        #: ``p``: size of each microbatch's private part.
        self.private_size = p
        #: ``u``: distinct samples per minibatch.
        self.minibatch_size = u
        #: ``o``: samples shared by consecutive minibatches.
        self.overlap_size = o
        #: ``f``: fresh samples per minibatch (window stride).
        self.stride = u - o
        full = (n - o) // self.stride
        rest = n - o - full * self.stride
        #: samples of the permutation not visited in an epoch (0 with ``drop_last=False``).
        self.unused_per_epoch = rest if self.drop_last else 0
        #: ``K``: minibatches per epoch.
        self.batches_per_epoch = full + (1 if (rest > 0 and not self.drop_last) else 0)
        self._index_dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64

    def __repr__(self) -> str:
        return (
            f"OverlapSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"num_subdomains={self.num_subdomains}, overlap={self.overlap}, "
            f"subdomain_overlap={self.subdomain_overlap}, seed={self.seed}, "
            f"drop_last={self.drop_last}; m={self.microbatch_size}, c={self.shared_size}, "
            f"u={self.minibatch_size}, o={self.overlap_size}, K={self.batches_per_epoch})"
        )

    def permutation(self, epoch: int) -> np.ndarray:
        """The permutation ``pi`` of epoch ``epoch`` (from ``default_rng([seed, epoch])``)."""
        epoch = _check_int("epoch", epoch, 0)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_samples).astype(self._index_dtype)

    def epoch(self, epoch: int) -> EpochBatches:
        """The minibatch and microbatch index arrays of epoch ``epoch`` (deterministic)."""
        pi = self.permutation(epoch)
        n, u, f, K = self.num_samples, self.minibatch_size, self.stride, self.batches_per_epoch
        pos = np.arange(K)[:, None] * f + np.arange(u)[None, :]  # (K, u) positions in pi
        mini_mask = pos < n
        minibatches = pi[np.where(mini_mask, pos, pos - n)]  # filler wraps to pi[0], pi[1], ...
        N, c, p = self.num_subdomains, self.shared_size, self.private_size
        # Column map from microbatch slots to minibatch positions: [S | P_i].
        cols = np.concatenate(
            [np.broadcast_to(np.arange(c), (N, c)), c + np.arange(N)[:, None] * p + np.arange(p)],
            axis=1,
        )  # (N, m)
        return EpochBatches(
            minibatches=minibatches,
            microbatches=minibatches[:, cols],
            minibatch_mask=mini_mask,
            microbatch_mask=mini_mask[:, cols],
            permutation=pi,
        )

    @property
    def pair_share(self) -> int:
        """``q = o // N``: samples of the overlap per subdomain in :meth:`overlap_batches`."""
        return self.overlap_size // self.num_subdomains

    def overlap_batches(self, epoch: int) -> np.ndarray:
        """``(K, N, q)`` indices: for minibatch ``k`` the samples it shares with minibatch
        ``k + 1`` (the last ``o`` of ``M_k``), cut into ``N`` equal shares of ``q = o // N``
        (the last ``o % N`` dropped), for multi-batch curvature pairs (Berahas, Nocedal &
        Takáč 2016; ``curvature_pairs="multi_batch"``). For the epoch's last minibatch these are
        the samples a next window would share (the next epoch starts a new permutation); a
        pair on them is as consistent as any other, since both of its gradients are taken on
        the same samples.

        Raises:
          ValueError: ``o < N`` (no sample per subdomain); raise ``overlap`` or the batch size.
        """
        q = self.pair_share
        if q == 0:
            raise ValueError(
                f"the overlap between consecutive minibatches holds {self.overlap_size} samples, "
                f"fewer than the {self.num_subdomains} subdomains: multi-batch curvature pairs "
                "need at least one per subdomain; raise overlap (or the batch size)."
            )
        mini = self.epoch(epoch).minibatches
        u, o, N = self.minibatch_size, self.overlap_size, self.num_subdomains
        return mini[:, u - o: u - o + N * q].reshape(mini.shape[0], N, q)

    def epochs(self, start: int = 0):
        """Yield :meth:`epoch` for ``start, start + 1, ...`` (endless)."""
        e = start
        while True:
            yield self.epoch(e)
            e += 1


def plain_minibatches(
    num_samples: int, batch_size: int, *, seed: int = 0, epoch: int = 0, drop_last: bool = True
) -> PlainBatches:
    """Non-overlapping shuffled minibatches of size ``batch_size`` for one epoch.

    The same permutation as an :class:`OverlapSampler` with the same ``seed`` (``default_rng([seed,
    epoch])``), cut into ``K = n // b`` disjoint rows (``drop_last=True``), or ``ceil(n / b)`` rows
    with the last padded by wrap-around and masked out (``drop_last=False``).

    Raises:
      ValueError: ``batch_size`` larger than ``num_samples`` or non-positive sizes.
    """
    sampler = OverlapSampler(
        num_samples,
        batch_size,
        1,
        overlap=0.0,
        subdomain_overlap=0.0,
        seed=seed,
        drop_last=drop_last,
    )
    batches = sampler.epoch(epoch)
    return PlainBatches(indices=batches.minibatches, mask=batches.minibatch_mask)
