"""What every tokenizer kind shares (SentencePiece in tokenizer.py; Hugging Face and tiktoken
files in tokenizer_files.py): the interface the pipeline, evaluation and sampling use, its error,
and how training text is cut into pieces for a tokenizer trainer."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

from mai_jax.config import ConfigError

# Tokenizer trainers get documents in pieces of at most this many characters, cut at line ends
# (SentencePiece skips longer training "sentences").
TRAIN_PIECE_CHARS = 2048


class TokenizerError(ConfigError):
  """A tokenizer file is missing or does not fit the config; the message says which and the fix."""


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, evaluation and sampling need from a tokenizer."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  path: str
  content_hash: str

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; decode(encode(t)) == t for any string t."""


def training_pieces(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Yields pieces of at most TRAIN_PIECE_CHARS characters, cut at line ends (a longer line is
  cut inside), `max_chars` characters in all. Newlines stay in the pieces so the model learns
  tokens such as '):\\n'."""
  budget = max_chars
  for text in texts:
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
      while line:
        if size + len(line) > TRAIN_PIECE_CHARS and piece:
          joined = "".join(piece)
          if len(joined) > budget:
            return
          budget -= len(joined)
          yield joined
          piece, size = [], 0
        head, line = line[:TRAIN_PIECE_CHARS], line[TRAIN_PIECE_CHARS:]
        piece.append(head)
        size += len(head)
    if piece:
      joined = "".join(piece)
      if len(joined) > budget:
        return
      budget -= len(joined)
      yield joined
