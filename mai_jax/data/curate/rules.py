"""Heuristic quality rules: Gopher quality, Gopher repetition, C4, C4 bad words, FineWeb.

Each rule is a frozen dataclass whose fields are its thresholds; `apply(doc)` returns
`(reason, new_text)`: reason None keeps the document (new_text, when set, replaces it: C4 drops
lines), a reason string such as 'gopher_short_doc' removes it. Defaults are datatrove's published
values (datatrove 0.10, `datatrove/pipeline/filters/*.py`), which follow the papers:
  * Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
    Gopher", appendix A.1.1 and table A1 (https://arxiv.org/abs/2112.11446).
  * C4: Raffel et al. 2020, section 2.2 (https://jmlr.org/papers/volume21/20-074/20-074.pdf) and
    tensorflow_datasets' c4_utils.py.
  * FineWeb: Penedo et al. 2024, "The FineWeb Datasets", section 3.5 (custom filters)
    (https://arxiv.org/abs/2406.17557), datatrove's FineWebQualityFilter.
A threshold set to false (or null in JSON) turns that check off, as None does in datatrove. Differences from datatrove are in textstats.py (word splitting)
and at each rule (sentence counting in C4).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional

import numpy as np

from mai_jax.data.curate.textstats import TERMINAL_PUNCTUATION, DocText, is_symbol_word

Decision = tuple[Optional[str], Optional[str]]  # (removal reason or None, replacement text or None)
KEEP: Decision = (None, None)


def _over(limit, value) -> bool:
  return limit is not None and limit is not False and value > limit


def _under(limit, value) -> bool:
  return limit is not None and limit is not False and value < limit


@dataclasses.dataclass(frozen=True)
class GopherQuality:
  """Gopher's quality filter (Rae et al. 2021, A.1.1; datatrove GopherQualityFilter defaults).

  Removes documents with fewer than 50 or more than 100,000 non-symbol words, mean word length
  outside [3, 10], more than 0.1 '#' or ellipses per word, more than 90% of lines starting with a
  bullet, more than 30% of lines ending with an ellipsis, fewer than 80% of words with a letter,
  or fewer than 2 of the stop words ('the', 'be', 'to', 'of', 'and', 'that', 'have', 'with';
  case-sensitive, as datatrove).
  """
  name: ClassVar[str] = "gopher_quality"
  min_doc_words: Optional[int] = 50
  max_doc_words: Optional[int] = 100_000
  min_avg_word_length: Optional[float] = 3
  max_avg_word_length: Optional[float] = 10
  max_symbol_word_ratio: Optional[float] = 0.1
  max_bullet_lines_ratio: Optional[float] = 0.9
  max_ellipsis_lines_ratio: Optional[float] = 0.3
  min_alpha_words_ratio: Optional[float] = 0.8
  min_stop_words: Optional[int] = 2
  stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")

  def apply(self, doc: DocText) -> Decision:
    text, words = doc.text, doc.words
    if not words:
      return "gopher_short_doc", None
    content = [w for w in words if not is_symbol_word(w)]
    if _under(self.min_doc_words, len(content)):
      return "gopher_short_doc", None
    if _over(self.max_doc_words, len(content)):
      return "gopher_long_doc", None
    mean_len = sum(map(len, content)) / len(content) if content else 0.0
    if _under(self.min_avg_word_length, mean_len):
      return "gopher_below_avg_word_length", None
    if _over(self.max_avg_word_length, mean_len):
      return "gopher_above_avg_word_length", None
    if _over(self.max_symbol_word_ratio, text.count("#") / len(words)):
      return "gopher_too_many_hashes", None
    ellipses = text.count("...") + text.count("\u2026")
    if _over(self.max_symbol_word_ratio, ellipses / len(words)):
      return "gopher_too_many_ellipsis", None
    lines = doc.lines or [""]
    bullets = sum(s.lstrip().startswith(("\u2022", "-")) for s in lines)
    if _over(self.max_bullet_lines_ratio, bullets / len(lines)):
      return "gopher_too_many_bullets", None
    end_ellipsis = sum(s.rstrip().endswith(("...", "\u2026")) for s in lines)
    if _over(self.max_ellipsis_lines_ratio, end_ellipsis / len(lines)):
      return "gopher_too_many_end_ellipsis", None
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    if _under(self.min_alpha_words_ratio, alpha / len(words)):
      return "gopher_below_alpha_threshold", None
    if _under(self.min_stop_words, len(set(self.stop_words).intersection(words))):
      return "gopher_enough_stop_words", None
    return KEEP


def _duplicates(items: list[str]) -> tuple[int, int]:
  """(repeated elements, their characters): every occurrence after an element's first."""
  seen, count, chars = set(), 0, 0
  for item in items:
    if item in seen:
      count, chars = count + 1, chars + len(item)
    else:
      seen.add(item)
  return count, chars


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_keys(ids_W: np.ndarray, n: int) -> np.ndarray:
  """uint64 [W - n + 1] polynomial hashes of the word-id n-grams (equal n-grams, equal keys;
  distinct ones collide with probability ~2**-64, so counts are exact in practice)."""
  count = len(ids_W) - n + 1
  keys = np.zeros(max(count, 0), np.uint64)
  for k in range(n):
    keys = keys * _HASH_MULT + ids_W[k:k + count]  # wraps modulo 2**64
  return keys


def _top_ngram_chars(doc: DocText, n: int) -> int:
  """Characters of the most frequent word n-gram (joined by spaces) times its count; ties go to
  the n-gram seen first, as Counter.most_common(1) does in datatrove."""
  keys = ngram_keys(doc.word_ids_W, n)
  _, first, counts = np.unique(keys, return_index=True, return_counts=True)
  top = counts.max()
  i = int(first[counts == top].min())
  cum = doc.word_chars_cum
  return int(cum[i + n] - cum[i] + n - 1) * int(top)


def _duplicated_ngram_chars(doc: DocText, n: int) -> int:
  """Characters inside repeated word n-grams, each repeat counted once and skipped past (Gopher's
  definition as datatrove implements it, whose n-grams are words joined without spaces: there
  'ab c' repeats 'a bc', here it does not)."""
  keys = ngram_keys(doc.word_ids_W, n)
  if len(np.unique(keys)) == len(keys):
    return 0
  cum, keys, seen, chars, i = doc.word_chars_cum, keys.tolist(), set(), 0, 0
  while i < len(keys):
    if keys[i] in seen:
      chars, i = chars + int(cum[i + n] - cum[i]), i + n
    else:
      seen.add(keys[i])
      i += 1
  return chars


@dataclasses.dataclass(frozen=True)
class GopherRepetition:
  """Gopher's repetition filter (Rae et al. 2021, table A1; datatrove GopherRepetitionFilter).

  Fractions of duplicated paragraphs (split on blank lines) and lines, by count and by characters;
  the character fraction of the most common 2/3/4-gram; the character fraction inside duplicated
  5..10-grams. Character fractions are over len(text).
  """
  name: ClassVar[str] = "gopher_repetition"
  dup_line_frac: Optional[float] = 0.3
  dup_para_frac: Optional[float] = 0.3
  dup_line_char_frac: Optional[float] = 0.2
  dup_para_char_frac: Optional[float] = 0.2
  top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
  dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                                 (9, 0.11), (10, 0.10))

  def apply(self, doc: DocText) -> Decision:
    text = doc.text
    if not text:
      return "empty", None
    for unit, items, frac, char_frac in (
        ("para", doc.paragraphs, self.dup_para_frac, self.dup_para_char_frac),
        ("line", doc.lines_nonempty, self.dup_line_frac, self.dup_line_char_frac)):
      count, chars = _duplicates(items)
      if _over(frac, count / len(items)):
        return f"dup_{unit}_frac", None
      if _over(char_frac, chars / len(text)):
        return f"dup_{unit}_char_frac", None
    for n, frac in self.top_n_grams:
      if len(doc.words) >= n and _top_ngram_chars(doc, n) / len(text) > frac:
        return f"top_{n}_gram", None
    repeats = True  # no repeated n-gram means no repeated longer one: skip those
    for n, frac in sorted(self.dup_n_grams):
      repeats = repeats and (chars := _duplicated_ngram_chars(doc, n)) > 0
      if repeats and chars / len(text) > frac:
        return f"duplicated_{n}_n_grams", None
    return KEEP


_CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
# A sentence ends at . ! ? (and closing quotes/brackets) followed by whitespace and more text.
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")
_C4_END = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")


@dataclasses.dataclass(frozen=True)
class C4Quality:
  """C4's line and page filters (Raffel et al. 2020, 2.2; datatrove C4QualityFilter defaults).

  Per line: drop lines with a word over 1000 characters, strip Wikipedia citations, drop lines not
  ending in terminal punctuation (or ending in '...'), with fewer than 3 words, mentioning
  javascript, or with cookie/terms-of-use phrases. Per page: remove it if it has 'lorem ipsum' or a
  curly bracket in a kept line, or fewer than 5 sentences in the kept lines. Kept lines replace the
  text (rewrite_lines=False only filters). Sentences are split by a regex (SENTENCE_SPLIT_RE: after
  . ! ? and closing quotes, before whitespace), where datatrove uses NLTK's punkt, a download.
  """
  name: ClassVar[str] = "c4"
  filter_no_terminal_punct: bool = True
  min_num_sentences: Optional[int] = 5
  min_words_per_line: Optional[int] = 3
  max_word_length: Optional[int] = 1000
  remove_citations: bool = True
  filter_lorem_ipsum: bool = True
  filter_javascript: bool = True
  filter_curly_bracket: bool = True
  filter_policy: bool = True
  rewrite_lines: bool = True

  def apply(self, doc: DocText) -> Decision:
    sentences, kept = 0, []
    for line in doc.lines:
      line = line.strip()
      words = line.split()
      if self.max_word_length and any(len(w) > self.max_word_length for w in words):
        continue
      if self.remove_citations:
        line = _CITATION_RE.sub("", line)
      if self.filter_no_terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
        continue
      if _under(self.min_words_per_line, len(words)):
        continue
      lower = line.lower()
      if self.filter_lorem_ipsum and "lorem ipsum" in lower:
        return "lorem_ipsum", None
      if self.filter_javascript and "javascript" in lower:
        continue
      if self.filter_curly_bracket and "{" in line:
        return "curly_bracket", None
      if self.filter_policy and any(p in lower for p in _POLICY):
        continue
      sentences += 1 + len(SENTENCE_SPLIT_RE.findall(line))
      kept.append(line)
    if _under(self.min_num_sentences, sentences):
      return "too_few_sentences", None
    new_text = "\n".join(kept).strip()
    return None, (new_text if self.rewrite_lines and new_text != doc.text else None)


@dataclasses.dataclass(frozen=True)
class C4BadWords:
  """C4's page filter on a list of bad words (Raffel et al. 2020 used LDNOOBW's English list).

  The list is not bundled (datatrove downloads it at run time; we download nothing): give `words`
  or `words_file` (one word or phrase a line). Matching is case-insensitive on word boundaries.
  """
  name: ClassVar[str] = "c4_bad_words"
  words: tuple[str, ...] = ()
  words_file: str = ""

  def __post_init__(self):
    words = list(self.words)
    if self.words_file:
      with open(self.words_file, encoding="utf-8") as f:
        words += [w.strip() for w in f if w.strip()]
    if not words:
      raise ValueError("needs `words` or `words_file` (the list is not bundled)")
    pattern = r"(?<!\w)(?:" + "|".join(sorted(map(re.escape, {w.lower() for w in words}))) + r")(?!\w)"
    object.__setattr__(self, "_re", re.compile(pattern))

  def apply(self, doc: DocText) -> Decision:
    return ("bad_words", None) if self._re.search(doc.text.lower()) else KEEP


@dataclasses.dataclass(frozen=True)
class FineWebQuality:
  """FineWeb's own rules (Penedo et al. 2024, 3.5; datatrove FineWebQualityFilter defaults).

  Over non-blank lines: remove if fewer than 12% end in terminal punctuation, more than 67% are
  at most 30 characters, or duplicated lines hold more than 1% of the characters (newlines not
  counted); remove if there are more than 0.3 newlines per word (list-like pages).
  """
  name: ClassVar[str] = "fineweb"
  line_punct_thr: Optional[float] = 0.12
  line_punct_exclude_zero: bool = False
  short_line_thr: Optional[float] = 0.67
  short_line_length: int = 30
  char_duplicates_ratio: Optional[float] = 0.01
  new_line_ratio: Optional[float] = 0.3

  def apply(self, doc: DocText) -> Decision:
    lines = [line for line in doc.text.split("\n") if line.strip()]
    if not lines:
      return "empty", None
    ratio = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
    if _under(self.line_punct_thr, ratio) and not (ratio == 0 and self.line_punct_exclude_zero):
      return "line_punct_ratio", None
    ratio = sum(len(line) <= self.short_line_length for line in lines) / len(lines)
    if _over(self.short_line_thr, ratio):
      return "short_line_ratio", None
    if _over(self.char_duplicates_ratio,
             _duplicates(lines)[1] / max(1, len(doc.text.replace("\n", "")))):
      return "char_dup_ratio", None
    if _over(self.new_line_ratio, doc.text.count("\n") / max(1, len(doc.words))):
      return "list_ratio", None
    return KEEP


HEURISTIC_RULES = {cls.name: cls for cls in (GopherQuality, GopherRepetition, C4Quality,
                                             C4BadWords, FineWebQuality)}
