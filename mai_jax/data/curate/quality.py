"""Model-based quality: a DCLM-style linear classifier trained locally, positives vs negatives.

DCLM (Li et al. 2024, https://arxiv.org/abs/2406.11794) keeps web documents that a fastText
bigram classifier scores as close to chosen positives (instruction data, textbook-like text) and
far from random web text. This is the same model family without the fastText dependency (whose
0.9.2 wheel fails under NumPy 2): hashed word unigrams and bigrams (crc32 into `buckets` slots,
log(1 + count), L2-normalized) and logistic regression trained by seeded SGD, so the same files
and settings give the same weights everywhere. The rule trains when the config is loaded (a few
seconds for thousands of documents), writes its score into each kept document's meta
(`quality_score`, probability of "positive"), and removes documents scoring below `threshold`
(default 0.5) or, with `keep_top_fraction` instead (DCLM keeps 0.1), all but the best-scoring
fraction of the corpus after dedup (topcut.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from typing import ClassVar, Optional

import numpy as np

from mai_jax.data.curate import topcut
from mai_jax.data.curate.rules import KEEP, Decision
from mai_jax.data.curate.textstats import DocText

_WORDS_RE = re.compile(r"\w+")


def features(text: str, buckets: int) -> tuple[np.ndarray, np.ndarray]:
  """(slot indices int64 [K], values float32 [K]): hashed unigrams and bigrams, log(1 + count),
  L2-normalized; empty arrays for a text without words."""
  words = _WORDS_RE.findall(text.lower())
  grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
  if not grams:
    return np.zeros(0, np.int64), np.zeros(0, np.float32)
  slots = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), np.int64, len(grams))
  index, counts = np.unique(slots % buckets, return_counts=True)
  values = np.log1p(counts).astype(np.float32)
  return index, values / np.linalg.norm(values)


def _sigmoid(z: float) -> float:
  return float(1.0 / (1.0 + np.exp(-z)))


def train(positives: list[str], negatives: list[str], *, buckets: int, epochs: int, lr: float,
          l2: float, seed: int) -> tuple[np.ndarray, float]:
  """Logistic regression by SGD over shuffled documents: (weights float32 [buckets], bias)."""
  data = [(features(t, buckets), 1.0) for t in positives] + \
         [(features(t, buckets), 0.0) for t in negatives]
  w_B, bias = np.zeros(buckets, np.float32), 0.0
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for i in rng.permutation(len(data)):
      (index, values), label = data[i]
      grad = _sigmoid(float(w_B[index] @ values) + bias) - label
      w_B[index] -= lr * (grad * values + l2 * w_B[index])
      bias -= lr * grad
  return w_B, bias


def _texts(paths: tuple[str, ...], field: str) -> list[str]:
  texts = []
  for path in paths:
    with open(path, "rb") as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(value, str) and value.strip():
          texts.append(value)
  return texts


@dataclasses.dataclass(frozen=True)
class QualityClassifier:
  """Keeps documents whose classifier probability of being like `positives` is >= threshold
  (0.5 unless keep_top_fraction is set), or the keep_top_fraction of the corpus scoring highest.

  positives / negatives: JSONL files (`field`, default 'text'), e.g. synthetic textbook text vs a
  random sample of the raw web. The score goes to meta['quality_score'].
  """
  name: ClassVar[str] = "quality_classifier"
  positives: tuple[str, ...] = ()
  negatives: tuple[str, ...] = ()
  field: str = "text"
  threshold: Optional[float] = None
  keep_top_fraction: Optional[float] = None
  buckets: int = 1 << 18
  epochs: int = 5
  lr: float = 0.5
  l2: float = 1e-6
  seed: int = 0
  higher_is_better: ClassVar[bool] = True

  def __post_init__(self):
    topcut.check(self, "threshold")  # before training: a wrong config fails fast
    if self.threshold is None and self.keep_top_fraction is None:
      object.__setattr__(self, "threshold", 0.5)
    pos, neg = _texts(self.positives, self.field), _texts(self.negatives, self.field)
    if not pos or not neg:
      raise ValueError(f"needs documents in both `positives` ({len(pos)} found) and `negatives` "
                       f"({len(neg)} found): JSONL files with a {self.field!r} field")
    w_B, bias = train(pos, neg, buckets=self.buckets, epochs=self.epochs, lr=self.lr, l2=self.l2,
                      seed=self.seed)
    object.__setattr__(self, "_model", (w_B, bias))

  def score(self, text: str) -> float:
    w_B, bias = self._model
    index, values = features(text, self.buckets)
    return _sigmoid(float(w_B[index] @ values) + bias)

  def fields(self, doc: DocText) -> dict:
    """What this rule adds to a kept document's meta."""
    return {"quality_score": round(self._doc_score(doc), 6)}

  def _doc_score(self, doc: DocText) -> float:
    cached = doc.__dict__.get("quality_score")
    if cached is None:
      cached = doc.__dict__["quality_score"] = self.score(doc.text)
    return cached

  def rank_score(self, doc: DocText) -> float:
    """What keep_top_fraction ranks by (docfilter stores it per staged file)."""
    return self._doc_score(doc)

  def apply(self, doc: DocText) -> Decision:
    if self.threshold is not None and self._doc_score(doc) < self.threshold:
      return "below_threshold", None
    return KEEP
