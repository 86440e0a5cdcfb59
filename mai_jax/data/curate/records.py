"""Input records with their provenance, and the output shards `mai-jax data tokenize` reads.

Input kinds: `jsonl` (one object a line; the document is `field`, default 'text', and every other
key is kept as provenance: generator, prompt_id, seed, url, ...), `parquet` (column `field`, other
columns kept), `text` (one document per file). Records that cannot be used are yielded with text
None and a reason ('invalid UTF-8', 'binary', 'invalid JSON', 'no text field', 'empty',
'unreadable ...') and counted, never raised.

Output: OUT/data/part-NNNNN.jsonl (one object a line: id, source, text, meta) or .parquet (the
same columns, meta as a JSON string), at most `shard_docs` documents a shard, in priority order.
Both are deterministic bytes for the same input and config. Train from them with a data source
{'kind': 'jsonl', 'path': 'OUT/data/*.jsonl'} (or 'parquet'); the text field is 'text'.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

from mai_jax.data import readers

Record = tuple[str, Optional[str], dict, str]  # (doc id, text or None, meta, reason when None)
INPUT_KINDS = ("jsonl", "parquet", "text")


def _jsonl_records(path: str, rel: str, field: str) -> Iterator[Record]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f):
      if not raw.strip():
        continue
      doc_id = f"{rel}:{n}"
      if b"\0" in raw:
        yield doc_id, None, {}, "binary"
        continue
      try:
        record = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        yield doc_id, None, {}, "invalid UTF-8"
        continue
      except ValueError:
        yield doc_id, None, {}, "invalid JSON"
        continue
      text = record.get(field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        yield doc_id, None, {}, "no text field"
      elif not text.strip():
        yield doc_id, None, {}, "empty"
      else:
        yield doc_id, text, {k: v for k, v in record.items() if k != field}, ""


def _parquet_records(path: str, rel: str, field: str) -> Iterator[Record]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  n = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    rows = batch.to_pylist()
    for row in rows:
      doc_id, value = f"{rel}:{n}", row.pop(field, None)
      n += 1
      reason = ""
      if isinstance(value, bytes):
        value, reason = readers.decode_text(value)
      elif not isinstance(value, str):
        reason = "no text field"
      elif not value.strip():
        reason = "empty"
      if reason:
        yield doc_id, None, {}, reason
      else:
        yield doc_id, value, {k: v for k, v in row.items() if _jsonable(v)}, ""


def _jsonable(value) -> bool:
  return isinstance(value, (str, int, float, bool, list, dict)) or value is None


def _text_records(path: str, rel: str, field: str) -> Iterator[Record]:
  del field
  with open(path, "rb") as f:
    text, reason = readers.decode_text(f.read())
  yield rel, text, {}, reason


_READERS = {"jsonl": _jsonl_records, "parquet": _parquet_records, "text": _text_records}


def read_records(kind: str, field: str, base: str, rel: str) -> Iterator[Record]:
  """Every record of one file; an unreadable or corrupt file is one record with a reason."""
  try:
    yield from _READERS[kind](os.path.join(base, rel), rel, field or "text")
  except Exception as e:  # pylint: disable=broad-except  (a corrupt file is bad data)
    yield rel, None, {}, f"unreadable ({type(e).__name__})"


class ShardWriter:
  """Writes output records to OUT/data/part-NNNNN.{jsonl,parquet}, `shard_docs` per shard."""

  def __init__(self, folder: str, fmt: str, shard_docs: int):
    self.folder, self.fmt, self.shard_docs = folder, fmt, shard_docs
    self.buffer: list[dict] = []
    self.paths: list[str] = []
    os.makedirs(folder, exist_ok=True)

  def add(self, record: dict) -> None:
    self.buffer.append(record)
    if len(self.buffer) >= self.shard_docs:
      self.flush()

  def flush(self) -> None:
    if not self.buffer:
      return
    path = os.path.join(self.folder, shard_name(len(self.paths), self.fmt))
    write_shard(path, self.fmt, self.buffer)
    self.paths.append(path)
    self.buffer = []


def shard_name(number: int, fmt: str) -> str:
  return f"part-{number:05d}.{fmt}"


def write_shard(path: str, fmt: str, rows: list[dict]) -> None:
  """One output shard; the same bytes for the same rows whoever writes it (the local engine's
  ShardWriter, or a Ray task of the Ray engine)."""
  if fmt == "jsonl":
    with open(path, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
  else:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    table = pa.table({
        "id": [r["id"] for r in rows], "source": [r["source"] for r in rows],
        "text": [r["text"] for r in rows],
        "meta": [json.dumps(r["meta"], ensure_ascii=False, sort_keys=True) for r in rows]})
    pq.write_table(table, path, compression="zstd")
