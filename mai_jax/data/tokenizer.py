"""Tokenizers: a small interface, its SentencePiece implementation, and training one on the corpus.

Why a byte-fallback BPE SentencePiece model with identity normalization: the default corpus is
source code, where indentation and newlines carry meaning, so the tokenizer must round-trip every
string exactly (no NFKC, no collapsing of spaces, no dummy prefix), and byte fallback means any
text, including characters never seen in training, encodes without <unk>.
`allow_whitespace_only_pieces` lets runs of indentation become single tokens (3.4 characters per
token on the stdlib at vocab 4096 instead of 2.2 without it); digits are split one per token, as in
Llama's tokenizer.

A run's tokenizer lives in WORKDIR/tokenizer.model, next to its checkpoints, so resuming reuses the
exact same ids. `content_hash` (sha256 of the model file) lets other modules (checkpoints, token
caches) notice a tokenizer swapped underneath them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from mai_jax.config import Config, ConfigError
from mai_jax.data import sources, tokenizer_files
from mai_jax.data.tokenizer_base import (TRAIN_PIECE_CHARS, Tokenizer, TokenizerError,
                                         training_pieces)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizer brought with imported weights

# SentencePiece skips training "sentences" longer than max_sentence_length bytes; the pieces
# training_pieces cuts are at most TRAIN_PIECE_CHARS characters (4 bytes per char worst case).
_MAX_SENTENCE_BYTES = 4 * TRAIN_PIECE_CHARS + 16
# The trainer's thread count is recorded in the model file; a constant keeps the file (and its
# content_hash) identical whatever machine trained it. The learned pieces do not depend on it.
_TRAIN_THREADS = 4


class SentencePieceTokenizer:
  """A SentencePiece model file behind the `Tokenizer` interface.

  Picklable (by its serialized model) so grain's multiprocessing workers can tokenize.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise TokenizerError(f"tokenizer file {path!r} not found; set data.tokenizer_path to an "
                           f"existing SentencePiece .model or leave it empty to train one")
    with open(path, "rb") as f:
      proto = f.read()
    self._init(path, proto)

  def _init(self, path: str, proto: bytes):
    self.path = path
    self._proto = proto
    self.content_hash = hashlib.sha256(proto).hexdigest()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    self.vocab_size = self._sp.get_piece_size()
    # Models without a pad piece (e.g. Llama's) pad with 0: padded positions have segment id 0
    # and are masked out of the loss, so any valid id works.
    self.pad_id = max(self._sp.pad_id(), 0)
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()

  def __getstate__(self):
    return {"path": self.path, "proto": self._proto}

  def __setstate__(self, state):
    self._init(state["path"], state["proto"])

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.content_hash[:12]})")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))


def load_tokenizer(path: str, pattern: str = "") -> Tokenizer:
  """The tokenizer file at `path` by its kind: SentencePiece `.model`, Hugging Face `.json`,
  anything else a tiktoken rank file (split by `pattern`, default cl100k's)."""
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return tokenizer_files.HFTokenizer(path)
  return tokenizer_files.TiktokenTokenizer(path, pattern)


RECORD_FILE = "tokenizer_record.json"  # not tokenizer.json: that is a HF tokenizer's name


def check_tokenizer_record(workdir: str, tok: Tokenizer, *, write: bool = True) -> None:
  """WORKDIR/tokenizer_record.json records the run's tokenizer (path + sha256); a resumed run with a
  different one (other ids for the same text) is refused. `write`: record it when absent (process
  0 only)."""
  path = os.path.join(workdir, RECORD_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
    if record.get("sha256") != tok.content_hash:
      raise TokenizerError(
          f"{workdir} was started with tokenizer {record.get('path')} (sha256 "
          f"{str(record.get('sha256'))[:12]}) but this run's tokenizer is {tok.path} (sha256 "
          f"{tok.content_hash[:12]}); set data.tokenizer_path back to it or use a fresh --workdir")
  elif write:
    os.makedirs(workdir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"path": tok.path, "sha256": tok.content_hash, "kind": type(tok).__name__,
                 "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                 "pad_id": tok.pad_id}, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Training


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str,
                        max_chars: int) -> str:
  """Trains a byte-fallback BPE model on at most `max_chars` characters of `texts`.

  Writes MODEL_PREFIX.model atomically (temporary name, then rename) and returns its path.
  Deterministic: the same texts give a byte-identical file (the trainer gets no output path or
  thread-dependent setting that would be recorded in it), so content_hash is reproducible. The
  trainer reads an in-memory iterator and returns the model in memory: no temporary corpus file.
  If the corpus is too small to learn `vocab_size` pieces, the model is padded with unused pieces
  (never produced by encode) so that it has exactly `vocab_size` pieces.
  Time: 0.6-1.5 s for 4M characters at vocab 4096 on 2 (busy) CPU cores; 4 s for 12M at 8192.
  """
  if vocab_size < 4 + 256 + 1:
    raise ConfigError(f"model.vocab_size={vocab_size} is too small for a byte-fallback tokenizer: "
                      f"it needs 4 special + 256 byte pieces plus learned ones; use >= 512")
  pieces = training_pieces(texts, max_chars)
  first = next(pieces, None)
  if first is None:
    raise TokenizerError(f"no text to train the tokenizer {model_prefix}.model on "
                         f"(max_chars={max_chars}); raise data.tokenizer_train_chars")

  def all_pieces():
    yield first
    yield from pieces

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=all_pieces(), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES, input_sentence_size=0,
        shuffle_input_sentence=False, hard_vocab_limit=False, num_threads=_TRAIN_THREADS,
        minloglevel=2)
  except RuntimeError as e:
    raise TokenizerError(f"SentencePiece could not train {model_prefix}.model with vocab_size="
                         f"{vocab_size} on {max_chars} characters: {e}") from None
  proto = _pad_vocab(model.getvalue(), vocab_size)
  path = model_prefix + ".model"
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(proto)
  os.replace(tmp, path)  # atomic: readers see no file or a whole one
  return path


def _pad_vocab(proto: bytes, vocab_size: int) -> bytes:
  """Appends UNUSED pieces until the model has exactly `vocab_size` pieces (a small corpus can
  support fewer merges than asked for; the model's embedding table still wants vocab_size rows)."""
  have = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
  if have == vocab_size:
    return proto
  if have > vocab_size:  # SentencePiece never does this; guard against a silent mismatch.
    raise TokenizerError(f"SentencePiece trained {have} pieces but model.vocab_size={vocab_size}")
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only on this rare path
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(proto)
  existing = {p.piece for p in model.pieces}
  n = 0
  while len(model.pieces) < vocab_size:
    name = f"<unused_{n}>"
    n += 1
    if name not in existing:
      piece = model.pieces.add()
      piece.piece, piece.score = name, 0.0
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
  return model.SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------------------------
# Run-level entry point


def load_or_train_tokenizer(cfg: Config, workdir: str, *, process_index: int = 0,
                            source_root: str | None = None) -> Tokenizer:
  """The tokenizer of a run, by priority:

  1. `data.tokenizer_path` when set;
  2. WORKDIR/tokenizer.model, else WORKDIR/tokenizer.json, when it exists (a resumed run reuses
     its tokenizer; a run started from existing weights gets theirs copied there, see
     train/init_from.py);
  3. otherwise a new one trained on the training split (never validation, so eval text stays
     unseen) and saved atomically to WORKDIR/tokenizer.model.

  Multi-host: only process 0 trains. Callers must run this on process 0 first, wait for it (e.g.
  a barrier such as `multihost_utils.sync_global_devices`), then call it on the other processes,
  which load the file process 0 wrote; a non-zero process that finds no file raises.
  Its vocabulary must have exactly `model.vocab_size` entries. `source_root` is passed to
  sources.load_split (tests use it to read a temporary folder).
  """
  vocab_size = cfg.model.vocab_size
  if cfg.data.tokenizer_path:
    return _checked(load_tokenizer(cfg.data.tokenizer_path, cfg.data.tokenizer_pattern), vocab_size,
                    "data.tokenizer_path", "")
  path = os.path.join(workdir, TOKENIZER_FILE)
  for existing in (path, os.path.join(workdir, HF_TOKENIZER_FILE)):
    if os.path.exists(existing):
      return _checked(load_tokenizer(existing), vocab_size, "the workdir's tokenizer",
                      " (the run was started with it) or use a fresh --workdir")
  if process_index != 0:
    raise TokenizerError(f"process {process_index}: {path} does not exist; process 0 trains the "
                         f"tokenizer, so call load_or_train_tokenizer on process 0 first and "
                         f"synchronize before the other processes call it")
  os.makedirs(workdir, exist_ok=True)
  train_sentencepiece(training_texts(cfg, source_root), vocab_size, path[:-len(".model")],
                      cfg.data.tokenizer_train_chars)
  return _checked(SentencePieceTokenizer(path), vocab_size, "the trained tokenizer", "")


def training_texts(cfg: Config, source_root: str | None = None) -> Iterator[str]:
  """The train documents of every configured source in a hash order, not path order, so a
  character budget smaller than the corpus samples every package (and every source)."""
  if any(s.kind == "cache" for s in sources.source_specs(cfg.data)):
    raise TokenizerError("data.sources are token caches, which hold no text to train a tokenizer "
                         "on; set data.tokenizer_path to the tokenizer the caches were made with")
  splits = sources.load_splits(cfg.data, "train", root=source_root)
  order = sorted(((k, i) for k, docs in enumerate(splits) for i in range(len(docs))),
                 key=lambda ki: sources.split_fraction("tok:" + splits[ki[0]].doc_ids[ki[1]]))
  return (splits[k][i] for k, i in order)


def _checked(tok: Tokenizer, vocab_size: int, what: str, alternative: str) -> Tokenizer:
  """The model's embedding has model.vocab_size rows; a tokenizer of another size would either
  leave rows untrained or produce ids out of range, so sizes must match exactly."""
  if tok.vocab_size != vocab_size:
    raise TokenizerError(f"{what} {tok.path} has {tok.vocab_size} pieces but model.vocab_size="
                         f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size}"
                         f"{alternative}")
  if tok.bos_id < 0 or tok.eos_id < 0:
    raise TokenizerError(f"{tok.path} defines no bos/eos ids (bos={tok.bos_id}, eos={tok.eos_id}); "
                         f"the pipeline frames every document with them, so use a model that has "
                         f"both (train_sentencepiece sets bos_id={BOS_ID}, eos_id={EOS_ID})")
  return tok
