"""Token cache: a source pre-tokenized into tensorstore zarr3 arrays, read in random windows.

Layout of a cache folder (one per source, written by `mai-jax data tokenize`):

  train/tokens        int32 [N]      every train document as [bos] + ids + [eos], concatenated
  train/offsets       int64 [D + 1]  document d is tokens[offsets[d]:offsets[d + 1]] (ragged, as in
                                     Levanter's jagged store)
  validation/...      the same for the validation split (split by document-id hash, as raw sources)
  manifest.json       tokenizer (path, sha256, special ids), source entry, every input file with
                      size and sha256, token/document counts, skipped-record counts
  shards/             per-shard results while writing; deleted once the manifest exists

Why this shape: a flat token array makes "the tokens of window w" one contiguous read, whatever
the documents, so a training row costs one read (reads are issued together and waited on once:
batched futures are ~7x faster than one read at a time). Token arrays use 1M-token storage shards
holding 4096-token read chunks, so few files exist yet a random window reads ~16 KB, not 4 MB.

Writing is resumable: the input files are cut into shards, each tokenized (in parallel threads)
into `shards/NNNNN.npz` plus a `.json` marker written after it; a rerun keeps every shard whose
marker matches (same files, same tokenizer) and tokenizes only the rest. The arrays are then
(re)written from the shards and `manifest.json` goes last, atomically: a folder without a
manifest is an unfinished cache, and `open_cache` refuses it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np
import tensorstore as ts

from mai_jax import config as config_lib
from mai_jax.data import readers, sources
from mai_jax.data.sources import SourceError, SourceSpec
from mai_jax.data.tokenizer import Tokenizer

FORMAT = "mai_jax.token_cache.v1"
MANIFEST = "manifest.json"
SPLITS = sources.SPLITS
_WRITE_CHUNK = 1 << 20   # tokens per storage shard (one file)
_READ_CHUNK = 4096       # tokens per independently readable chunk inside it
_FILES_PER_SHARD = {"text": 256, "stdlib": 256}  # other kinds: one (large) file per shard


class CacheError(SourceError):
  """A token cache is missing, unfinished or made with another tokenizer; the message says how
  to fix it."""


def _store(path: str, *, dtype=None, shape=None, create: bool = False):
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if not create:
    return ts.open(spec, read=True).result()
  layout = ts.ChunkLayout(read_chunk_shape=[_READ_CHUNK], write_chunk_shape=[_WRITE_CHUNK])
  return ts.open(spec, create=True, delete_existing=True, dtype=dtype, shape=shape,
                 chunk_layout=layout).result()


def write_json(path: str, value: dict) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: readers see no file or a whole one


def tokenizer_record(tokenizer: Tokenizer) -> dict:
  return {"path": tokenizer.path, "sha256": tokenizer.content_hash,
          "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
          "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}


# ----------------------------------------------------------------------------------------------
# Writing


def _shards(spec: SourceSpec, files: list[str]) -> list[list[str]]:
  per = _FILES_PER_SHARD.get(spec.kind, 1)
  return [files[i:i + per] for i in range(0, len(files), per)]


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
  batch = getattr(tokenizer, "encode_batch", None)
  return batch(texts) if batch else [tokenizer.encode(t) for t in texts]


def _tokenize_shard(spec: SourceSpec, base: str, files: list[str], tokenizer: Tokenizer,
                    val_fraction: float, prefix: str) -> dict:
  """Tokenizes one shard's files into PREFIX.npz, then writes PREFIX.json (the done marker)."""
  texts: dict[str, list[str]] = {s: [] for s in SPLITS}
  train_ids: list[str] = []
  skipped: dict[str, int] = {}
  for rel in files:
    for doc_id, text, reason in sources.file_documents(spec, base, rel):
      if text is None:
        skipped[reason] = skipped.get(reason, 0) + 1
      else:
        split = "validation" if sources.split_fraction(doc_id) < val_fraction else "train"
        texts[split].append(text)
        if split == "train":
          train_ids.append(doc_id)
  arrays = {"train_fractions": np.asarray([sources.split_fraction(i) for i in train_ids])}
  for split in SPLITS:
    docs = [np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)
            for ids in _encode_all(tokenizer, texts[split])]
    arrays[f"{split}_lengths"] = np.asarray([len(d) for d in docs], np.int64)
    arrays[f"{split}_tokens"] = np.concatenate(docs) if docs else np.zeros(0, np.int32)
  tmp = f"{prefix}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, prefix + ".npz")
  marker = {"files": files, "tokenizer_sha256": tokenizer.content_hash, "skipped": skipped,
            "fingerprints": {rel: readers.file_fingerprint(os.path.join(base, rel))
                             for rel in files}}
  write_json(prefix + ".json", marker)
  return marker


def _shard_done(prefix: str, files: list[str], tokenizer: Tokenizer) -> Optional[dict]:
  try:
    with open(prefix + ".json") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  ok = (marker.get("files") == files and marker.get("tokenizer_sha256") == tokenizer.content_hash
        and os.path.exists(prefix + ".npz"))
  return marker if ok else None


def _split_docs(prefix: str, split: str, moved: Optional[tuple[int, int]],
                shard: int) -> tuple[np.ndarray, np.ndarray]:
  """(lengths, tokens) of one shard's `split`; `moved` = (shard, train doc) is the document that
  goes to validation when the hash rule left validation empty (as sources.split_indices does)."""
  data = np.load(prefix + ".npz")
  lengths, tokens = data[f"{split}_lengths"], data[f"{split}_tokens"]
  if moved is None or moved[0] != shard:
    return lengths, tokens
  doc = moved[1]
  train_lengths, train_tokens = data["train_lengths"], data["train_tokens"]
  start = int(train_lengths[:doc].sum())
  stop = start + int(train_lengths[doc])
  if split == "validation":  # this shard's own validation is empty, or nothing would move
    return train_lengths[doc:doc + 1], train_tokens[start:stop]
  return (np.delete(train_lengths, doc),
          np.concatenate([train_tokens[:start], train_tokens[stop:]]))


def _moved_document(prefixes: list[str], val_fraction: float) -> Optional[tuple[int, int]]:
  """With val_fraction > 0, validation gets at least the train document of smallest hash, so
  tiny corpora still have something to evaluate (the same rule as sources.split_indices)."""
  if val_fraction <= 0:
    return None
  best, total = None, 0
  for j, prefix in enumerate(prefixes):
    data = np.load(prefix + ".npz")
    if len(data["validation_lengths"]):
      return None
    fractions = data["train_fractions"]
    total += len(fractions)
    if len(fractions) and (best is None or fractions.min() < best[0]):
      best = (float(fractions.min()), j, int(fractions.argmin()))
  return (best[1], best[2]) if best is not None and total >= 2 else None


def _write_split(out_dir: str, split: str, prefixes: list[str],
                 moved: Optional[tuple[int, int]]) -> dict:
  """Concatenates the shards' `split` into OUT/split/{tokens,offsets}; returns its counts."""
  lengths = [_split_docs(p, split, moved, j)[0] for j, p in enumerate(prefixes)]
  offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [np.zeros(0, np.int64)]))])
  num_tokens = int(offsets[-1])
  tokens = _store(os.path.join(out_dir, split, "tokens"), dtype=ts.int32,
                  shape=[max(num_tokens, 1)], create=True)
  pending, buffer, written = [], [], 0
  buffered = 0

  def flush(final: bool):
    nonlocal buffer, buffered, written
    data = np.concatenate(buffer) if buffer else np.zeros(0, np.int32)
    cut = len(data) if final else len(data) // _WRITE_CHUNK * _WRITE_CHUNK
    for start in range(0, cut, _WRITE_CHUNK):  # whole storage shards: one writer per file
      piece = data[start:min(start + _WRITE_CHUNK, cut)]
      pending.append(tokens[written:written + len(piece)].write(piece))
      written += len(piece)
    buffer, buffered = [data[cut:]], len(data) - cut
    while len(pending) > 8:  # bounded memory: at most ~8 shards in flight
      pending.pop(0).result()

  for j, p in enumerate(prefixes):
    chunk = _split_docs(p, split, moved, j)[1]
    buffer.append(chunk)
    buffered += len(chunk)
    if buffered >= _WRITE_CHUNK:
      flush(final=False)
  flush(final=True)
  store = _store(os.path.join(out_dir, split, "offsets"), dtype=ts.int64,
                 shape=[len(offsets)], create=True)
  pending.append(store.write(offsets))
  for f in pending:
    f.result()
  return {"tokens": num_tokens, "documents": len(offsets) - 1}


def tokenize_source(spec: SourceSpec, data: config_lib.DataConfig, tokenizer: Tokenizer,
                    out_dir: str, *, workers: int = 2, root: Optional[str] = None,
                    stop_after_shards: Optional[int] = None,
                    log: Callable[[str], None] = lambda msg: None) -> dict:
  """Pre-tokenizes a raw source into a cache folder OUT_DIR (resuming a partial one); returns
  the manifest. `stop_after_shards` ends early after that many new shards without a manifest
  (tests use it to interrupt)."""
  if spec.kind == "cache":
    raise CacheError(f"source {spec.name!r} is already a token cache")
  base, files = sources.spec_files(spec, data.max_files, root)
  if not files:
    raise SourceError(f"data.sources {spec.name!r}: path {spec.path!r} matches no files")
  start = time.perf_counter()
  shard_dir = os.path.join(out_dir, "shards")
  manifest_path = os.path.join(out_dir, MANIFEST)
  done = _up_to_date(manifest_path, spec, data, tokenizer, base, files)
  if done is not None:
    log(f"{spec.name}: {out_dir} is up to date")
    return done
  os.makedirs(shard_dir, exist_ok=True)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # rewriting: the folder is unfinished until the new manifest lands
  shards = _shards(spec, files)
  prefixes = [os.path.join(shard_dir, f"{i:05d}") for i in range(len(shards))]
  markers = [_shard_done(p, s, tokenizer) for p, s in zip(prefixes, shards)]
  todo = [i for i, m in enumerate(markers) if m is None]
  log(f"{spec.name}: {len(files)} files in {len(shards)} shards, {len(shards) - len(todo)} "
      f"already done")
  if stop_after_shards is not None:
    todo = todo[:stop_after_shards]
  with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
    futures = {pool.submit(_tokenize_shard, spec, base, shards[i], tokenizer, data.val_fraction,
                           prefixes[i]): i for i in todo}
    for future in concurrent.futures.as_completed(futures):
      markers[futures[future]] = future.result()
  if any(m is None for m in markers):
    return {}  # interrupted on purpose: no manifest
  moved = _moved_document(prefixes, data.val_fraction)
  counts = {split: _write_split(out_dir, split, prefixes, moved) for split in SPLITS}
  if not counts["train"]["documents"]:
    raise SourceError(f"data.sources {spec.name!r} yielded no train documents in {len(files)} "
                      f"files; point it at UTF-8 text or the right 'field'")
  skipped: dict[str, int] = {}
  fingerprints = {}
  for m in markers:
    for reason, n in m["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + n
    fingerprints.update(m["fingerprints"])
  manifest = {"format": FORMAT, "tokenizer": tokenizer_record(tokenizer),
              "source": dataclasses.asdict(spec), "base": os.path.abspath(base),
              "val_fraction": data.val_fraction,
              "files": [{"path": rel, **fingerprints[rel]} for rel in files],
              "splits": counts, "skipped": skipped,
              "write_seconds": round(time.perf_counter() - start, 3)}
  write_json(manifest_path, manifest)
  shutil.rmtree(shard_dir, ignore_errors=True)
  log(f"{spec.name}: {counts['train']['tokens']:,} train tokens, "
      f"{counts['validation']['tokens']:,} validation tokens -> {out_dir}")
  return manifest


def _up_to_date(manifest_path: str, spec: SourceSpec, data: config_lib.DataConfig,
                tokenizer: Tokenizer, base: str, files: list[str]) -> Optional[dict]:
  """The existing manifest when it was made from the same files (sizes and sha256), source entry,
  split and tokenizer, so re-running `data tokenize` after a failure skips finished sources."""
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  same = (manifest.get("format") == FORMAT and manifest.get("source") == dataclasses.asdict(spec)
          and manifest.get("val_fraction") == data.val_fraction
          and manifest.get("tokenizer", {}).get("sha256") == tokenizer.content_hash
          and [f.get("path") for f in manifest.get("files", [])] == files)
  if not same:
    return None
  for entry in manifest["files"]:
    if {k: v for k, v in entry.items() if k != "path"} != readers.file_fingerprint(
        os.path.join(base, entry["path"])):
      return None
  return manifest


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class CacheSplit:
  """One split of a cache: the token store and its document offsets (int64 [D + 1], in memory:
  8 bytes per document)."""
  tokens: ts.TensorStore
  offsets: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  def num_windows(self, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens starting every seq_len tokens (they share one token, so
    every token but the first is a target exactly once per pass)."""
    return max((self.num_tokens - 1) // seq_len, 0)

  def read_windows(self, windows: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 [len(windows), seq_len + 1]: all reads are issued first, then waited on."""
    futures = [self.tokens[int(w) * seq_len:int(w) * seq_len + seq_len + 1].read()
               for w in windows]
    out = np.empty((len(windows), seq_len + 1), np.int32)
    for i, f in enumerate(futures):
      out[i] = f.result()
    return out


def open_cache(path: str, tokenizer: Optional[Tokenizer] = None) -> tuple[dict, dict]:
  """(manifest, {split: CacheSplit}) of a finished cache; refuses an unfinished one and one made
  with a different tokenizer than `tokenizer`."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    what = "an unfinished token cache" if os.path.isdir(path) else "not found"
    raise CacheError(f"token cache {path!r}: {what} (no {MANIFEST}); run `mai-jax data tokenize "
                     f"--config ... --out DIR` (it resumes an interrupted run)")
  manifest = config_lib.read_json(manifest_path, "re-run `mai-jax data tokenize` (it rewrites it)")
  found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
  if found != FORMAT:
    raise CacheError(f"token cache {path!r} has format {found!r}, expected "
                     f"{FORMAT!r}; re-run `mai-jax data tokenize`")
  want = manifest["tokenizer"]["sha256"]
  if tokenizer is not None and tokenizer.content_hash != want:
    raise CacheError(f"token cache {path!r} was tokenized with {manifest['tokenizer']['path']} "
                     f"(sha256 {want[:12]}) but this run's tokenizer is {tokenizer.path} (sha256 "
                     f"{tokenizer.content_hash[:12]}); set data.tokenizer_path to the cache's "
                     f"tokenizer or re-tokenize with this one")
  splits = {}
  for split in SPLITS:
    offsets = _store(os.path.join(path, split, "offsets")).read().result()
    splits[split] = CacheSplit(_store(os.path.join(path, split, "tokens")),
                               np.asarray(offsets, np.int64))
  return manifest, splits
