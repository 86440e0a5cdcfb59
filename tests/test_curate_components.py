"""Connected components by large-star / small-star rounds (mai_jax/data/curate/components.py, the
Ray engine's near-dedup clustering) against union-find, on hand-checked steps and random graphs.
The same rounds on Ray Data run in tests/test_curate.py's Ray test."""

import numpy as np

from mai_jax.data.curate import components, dedup


def _edge_set(batch) -> set:
  assert len(batch["a"]) == len(batch["b"]) == len(batch["changed"])
  return set(zip(batch["a"].tolist(), batch["b"].tolist()))


def _batch(edges):
  a, b = np.array(edges, np.int64).reshape(-1, 2).T
  return {"a": a, "b": b, "changed": np.zeros(len(a), np.int64)}


def test_large_star_rewires_larger_neighbours_to_the_neighbourhood_minimum():
  # Path 0-1-2: node 1's neighbourhood minimum is 0, so its larger neighbour 2 moves to 0.
  out = components.large_star(components.both_directions(_batch([(1, 2), (0, 1)])))
  assert _edge_set(out) == {(0, 1), (0, 2)} and out["changed"].sum() == 1
  # A star around its own minimum is left alone.
  out = components.large_star(components.both_directions(_batch([(0, 3), (0, 1), (0, 2)])))
  assert _edge_set(out) == {(0, 1), (0, 2), (0, 3)} and out["changed"].sum() == 0


def test_small_star_rewires_smaller_neighbours_and_carries_large_stars_count():
  # Node 3 with smaller neighbours 0, 1, 2: all to 0; 2 edges rewired (+ 5 carried in).
  batch = _batch([(2, 3), (0, 3), (1, 3)])
  batch["changed"][:] = [2, 0, 3]
  out = components.small_star(batch)
  assert _edge_set(out) == {(0, 3), (0, 1), (0, 2)} and out["changed"].sum() == 2 + 5
  assert components.small_star(_batch([]))["a"].shape == (0,)


def _union_find(n, a, b):
  uf = dedup.UnionFind(n)
  for x, y in zip(a.tolist(), b.tolist()):
    uf.union(x, y)
  return np.array([uf.find(i) for i in range(n)])


def test_in_memory_rounds_give_union_finds_minimum_on_random_graphs():
  rng = np.random.default_rng(0)
  worst = 0
  for trial in range(120):
    n = int(rng.integers(1, 200))
    if trial % 4 == 0:    # one long path in shuffled order: many rounds for label propagation
      perm = rng.permutation(n)
      a, b = perm[:-1], perm[1:]
    else:                 # sparse random graphs: many clusters, repeats, self-loops, isolated
      e = int(rng.integers(0, 2 * n))
      a, b = rng.integers(0, n, e), rng.integers(0, n, e)
    labels, rounds = components.in_memory(n, a, b)
    np.testing.assert_array_equal(labels, _union_find(n, a, b), err_msg=f"trial {trial}")
    worst = max(worst, rounds)
  assert worst <= components.max_rounds(200) and worst > 2  # the paths took several rounds
