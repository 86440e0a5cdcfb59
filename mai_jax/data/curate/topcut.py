"""keep_top_fraction: a scoring rule keeps the best fraction of the whole corpus, not a threshold.

DCLM (Li et al. 2024, https://arxiv.org/abs/2406.11794, section 4.4) keeps the top 10% of its
deduplicated pool by fastText score: a cut that depends on every document's score, so no file can
decide it alone. A rule with `keep_top_fraction` set (quality_classifier, perplexity) keeps every
document in the filter stage and docfilter stores its score per staged file (float32, column r of
NNNNNN.npz's `scores` for the r-th such rule); after exact and near dedup the engine keeps the
k = round(fraction x N) best of the N documents still kept (round half up), ranked by score (higher
first, or lower first: perplexity) and, among equal scores, by priority order (the earlier
document wins, as in dedup), so exactly k survive on either engine. Several such rules cut one
after another in config order, each over what the previous cuts kept.

Why after dedup (DCLM's order too): the fraction is of the distinct documents, so exactly k come
out; a cut before dedup would give a duplicated good document several of the k places and then
dedup would keep one of them, and it would let the score, not the priority order, choose which
copy of a cluster survives.

Ranks are uint64 keys, ascending = better: the float32 score (negated when higher is better)
mapped to its order-preserving unsigned bits, one NaN (last) and no -0.0. The local engine sorts
them (`local_keep`); the Ray engine finds the k-th key by radix selection (`select_cut`) from
per-file histograms of 8-bit digits (cluster_cut.py), so only 256 counts a task a pass reach
the driver.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

REASON = "below_top_fraction"


def check(rule, threshold_key: str) -> None:
  """A rule's keep_top_fraction against its threshold key: one of them, a fraction in (0, 1]."""
  fraction = rule.keep_top_fraction
  if fraction is None:
    return
  if not 0 < fraction <= 1:
    raise ValueError(f"keep_top_fraction={fraction} must be in (0, 1] (0.1: DCLM's top 10%)")
  if getattr(rule, threshold_key) is not None:
    raise ValueError(f"keep_top_fraction={fraction} and {threshold_key}="
                     f"{getattr(rule, threshold_key)}: set one of them")


def is_ranked(rule) -> bool:
  return getattr(rule, "keep_top_fraction", None) is not None


def ranked(rules) -> list:
  """The rules with keep_top_fraction set, in config order (their scores' columns)."""
  return [r for r in rules if is_ranked(r)]


def keep_count(fraction: float, n: int) -> int:
  """round(fraction x n), halves up."""
  return min(n, math.floor(fraction * n + 0.5))


def score_keys(score_N: np.ndarray, higher_is_better: bool) -> np.ndarray:
  """uint64 [N] keys whose ascending order is best first: order-preserving float32 bits."""
  x = np.asarray(score_N, np.float32)
  x = -x if higher_is_better else x
  x = np.where(np.isnan(x), np.float32(np.nan), x + np.float32(0))  # one NaN; -0.0 -> 0.0
  bits = x.view(np.uint32)
  return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)


def key_score(key: int, higher_is_better: bool) -> float:
  """The score of a key (score_keys' inverse)."""
  bits = np.uint32(key)
  bits = bits & np.uint32(0x7FFFFFFF) if bits >> 31 else ~bits
  x = np.array([bits], np.uint32).view(np.float32)[0]
  return float(show(-x + np.float32(0) if higher_is_better else x))


def show(score) -> str:
  """A float32 score as its shortest exact decimal (report examples and cut scores)."""
  return np.format_float_positional(np.float32(score), unique=True, trim="0")


def detail(score, cut: Optional[float]) -> str:
  """A removed example's detail (cut None: the fraction kept no document)."""
  return f"score {show(score)}, " + ("none kept" if cut is None else f"cut {show(cut)}")


def local_keep(key_N: np.ndarray, alive_N: np.ndarray, k: int) -> np.ndarray:
  """bool [N]: the k best of the alive documents by (key, position)."""
  idx = np.nonzero(alive_N)[0]
  order = idx[np.lexsort((idx, key_N[idx]))]
  keep_N = np.zeros(len(key_N), bool)
  keep_N[order[:k]] = True
  return keep_N


Histogram = Callable[[int, int, Optional[int]], np.ndarray]  # (shift, prefix, tie) -> int64 [256]


def digit_counts(key_N: np.ndarray, shift: int, prefix: int) -> np.ndarray:
  """int64 [256]: how many keys with key >> (shift + 8) == prefix have each digit at `shift`."""
  key_N = np.asarray(key_N, np.uint64)
  if shift + 8 < 64:
    key_N = key_N[(key_N >> np.uint64(shift + 8)) == np.uint64(prefix)]
  digits = (key_N >> np.uint64(shift)) & np.uint64(0xFF)
  return np.bincount(digits.astype(np.int64), minlength=256)


def radix_select(histogram: Callable[[int, int], np.ndarray], rank: int, bits: int
                 ) -> tuple[int, int, int]:
  """The key of 0-based `rank` among keys < 2**bits, 8 bits a pass from the top:
  (key, keys below it, keys equal to it). `histogram(shift, prefix)` is digit_counts over all
  keys (summed over files)."""
  prefix, below, equal = 0, 0, 0
  for shift in range(8 * ((bits + 7) // 8) - 8, -1, -8):
    cum = np.cumsum(histogram(shift, prefix))
    digit = int(np.searchsorted(cum, rank - below, side="right"))
    below += int(cum[digit - 1]) if digit else 0
    equal = int(cum[digit]) - (int(cum[digit - 1]) if digit else 0)
    prefix = (prefix << 8) | digit
  return prefix, below, equal


NO_TIE = (1 << 63) - 1  # the cut's document when its whole tie group is kept


def select_cut(histogram: Histogram, k: int, doc_bits: int) -> tuple[int, int]:
  """The cut (key, doc) of the k >= 1 best: a document is kept iff (its key, its number) <=
  the cut. `histogram(shift, prefix, tie)`: digit_counts of the alive documents' keys (tie None)
  or of the numbers of those whose key == tie. The numbers are needed only when the cut splits
  a group of equal scores."""
  key, below, equal = radix_select(lambda s, p: histogram(s, p, None), k - 1, 32)
  if below + equal == k:
    return key, NO_TIE
  doc, _, _ = radix_select(lambda s, p: histogram(s, p, key), k - 1 - below, max(doc_bits, 1))
  return key, doc


def kept_by_cut(key_N: np.ndarray, doc_N: np.ndarray, cut: tuple[int, int]) -> np.ndarray:
  key, doc = cut
  key_N = np.asarray(key_N, np.uint64)
  return (key_N < np.uint64(key)) | ((key_N == np.uint64(key)) & (np.asarray(doc_N) <= doc))


def summary(rule, n: int, k: int, cut_score: Optional[float]) -> dict:
  """report.json's top_fraction entry of one rule."""
  return {"keep_top_fraction": rule.keep_top_fraction,
          "higher_is_better": rule.higher_is_better, "docs_in": n, "docs_out": k,
          "cut_score": cut_score}


def report_extra(cuts: dict) -> dict:
  """report.json's `top_fraction` (rule name -> summary), absent without such rules."""
  return {"top_fraction": cuts} if cuts else {}


def local_cuts(rules, scores_NR: np.ndarray, alive_N: np.ndarray
               ) -> tuple[np.ndarray, list, dict]:
  """The local engine's cuts over the run's documents in priority order (`alive_N`: kept by
  dedup): (int64 [N], -1 kept or the ranked rule r that removed it; each rule's cut score;
  report.json's top_fraction)."""
  cut_N = np.full(len(alive_N), -1, np.int64)
  scores, info = [], {}
  for r, rule in enumerate(ranked(rules)):
    key_N = score_keys(scores_NR[:, r], rule.higher_is_better)
    n = int(alive_N.sum())
    k = keep_count(rule.keep_top_fraction, n)
    keep_N = local_keep(key_N, alive_N, k)
    scores.append(key_score(int(key_N[keep_N].max()), rule.higher_is_better) if k else None)
    cut_N[alive_N & ~keep_N] = r
    alive_N = keep_N
    info[rule.name] = summary(rule, n, k, scores[-1])
  return cut_N, scores, info
