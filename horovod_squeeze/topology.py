"""Communication graphs for decentralized training: who talks to whom, and with what weight.

A :class:`Topology` is a symmetric, doubly stochastic mixing matrix ``W`` over ``n`` ranks: rank
``i`` hears from its neighbours (``W[i, j] > 0``, ``j != i``) and nobody else. Gossip contracts the
ranks' disagreement by the second-largest eigenvalue magnitude of ``W`` per step, so the
*spectral gap* ``1 - max(|lambda_2|, |lambda_n|)`` says how fast a graph reaches consensus (1 for
the complete graph, about ``4 pi^2 / (3 n^2)`` for a ring).

The built-in graphs use Metropolis-Hastings weights, ``W[i, j] = 1 / (1 + max(d_i, d_j))`` for an
edge and the rest of the row on the diagonal: symmetric and doubly stochastic on any undirected
graph, and uniform (``1 / (d + 1)``) on the regular ones below.

Example::

    import horovod_squeeze as hs
    hs.topology.ring(8).neighbors(0)        # (1, 7)
    hs.topology.ring(8).spectral_gap        # 0.195...
    hs.topology.from_matrix(my_W)           # checked: square, symmetric, rows and columns sum to 1
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Topology", "ring", "torus", "exponential", "fully_connected", "from_matrix", "TOPOLOGIES"]

# Doubly stochastic up to float64 rounding of a user's matrix (e.g. thirds typed as 0.3333333333).
_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
    """A mixing matrix ``weights`` (n x n float64, checked) and the graph's name."""

    weights: np.ndarray
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "weights", _checked(self.weights, self.name))
        self.weights.setflags(write=False)

    @property
    def size(self) -> int:
        return self.weights.shape[0]

    def neighbors(self, rank: int) -> tuple[int, ...]:
        """The ranks ``rank`` exchanges with (``W[rank, j] > 0``, ``j != rank``), ascending."""
        row = self.weights[self._rank(rank)]
        return tuple(int(j) for j in np.flatnonzero(row) if j != rank)

    def weight(self, rank: int, other: int) -> float:
        return float(self.weights[self._rank(rank), self._rank(other)])

    @property
    def degree(self) -> int:
        """The largest number of neighbours of any rank."""
        return max(len(self.neighbors(i)) for i in range(self.size))

    @property
    def spectral_gap(self) -> float:
        """``1 - max(|lambda_2|, |lambda_n|)`` of ``W`` (0: the ranks never agree)."""
        if self.size == 1:
            return 1.0
        eigenvalues = np.sort(np.linalg.eigvalsh(self.weights))
        return float(1.0 - max(abs(eigenvalues[0]), abs(eigenvalues[-2])))

    def __repr__(self) -> str:
        return (f"Topology({self.name}, {self.size} ranks, degree {self.degree}, "
                f"spectral gap {self.spectral_gap:.4g})")

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < self.size:
            raise ValueError(f"{self.name}: rank must be in [0, {self.size}), got {rank!r}")
        return int(rank)


def ring(size: int) -> Topology:
    """Each rank with the ranks before and after it: weights 1/3 (1/2 for two ranks)."""
    _check_size(size, "ring")
    return _metropolis(size, {(i, (i + 1) % size) for i in range(size)}, f"ring({size})")


def torus(size: int, rows: int | None = None) -> Topology:
    """A ``rows x (size / rows)`` grid wrapped both ways: four neighbours each (fewer where a side
    has one or two ranks). ``rows`` defaults to the divisor of ``size`` closest to its square
    root, the best-connected torus."""
    _check_size(size, "torus")
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or size % rows:
        raise ValueError(f"torus: rows must divide the {size} ranks, got {rows!r}")
    cols = size // rows
    edges = set()
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            edges.add((here, r * cols + (c + 1) % cols))
            edges.add((here, ((r + 1) % rows) * cols + c))
    return _metropolis(size, edges, f"torus({rows}x{cols})")


def exponential(size: int) -> Topology:
    """Each rank with the ranks at distance ``2^k`` either way around the ring (``2^k < size``):
    ``O(log n)`` neighbours and a spectral gap that shrinks only logarithmically with ``n``."""
    _check_size(size, "exponential")
    edges = {(i, (i + 2 ** k) % size) for i in range(size) for k in range(max(size - 1, 1).bit_length())
             if 2 ** k < size}
    return _metropolis(size, edges, f"exponential({size})")


def fully_connected(size: int) -> Topology:
    """Every rank with every other, weights ``1/n``: one gossip step is the exact average."""
    _check_size(size, "fully_connected")
    return Topology(np.full((size, size), 1.0 / size), f"fully_connected({size})")


def from_matrix(weights, name: str = "custom") -> Topology:
    """A user's mixing matrix, checked: square, finite, non-negative, symmetric, rows summing to 1
    (hence columns too), and connected (spectral gap above 0)."""
    return Topology(weights, name)


#: The built-in graphs by name (what ``--topology`` options accept).
TOPOLOGIES = {"ring": ring, "torus": torus, "exponential": exponential,
              "fully_connected": fully_connected}


def _check_size(size, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{what}: size must be a positive number of ranks, got {size!r}")


def _metropolis(size: int, edges, name: str) -> Topology:
    neighbours = [set() for _ in range(size)]
    for i, j in edges:
        if i != j:
            neighbours[i].add(j)
            neighbours[j].add(i)
    weights = np.zeros((size, size))
    for i in range(size):
        for j in neighbours[i]:
            weights[i, j] = 1.0 / (1 + max(len(neighbours[i]), len(neighbours[j])))
        weights[i, i] = 1.0 - weights[i].sum()
    return Topology(weights, name)


def _checked(weights, name: str) -> np.ndarray:
    try:
        w = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: the mixing matrix must be a square array of numbers "
                        f"({error})") from None
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise ValueError(f"{name}: the mixing matrix must be square and non-empty, got shape "
                         f"{w.shape}")
    for i, row in enumerate(w):
        if not np.all(np.isfinite(row)):
            raise ValueError(f"{name}: row {i} of the mixing matrix is not finite: {row}")
        if np.any(row < 0):
            raise ValueError(f"{name}: row {i} of the mixing matrix has negative weights "
                             f"(columns {np.flatnonzero(row < 0).tolist()}): W must be doubly "
                             f"stochastic")
        asymmetric = np.flatnonzero(np.abs(row - w[:, i]) > _TOLERANCE)
        if asymmetric.size:
            j = int(asymmetric[0])
            raise ValueError(f"{name}: the mixing matrix is not symmetric: W[{i}, {j}] = {w[i, j]} "
                             f"but W[{j}, {i}] = {w[j, i]}")
        if abs(row.sum() - 1.0) > _TOLERANCE:
            raise ValueError(f"{name}: row {i} of the mixing matrix sums to {float(row.sum())!r}, not 1: "
                             f"W must be doubly stochastic")
    if w.shape[0] > 1:
        eigenvalues = np.sort(np.linalg.eigvalsh(w))
        if 1.0 - eigenvalues[-2] <= _TOLERANCE:
            raise ValueError(f"{name}: the graph of the mixing matrix is disconnected (its second "
                             f"eigenvalue is 1): some ranks would never agree")
        if 1.0 + eigenvalues[0] <= _TOLERANCE:
            raise ValueError(f"{name}: the mixing matrix has eigenvalue -1 (a bipartite graph "
                             f"without self-weights): gossip would oscillate, never agree; give "
                             f"each rank a positive weight on itself")
    return w
