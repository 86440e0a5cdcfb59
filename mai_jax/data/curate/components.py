"""Connected components as rounds of group-by steps over an edge list, for a cluster.

The Ray engine's near dedup has an edge list too large for one driver, so the union-find of
dedup.py cannot run there. This is the alternating large-star / small-star algorithm (Kiveris,
Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce and Beyond",
SoCC 2014), the one GraphFrames runs: every round is two group-bys over rows (a, b), a < b,
each keeping the graph's connectivity:

  * large-star: for every node u and its neighbours N(u), m = min(N(u) + {u}); each neighbour
    v > u is rewired to m (edge (m, v));
  * small-star: for every node u and its smaller neighbours S(u), m = min(S(u) + {u}); u and
    each s in S(u) but m are rewired to m.

A step's `changed` column counts the edges it rewired. When a round rewires none (large-star:
every node with a larger neighbour is its neighbourhood's minimum; small-star: no node has two
smaller neighbours), each component is a star around its smallest member, every edge is
(minimum, member), so each document learns its cluster's minimum: the same deterministic
survivor as the local engine's union-find. The theory bounds the rounds by O(log^2 n); LSH
clusters take a handful.

The step functions take a batch of whole groups (one group from a Ray Data `map_groups`, or a
whole edge list in one process: `in_memory`, the reference the Ray loop is tested against) and
return columns a, b, changed (int64); large-star groups rows (u, v) by u (`both_directions`),
small-star groups edges (a, b) by b.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Batch = dict  # column name -> int64 array


def _edges(a, b, changed=None) -> Batch:
  a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
  return {"a": a, "b": b,
          "changed": np.zeros(len(a), np.int64) if changed is None else changed.astype(np.int64)}


def both_directions(batch: Batch) -> Batch:
  """Rows (u, v) for each edge both ways: large-star groups every neighbour of u."""
  a, b = np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64)
  return {"u": np.concatenate([a, b]), "v": np.concatenate([b, a])}


def _groups(key: np.ndarray, other: np.ndarray):
  """Unique (key, other) rows sorted by key, then other; and where each key's group starts."""
  rows = np.unique(np.stack([key, other], axis=1), axis=0)
  key, other = rows[:, 0], rows[:, 1]
  starts = np.concatenate([[0], np.nonzero(key[1:] != key[:-1])[0] + 1])
  return key, other, starts, np.diff(np.append(starts, len(key)))


def large_star(batch: Batch) -> Batch:
  """Whole groups of rows (u, v) by u -> edges (min of N(u) + {u}, v) for each v > u."""
  u, v = np.asarray(batch["u"], np.int64), np.asarray(batch["v"], np.int64)
  if not len(u):
    return _edges([], [])
  u, v, starts, sizes = _groups(u, v)
  m = np.repeat(np.minimum(u[starts], v[starts]), sizes)  # v sorted within a group: v[start] min
  larger = v > u
  return _edges(m[larger], v[larger], m[larger] < u[larger])


def small_star(batch: Batch) -> Batch:
  """Whole groups of edges (a, b) by b -> (m, b) and (m, a) for a != m, m = the group's min a.
  The input's `changed` (large-star's, earlier in the round) is carried into the output's, so
  one sum after a round counts both steps."""
  a, b = np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64)
  if not len(a):
    return _edges([], [])
  carried = int(np.sum(batch["changed"])) if "changed" in batch else 0
  b, a, starts, sizes = _groups(b, a)
  m = np.repeat(a[starts], sizes)
  moved = a != m
  changed = np.concatenate([np.zeros(len(starts), np.int64), np.ones(moved.sum(), np.int64)])
  changed[0] += carried
  return _edges(np.concatenate([a[starts], m[moved]]), np.concatenate([b[starts], a[moved]]),
                changed)


def one_round(edges: Batch) -> Batch:
  """Large-star then small-star over a batch holding every group (one process)."""
  return small_star(large_star(both_directions(edges)))


def max_rounds(n: int) -> int:
  """A guard far above the O(log^2 n) bound: a loop past it is a bug, not a slow graph."""
  return 4 * math.ceil(math.log2(n + 2)) ** 2 + 16


def converge(edges, run_round: Callable, changed: Callable[[object], int], n: int,
             on_round: Callable[[int, int], None] = lambda r, c: None):
  """Rounds over `edges` until one rewires nothing: `run_round(edges)` runs large-star then
  small-star (one_round in memory, or on Ray Data), `changed(edges)` sums the changed column.
  Returns the star edges (minimum, member) and the number of rounds."""
  for rounds in range(1, max_rounds(n) + 1):
    edges = run_round(edges)
    total = changed(edges)
    on_round(rounds, total)
    if total == 0:
      return edges, rounds
  raise RuntimeError(f"connected components did not converge in {max_rounds(n)} rounds")


def in_memory(n: int, a_E: np.ndarray, b_E: np.ndarray) -> tuple[np.ndarray, int]:
  """The same rounds in one process, the whole edge list being one batch of whole groups:
  (each node's component minimum, rounds)."""
  edges, rounds = converge(_edges(np.minimum(a_E, b_E), np.maximum(a_E, b_E)), one_round,
                           lambda e: int(e["changed"].sum()), n)
  labels = np.arange(n, dtype=np.int64)
  labels[edges["b"]] = edges["a"]  # star edges: (minimum, member)
  return labels, rounds
