"""File formats: which files a source entry names, and the documents inside each file.

Every reader yields `(doc_id, text, reason)` per document: `text` is the document, or None with a
`reason` ('invalid UTF-8', 'binary', 'empty', 'invalid JSON', 'no text field', 'unreadable ...')
when it cannot be used. Bad data is never an exception: a crawl always holds some, and one bad
record must not stop a run; callers count the reasons (`data/skipped_*` metrics). Document ids are
stable (path relative to the source's base folder, `:N` for the N-th record of a file), so the
train/validation split, a pure function of the id, does not move when other files come or go.

Formats (SourceSpec.kind):
  text         one document per file (a folder, a single file, or a glob such as 'web/**/*.txt')
  jsonl        one JSON object per line; the document is its `field` (default 'text'); other keys
               (provenance of synthetic data, urls, ...) are ignored
  parquet      one document per row of column `field` (default 'text'), read in record batches
  arrayrecord  one document per record: UTF-8 text, or a JSON object's `field` when field is set
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Iterator, Optional

from mai_jax.config import ConfigError

Document = tuple[str, Optional[str], str]  # (doc_id, text or None, reason when None)

# Documents longer than this many characters are cut into pieces (`split_long`), so one enormous
# record (a log dump, a minified bundle) never holds a tokenizer worker for minutes.
MAX_DOC_CHARS = 1_000_000
_GLOB_CHARS = "*?["


def decode_text(raw: bytes) -> tuple[Optional[str], str]:
  """bytes -> (text, "") or (None, reason) for bytes that are not usable text."""
  if b"\0" in raw:
    return None, "binary"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None, "invalid UTF-8"
  if not text.strip():
    return None, "empty"
  return text, ""


def _unreadable(e: BaseException) -> str:
  return f"unreadable ({type(e).__name__})"


def source_files(path: str) -> tuple[str, list[str]]:
  """(base folder, sorted relative paths) of the files `path` names: a file, a folder (every file
  under it) or a glob ('**' recursive). Sorted so every host lists the same files in one order."""
  path = os.path.expanduser(path)
  if any(c in path for c in _GLOB_CHARS):
    parts = path.split(os.sep)
    static = [p for p in parts[:next(i for i, p in enumerate(parts)
                                     if any(c in p for c in _GLOB_CHARS))]]
    base = os.sep.join(static) or "."
    files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
  elif os.path.isdir(path):
    base = path
    # Regular files and (possibly dangling) links only: opening a FIFO or device would block.
    files = [p for folder, _, names in os.walk(path) for p in
             (os.path.join(folder, n) for n in names) if os.path.isfile(p) or os.path.islink(p)]
  elif os.path.exists(path) or os.path.islink(path):
    base, files = os.path.dirname(path) or ".", [path]
  else:
    return path, []
  return base, sorted(os.path.relpath(f, base).replace(os.sep, "/") for f in files)


def file_fingerprint(path: str) -> dict:
  """{'size', 'sha256'} of a file (recorded in token-cache manifests); {'error'} if unreadable."""
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
  except OSError as e:
    return {"error": _unreadable(e)}


def read_file_documents(kind: str, field: str, base: str, rel: str) -> Iterator[Document]:
  """The documents of one file of a source of `kind`, long ones cut into pieces."""
  path = os.path.join(base, rel)
  try:
    for doc_id, text, reason in _READERS[kind](path, rel, field):
      if text is not None and len(text) > MAX_DOC_CHARS:
        for p, start in enumerate(range(0, len(text), MAX_DOC_CHARS)):
          yield f"{doc_id}#{p}", text[start:start + MAX_DOC_CHARS], ""
        yield doc_id, None, "split_long"  # counted, the pieces above carry the text
      else:
        yield doc_id, text, reason
  except ConfigError:
    raise
  except Exception as e:  # a corrupt file (truncated parquet, bad array_record) is bad data
    yield rel, None, _unreadable(e)


def _text_file(path: str, rel: str, field: str) -> Iterator[Document]:
  del field
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    yield rel, None, _unreadable(e)
    return
  text, reason = decode_text(raw)
  yield rel, text, reason


def _json_text(raw: bytes, field: str) -> tuple[Optional[str], str]:
  try:
    record = json.loads(raw)
  except UnicodeDecodeError:
    return None, "invalid UTF-8"
  except ValueError:
    return None, "invalid JSON"
  value = record.get(field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    return None, "no text field"
  return (value, "") if value.strip() else (None, "empty")


def _jsonl_file(path: str, rel: str, field: str) -> Iterator[Document]:
  try:
    f = open(path, "rb")
  except OSError as e:
    yield rel, None, _unreadable(e)
    return
  with f:
    for n, line in enumerate(f):
      if line.strip():
        yield (f"{rel}:{n}", *_json_text(line, field or "text"))


def _parquet_file(path: str, rel: str, field: str) -> Iterator[Document]:
  import pyarrow.parquet as pq  # only sources of this kind need pyarrow
  column = field or "text"
  parquet = pq.ParquetFile(path)
  if column not in parquet.schema_arrow.names:
    raise ConfigError(f"{path}: no column {column!r} (columns: "
                      f"{', '.join(parquet.schema_arrow.names)}); set the source's 'field'")
  n = 0
  for batch in parquet.iter_batches(columns=[column], batch_size=1024):
    for value in batch.column(0).to_pylist():
      if isinstance(value, bytes):
        value, reason = decode_text(value)
      else:
        reason = "" if isinstance(value, str) and value.strip() else "empty"
      yield f"{rel}:{n}", (value if not reason else None), reason
      n += 1


def _arrayrecord_file(path: str, rel: str, field: str) -> Iterator[Document]:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    total = reader.num_records()
    for start in range(0, total, 1024):
      for n, raw in enumerate(reader.read(range(start, min(start + 1024, total))), start):
        yield (f"{rel}:{n}", *(_json_text(raw, field) if field else decode_text(raw)))
  finally:
    reader.close()


_READERS = {"text": _text_file, "jsonl": _jsonl_file, "parquet": _parquet_file,
            "arrayrecord": _arrayrecord_file}
FILE_KINDS = tuple(_READERS)
