"""One document's text split the ways the rules read it (words, lines, paragraphs), computed once.

Word splitting is a regex (`\\w+` runs, and runs of other non-space characters), not NLTK's
`word_tokenize` that datatrove uses for English: NLTK needs its punkt data downloaded at run time,
and the regex splits punctuation off words the same way for the cases the rules look at ("end." ->
"end", "."; "..." stays one token). Counts can differ from datatrove on contractions ("don't" is
one word here, two in NLTK), which moves word-count thresholds by a few percent at most.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

WORD_RE = re.compile(r"\w+|[^\w\s]+")
_LINES_RE = re.compile(r"\n+")
_PARAGRAPHS_RE = re.compile(r"\n{2,}")
_SPACE_RE = re.compile(r"\s+")
_PUNCT_RE = re.compile(r"[^\w\s]+")

# A subset of Unicode's Sentence_Terminal characters (Latin, CJK, fullwidth, Devanagari, Arabic,
# Armenian, Ethiopic). datatrove's TERMINAL_PUNCTUATION has 159 entries covering rarer scripts.
TERMINAL_PUNCTUATION = tuple(".!?\u203c\u203d\u2047\u2048\u2049\u3002\uff0e\uff01\uff1f\uff61"
                             "\u0964\u0965\u061f\u06d4\u0589\u1362\u1367\u1368")


class DocText:
  """Lazily computed views of `text`; each rule reads the ones it needs and shares the rest."""

  __slots__ = ("text", "__dict__")

  def __init__(self, text: str):
    self.text = text

  @functools.cached_property
  def words(self) -> list[str]:
    return WORD_RE.findall(self.text)

  @functools.cached_property
  def word_ids_W(self) -> np.ndarray:
    """uint64 [W]: each word's index in this document's own vocabulary, plus one."""
    vocab: dict[str, int] = {}
    return np.array([vocab.setdefault(w, len(vocab) + 1) for w in self.words], np.uint64)

  @functools.cached_property
  def word_chars_cum(self) -> np.ndarray:
    """int64 [W + 1]: characters in the first i words (so words i..j hold cum[j] - cum[i])."""
    return np.concatenate([[0], np.cumsum([len(w) for w in self.words], dtype=np.int64)])

  @functools.cached_property
  def lines(self) -> list[str]:
    """`text.splitlines()`: what Gopher quality and C4 count lines over."""
    return self.text.splitlines()

  @functools.cached_property
  def lines_nonempty(self) -> list[str]:
    """Lines split on runs of newlines (Gopher repetition's line unit)."""
    return _LINES_RE.split(self.text)

  @functools.cached_property
  def paragraphs(self) -> list[str]:
    return _PARAGRAPHS_RE.split(self.text.strip())


def is_symbol_word(word: str) -> bool:
  """A token of punctuation/symbols only (the regex makes every other token a \\w+ run)."""
  return not (word[0].isalnum() or word[0] == "_")


def normalize_for_hash(text: str) -> str:
  """The text exact dedup compares: NFKC, lowercased, punctuation dropped, whitespace collapsed,
  so copies that differ only in case, spacing or punctuation count as the same document."""
  text = unicodedata.normalize("NFKC", text).lower()
  return _SPACE_RE.sub(" ", _PUNCT_RE.sub(" ", text)).strip()


def word_count(text: str) -> int:
  """Words as the report counts them (the token proxy, before any tokenizer is chosen)."""
  return sum(1 for _ in WORD_RE.finditer(text))
