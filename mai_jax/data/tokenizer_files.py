"""Tokenizer files made by other libraries, behind the same `Tokenizer` interface: Hugging Face
`tokenizer.json` (the `tokenizers` package) and tiktoken-format BPE rank files read from a local
path (never downloaded), plus training a byte-level BPE tokenizer.json.

Both classes are picklable (by the file's bytes) so grain worker processes can tokenize, and
expose `content_hash` so runs and token caches notice a different tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Iterable, Sequence

from mai_jax.data.tokenizer_base import TokenizerError, training_pieces

# Special tokens looked up in a tokenizer.json / added to a tiktoken rank file, first match wins.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
# cl100k_base's split pattern (tiktoken's own, written out: nothing is downloaded).
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                  r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
TIKTOKEN_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")


def _read_bytes(path: str, what: str) -> bytes:
  if not os.path.isfile(path):
    raise TokenizerError(f"tokenizer file {path!r} not found; set data.tokenizer_path to an "
                         f"existing {what}")
  with open(path, "rb") as f:
    return f.read()


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` package) behind the `Tokenizer` interface.

  bos/eos/pad are those the model directory declares beside the file (tokenizer_config.json,
  generation_config.json, config.json: what an imported checkpoint brings), else the first of the
  usual special-token names the file defines (`<s>`, `<|begin_of_text|>`, ...); pad falls back to
  eos (padding is masked by segment id 0 anyway); -1 means none."""

  def __init__(self, path: str):
    self._init(path, _read_bytes(path, "tokenizer.json"))

  def _init(self, path: str, raw: bytes):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path, self._raw = path, raw
    self.content_hash = hashlib.sha256(raw).hexdigest()
    try:
      self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the package raises plain Exceptions for malformed files
      raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    declared = _declared_specials(os.path.dirname(os.path.abspath(path)), self._tok)
    ids = lambda names: [i for i in map(self._tok.token_to_id, names) if i is not None]
    bos, eos, pad = ids(_BOS_NAMES), ids(_EOS_NAMES), ids(_PAD_NAMES)
    self.bos_id = declared.get("bos", bos[0] if bos else -1)
    self.eos_id = declared.get("eos", eos[0] if eos else -1)
    self.pad_id = declared.get("pad", pad[0] if pad else max(self.eos_id, 0))
    # Ids of the file's special tokens (<unk>, <s>, ...): what HF's skip_special_tokens drops.
    self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items()
                                 if t.special)

  def __getstate__(self):
    return {"path": self.path, "raw": self._raw}

  def __setstate__(self, state):
    self._init(state["path"], state["raw"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _declared_specials(directory: str, tok) -> dict[str, int]:
  """bos/eos/pad ids a model directory declares beside its tokenizer.json: the token strings of
  tokenizer_config.json (`bos_token`, or {"content": ...}), else the ids of generation_config.json /
  config.json (`eos_token_id`; Llama 3 lists several, the first ends a turn)."""
  def read(name):
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      return {}
    with open(file) as f:
      try:
        return json.load(f)
      except ValueError:
        raise TokenizerError(f"{file} is not valid JSON") from None

  settings = read("tokenizer_config.json")
  ids_cfg = {**read("config.json"), **read("generation_config.json")}
  out = {}
  for kind in ("bos", "eos", "pad"):
    token = settings.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    token_id = tok.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
      token_id = ids_cfg.get(f"{kind}_token_id")
      token_id = (token_id[0] if token_id else None) if isinstance(token_id, list) else token_id
    if isinstance(token_id, int):
      out[kind] = token_id
  return out


class TiktokenTokenizer:
  """A tiktoken-format BPE rank file (`base64(token) rank` per line) read from a local path and
  built into a `tiktoken.Encoding` with `pattern` (never downloaded). The three specials
  <|bos|>, <|eos|>, <|pad|> get the ids right after the ranks; special-looking text in documents
  is encoded as ordinary text."""

  def __init__(self, path: str, pattern: str = ""):
    self._init(path, _read_bytes(path, "tiktoken rank file"), pattern or CL100K_PATTERN)

  def _init(self, path: str, raw: bytes, pattern: str):
    import tiktoken  # pylint: disable=import-outside-toplevel
    self.path, self._raw, self._pattern = path, raw, pattern
    self.content_hash = hashlib.sha256(raw + b"\0" + pattern.encode()).hexdigest()
    try:
      ranks = {base64.b64decode(token): int(rank)
               for token, rank in (line.split() for line in raw.splitlines() if line.strip())}
    except ValueError as e:
      raise TokenizerError(f"{path}: not a tiktoken rank file ('base64 rank' per line): "
                           f"{e}") from None
    n = max(ranks.values()) + 1 if ranks else 0
    specials = {name: n + i for i, name in enumerate(TIKTOKEN_SPECIALS)}
    self._enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern,
                                  mergeable_ranks=ranks, special_tokens=specials)
    self.vocab_size = n + len(specials)
    self.bos_id, self.eos_id, self.pad_id = (specials[s] for s in TIKTOKEN_SPECIALS)

  def __getstate__(self):
    return {"path": self.path, "raw": self._raw, "pattern": self._pattern}

  def __setstate__(self, state):
    self._init(state["path"], state["raw"], state["pattern"])

  def __repr__(self) -> str:
    return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_ordinary_batch(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])


def train_hf_bpe(texts: Iterable[str], vocab_size: int, path: str, max_chars: int) -> str:
  """Trains a byte-level BPE tokenizer.json (Hugging Face `tokenizers`) on at most `max_chars`
  characters; specials <pad>=0, <s>=1, </s>=2; exactly `vocab_size` entries. Written atomically;
  returns `path`."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      decoders, models, pre_tokenizers, trainers)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(training_pieces(texts, max_chars), trainer=trainer)
  # A small corpus supports fewer merges than asked for; like train_sentencepiece, fill the
  # vocabulary with never-produced tokens so it has exactly vocab_size entries.
  missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
  if missing > 0:
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(missing)])
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)
  return path
