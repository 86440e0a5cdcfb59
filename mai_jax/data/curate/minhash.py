"""MinHash signatures of word shingles, and the LSH band keys near-dedup groups them by.

A document's shingles are its lowercased `\\w+` words taken `ngram` at a time (FineWeb: 5);
a document with fewer words is one shingle. Signatures are `num_perm = bands * rows` 32-bit
minimums (FineWeb: 14 bands x 8 rows = 112), so two documents with Jaccard similarity s share at
least one band with probability 1 - (1 - s**rows)**bands (0.5 at s ~ 0.72 for 14 x 8).

Why rensa (RMinHash, Rust): measured on this machine (2 cores, 4,001 stdlib chunks of <= 3 KB,
10.7 MB, 112 permutations, shingles given): rensa's batch `digest_matrix_from_token_sets` 82,000
docs/s (221 MB/s), rensa per document 26,000 docs/s, datasketch 2.0 `MinHash.bulk` 2,200 docs/s
and per document 1,300 docs/s, a NumPy multiply-shift MinHash over blake2b shingle hashes 3,200
docs/s. Shingling in Python (3,400 docs/s) then dominates; benchmarks/curate.py has the figures.
"""

from __future__ import annotations

import re

import numpy as np

_WORDS_RE = re.compile(r"\w+")


def shingles(text: str, ngram: int) -> list[str]:
  """Word n-grams of `text` joined by spaces; [] for a text without words."""
  words = _WORDS_RE.findall(text.lower())
  if len(words) <= ngram:
    return [" ".join(words)] if words else []
  return [" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]


def _rensa():
  try:
    import rensa  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("near-dedup needs rensa: pip install 'mai_jax[curate]'") from e
  return rensa


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int) -> np.ndarray:
  """uint32 [N, num_perm] MinHash signatures of the texts' shingles."""
  return set_signatures([shingles(t, ngram) for t in texts], num_perm, seed)


def set_signatures(sets: list[list[str]], num_perm: int, seed: int) -> np.ndarray:
  """uint32 [N, num_perm] MinHash signatures of token sets; an empty set gets all-ones (it
  matches only other empty sets, which near-dedup leaves alone)."""
  sig_NP = np.full((len(sets), num_perm), np.iinfo(np.uint32).max, np.uint32)
  rows = [i for i, s in enumerate(sets) if s]
  if rows:
    matrix = _rensa().RMinHash.digest_matrix_from_token_sets([sets[i] for i in rows], num_perm,
                                                              seed)
    sig_NP[rows] = np.asarray(matrix.to_rows(), np.uint32)
  return sig_NP


def candidate_probability(s: float, bands: int, rows: int) -> float:
  """Probability that two sets of Jaccard similarity s share at least one LSH band."""
  return 1.0 - (1.0 - s ** rows) ** bands


def band_keys(sig_NP: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
  """Per band, an int64 [N] group id: two documents get the same id iff their `rows` signature
  values in that band are all equal (exact, no hashing of the band)."""
  if sig_NP.shape[1] < bands * rows:
    raise ValueError(f"signatures have {sig_NP.shape[1]} values, bands x rows needs {bands * rows}")
  keys = []
  for b in range(bands):
    band_NR = np.ascontiguousarray(sig_NP[:, b * rows:(b + 1) * rows])
    _, inverse_N = np.unique(band_NR.view(np.dtype((np.void, 4 * rows))).ravel(),
                             return_inverse=True)
    keys.append(inverse_N.astype(np.int64).ravel())
  return keys


def jaccard_estimate(a_P: np.ndarray, b_P: np.ndarray) -> float:
  """Fraction of equal signature values: an unbiased estimate of the shingle-set Jaccard."""
  return float(np.mean(a_P == b_P))
