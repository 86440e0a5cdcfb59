"""Decontamination: remove training documents that contain evaluation items.

An item's tokens (lowercased `\\w+` runs and single punctuation characters, so code items keep
their brackets) give its 13-grams (GPT-3's n, Brown et al. 2020, appendix C); a document is
contaminated when it contains any of them. Items shorter than 13 tokens are matched whole, unless
shorter than `min_tokens` (too generic: "for i in range(10):" is in half of all Python files);
those are counted in the report as skipped.

Item text: for the multiple-choice task files (mai_jax/tasks/*.jsonl: context, choices, answer)
the context alone and the context followed by the correct choice; for other JSONL, the `field`
given, or every string value of the record joined by newlines.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from typing import Iterator, Optional

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
  return _TOKEN_RE.findall(text.lower())


def task_files() -> list[str]:
  """The bundled evaluation task files, sorted."""
  tasks_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "tasks")
  return sorted(glob.glob(os.path.join(tasks_dir, "*.jsonl")))


def _record_texts(record, field: str) -> list[str]:
  if not isinstance(record, dict):
    return [record] if isinstance(record, str) else []
  if field:
    value = record.get(field)
    return [value] if isinstance(value, str) else []
  context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
  if isinstance(context, str) and isinstance(choices, list):
    texts = [context]
    if isinstance(answer, int) and 0 <= answer < len(choices) and isinstance(choices[answer], str):
      texts.append(context + choices[answer])
    return texts
  return ["\n".join(v for v in record.values() if isinstance(v, str))]


def eval_items(path: str, field: str = "") -> Iterator[tuple[str, str]]:
  """(label 'file:line', text) of every item of a JSONL file; bad lines are skipped."""
  name = os.path.basename(path)
  with open(path, "rb") as f:
    for n, line in enumerate(f):
      try:
        record = json.loads(line)
      except ValueError:
        continue
      for text in _record_texts(record, field):
        yield f"{name}:{n}", text


@dataclasses.dataclass
class EvalIndex:
  """N-grams of every item, and whole short items by length, each mapped to its item label."""
  ngram: int
  grams: dict = dataclasses.field(default_factory=dict)           # ngram tuple -> label
  short: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))
  items: int = 0
  skipped_short: int = 0

  def add(self, label: str, text: str, min_tokens: int) -> None:
    toks = tuple(tokens(text))
    self.items += 1
    if len(toks) >= self.ngram:
      for i in range(len(toks) - self.ngram + 1):
        self.grams.setdefault(toks[i:i + self.ngram], label)
    elif len(toks) >= min_tokens:
      self.short[len(toks)].setdefault(toks, label)
    else:
      self.skipped_short += 1

  def match(self, text: str) -> Optional[tuple[str, str]]:
    """(item label, the matched text) of the first item found in `text`, or None."""
    toks = tuple(tokens(text))
    for n, table in [(self.ngram, self.grams), *sorted(self.short.items())]:
      if not table:
        continue
      for i in range(len(toks) - n + 1):
        label = table.get(toks[i:i + n])
        if label is not None:
          return label, " ".join(toks[i:i + n])
    return None


def build_index(files: list[str], field: str, ngram: int, min_tokens: int) -> EvalIndex:
  index = EvalIndex(ngram)
  for path in files:
    for label, text in eval_items(path, field):
      index.add(label, text, min_tokens)
  return index
