"""The special tokens a chat template writes, and adding those a tokenizer lacks.

Why: a tokenizer trained on plain text (or a base model's) spells `<|im_end|>` as several pieces,
so the model must learn a multi-token end of turn, the loss mask may cut a marker in two, and a
user who types the marker's text gets the marker. A fine-tuning run therefore adds the template's
markers to its tokenizer as single, never-split tokens, appended after the existing ids (so every
old id keeps its meaning and its embedding row), the way SentencePiece user-defined symbols and
Hugging Face added tokens work; train/init_from.py then grows the embeddings to match.

The markers of a template: ChatML's <|im_start|> and <|im_end|>; for a Jinja template, the special
tokens declared beside it (bos_token, eos_token, ...) and every `<|...|>` literal in its source
(Llama 3's <|start_header_id|>, Phi's <|user|>, ...). A token already in the vocabulary is not
added again. tiktoken rank files cannot take new tokens: the markers stay multi-token there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Sequence

from mai_jax.data.chat_template import ChatTemplate
from mai_jax.data.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, SentencePieceTokenizer
from mai_jax.data.tokenizer_base import Tokenizer, TokenizerError
from mai_jax.data.tokenizer_files import HFTokenizer

_MARKER = re.compile(r"<\|[A-Za-z0-9_.:/-]+\|>")
_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
# Files that declare a Hugging Face tokenizer's special tokens, kept beside an extended copy.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def template_tokens(template: ChatTemplate) -> tuple[str, ...]:
  """The template's special tokens, in first-appearance order, without duplicates."""
  found = list(_CHATML_MARKERS) if template.name == "chatml" else []
  found += [v for _, v in template.special_tokens if v]
  found += _MARKER.findall(template.source)
  return tuple(dict.fromkeys(found))


def _known(tokenizer: Tokenizer, token: str) -> bool:
  """The token is a piece of the vocabulary already (whether or not text encodes to it)."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    return tokenizer._sp.piece_to_id(token) != tokenizer._sp.unk_id() or (  # pylint: disable=protected-access
        token == tokenizer.id_to_piece(tokenizer._sp.unk_id()))  # pylint: disable=protected-access
  if isinstance(tokenizer, HFTokenizer):
    return tokenizer._tok.token_to_id(token) is not None  # pylint: disable=protected-access
  return len(tokenizer.encode(token)) == 1


def missing_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> list[str]:
  """The tokens the tokenizer's vocabulary lacks."""
  return [t for t in tokens if not _known(tokenizer, t)]


def can_add(tokenizer: Tokenizer) -> bool:
  return isinstance(tokenizer, (SentencePieceTokenizer, HFTokenizer))


def added_at_end(tokenizer: Tokenizer, base_vocab: int, tokens: Sequence[str]) -> bool:
  """The ids from `base_vocab` on are exactly tokens of `tokens` (a tokenizer this module
  extended from one of `base_vocab` entries)."""
  extra = range(base_vocab, tokenizer.vocab_size)
  return (0 < len(extra) <= len(tokens)
          and all(tokenizer.decode([i]) in tokens for i in extra))


def add_tokens(tokenizer: Tokenizer, tokens: Sequence[str], out_dir: str) -> Tokenizer:
  """A copy of `tokenizer` with `tokens` appended as unsplittable tokens (ids vocab_size, ...),
  written to out_dir/tokenizer.model or out_dir/tokenizer.json (with the side files of a HF
  tokenizer copied along). Deterministic: the same inputs give byte-identical files, so a
  resumed run re-extending the same tokenizer gets the same content hash."""
  os.makedirs(out_dir, exist_ok=True)
  if isinstance(tokenizer, SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tokenizer._proto)  # pylint: disable=protected-access
    for token in tokens:
      piece = model.pieces.add()
      piece.piece, piece.score = token, 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    path = os.path.join(out_dir, TOKENIZER_FILE)
    _write(path, model.SerializeToString(deterministic=True))
    return SentencePieceTokenizer(path)
  if isinstance(tokenizer, HFTokenizer):
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer.from_str(tokenizer._raw.decode("utf-8"))  # pylint: disable=protected-access
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in tokens])
    source_dir = os.path.dirname(os.path.abspath(tokenizer.path))
    for name in SIDE_FILES:
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
    path = os.path.join(out_dir, HF_TOKENIZER_FILE)
    _write(path, tok.to_str().encode("utf-8"))
    return HFTokenizer(path)
  raise TokenizerError(f"{tokenizer.path}: a {type(tokenizer).__name__} cannot take new tokens "
                       f"({', '.join(tokens)}); use a SentencePiece or Hugging Face tokenizer")


def _write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def extension_id(tokenizer: Tokenizer, tokens: Sequence[str]) -> str:
  """A short name for (base tokenizer, added tokens), e.g. for a staging folder."""
  return hashlib.sha256(json.dumps([tokenizer.content_hash, list(tokens)]).encode()
                        ).hexdigest()[:12]
