"""SecAgg+'s sparse neighbour graph: who masks with and shares secrets to whom.

Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", §3-4) replace the complete graph of Bonawitz et al. (CCS 2017) with a random
graph of degree ``k = O(log n)``: each client masks with, and Shamir-shares its seeds
to, only its ``k`` neighbours. Like their practical instantiation, the graph here is a
Harary graph H(n, k) (the ring lattice where a position neighbours the ``k / 2`` on either
side) over a random permutation of the clients, drawn from the round's seed, so every
party computes the same graph and no party chooses it.

Their analysis asks three things of ``(k, t)``, each for every client at once (a union
bound over the ``n`` clients of a binomial tail, so ``k`` grows as ``log n``); with a
dropout fraction ``delta`` and a corrupt fraction ``gamma``, each client independently:

- correctness: every client keeps at least ``t`` surviving neighbours, so its seeds can
  be rebuilt: ``n * P[Bin(k, 1 - delta) < t] <= 2^-eta``;
- connectivity: the graph of honest survivors stays connected, so only the total is
  learnt, not a sum per component; in H(n, k) a cut needs ``k / 2`` neighbouring
  positions gone: ``n * (delta + gamma)^(k/2) <= 2^-eta``;
- secrecy: no client has ``t`` corrupt neighbours, who could pool their shares:
  ``n * P[Bin(k, gamma) >= t] <= 2^-sigma``; and ``t > k / 2``, so that the shares the
  honest neighbours reveal (each either the self-mask's or the key's, never both)
  cannot reach ``t`` of both kinds.

``plan`` computes the tails exactly and returns the smallest even ``k`` that meets
them; a cohort too small for that gets the complete graph and the bound it reaches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedray.strategies.secagg.masks import prg

GRAPH_INFO = b"fedray/secagg/v1/graph"


@dataclass(frozen=True, slots=True)
class GraphPlan:
    """A round's graph parameters and the failure probabilities they reach."""

    clients: int
    degree: int  # neighbours of each client (clients - 1: the complete graph)
    threshold: int  # shares that rebuild a secret
    failure: float  # bound on P[some client cannot be unmasked] (correctness, connectivity)
    leak: float  # bound on P[some client has `threshold` corrupt neighbours]

    @property
    def complete(self) -> bool:
        return self.degree >= self.clients - 1


def _tail_below(k: int, p: float, t: int) -> float:
    """P[Bin(k, p) < t]."""
    return math.fsum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(min(t, k + 1)))


def _tail_from(k: int, p: float, t: int) -> float:
    """P[Bin(k, p) >= t], summed directly (no cancellation for tiny tails)."""
    return math.fsum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(t, k + 1))


def _bounds(n: int, k: int, dropout: float, corrupt: float, sigma: int
            ) -> tuple[int, float, float]:
    """(threshold, failure bound, leak bound) of degree ``k``: the smallest ``t > k / 2``
    that keeps the leak within 2^-sigma (or ``k`` if none does)."""
    t = k // 2 + 1
    while t < k and n * _tail_from(k, corrupt, t) > 2.0**-sigma:
        t += 1
    leak = min(1.0, n * _tail_from(k, corrupt, t))
    failure = n * _tail_below(k, 1 - dropout, t)
    if k < n - 1:
        failure += n * (dropout + corrupt) ** (k // 2)
    return t, min(1.0, failure), leak


def plan(clients: int, dropout: float, corrupt: float = 0.0, eta: int = 30,
         sigma: int = 40) -> GraphPlan:
    """The smallest even degree (and its threshold) for ``clients`` clients of whom a
    ``dropout`` fraction may drop and a ``corrupt`` fraction collude, failing with
    probability at most 2^-eta and leaking with at most 2^-sigma."""
    if clients < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    if not (0 <= dropout < 1 and 0 <= corrupt < 1 and dropout + corrupt < 1):
        raise ValueError("dropout and corrupt are fractions whose sum is below 1")
    for k in range(2, clients - 1, 2):
        t, failure, leak = _bounds(clients, k, dropout, corrupt, sigma)
        if failure <= 2.0**-eta and leak <= 2.0**-sigma:
            return GraphPlan(clients, k, t, failure, leak)
    # too few clients for a sparse graph: all of them, with the bounds that reaches
    t, failure, leak = _bounds(clients, clients - 1, dropout, corrupt, sigma)
    return GraphPlan(clients, clients - 1, t, failure, leak)


def _permutation(seed: bytes, count: int) -> list[int]:
    """A uniform permutation of ``range(count)`` from ``seed`` (Fisher-Yates, with
    rejection sampling so that no position is favoured)."""
    key = hashlib.sha256(GRAPH_INFO + seed).digest()
    order = list(range(count))
    draws, used = prg(key, 2 * count + 16), 0
    for i in range(count - 1, 0, -1):
        span = i + 1
        limit = (1 << 32) - (1 << 32) % span
        while True:
            if used == draws.size:  # the stream's prefix is stable: extend it
                draws = prg(key, 2 * draws.size)
            value = int(draws[used])
            used += 1
            if value < limit:
                break
        j = value % span
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(seed: bytes, clients: Sequence[int], degree: int) -> dict[int, frozenset[int]]:
    """Each client's neighbours in H(n, degree) over a permutation drawn from ``seed``;
    the same for every party that has the seed and the round's client indices."""
    ids = sorted(set(clients))
    n = len(ids)
    if len(ids) != len(clients):
        raise ValueError("client indices must be distinct")
    if degree >= n - 1:
        return {i: frozenset(ids) - {i} for i in ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph's degree is even and >= 2, got {degree}")
    ring = [ids[p] for p in _permutation(seed, n)]
    half = degree // 2
    return {ring[p]: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d)
            for p in range(n)}
