"""Training rows from token caches: row r of global step s is a pure function of (seed, s, r).

Each cache's train split is cut into windows of seq_len + 1 tokens (window w starts at token
w * seq_len); each source's window order is a seeded permutation, repeated forever with a new
permutation per epoch (`MapDataset.range(n).shuffle(seed).repeat()`), and grain's
`MapDataset.mix` interleaves the sources by weight. All of these are random-access, so global row
g = s * B + r is computed directly, never by replaying the stream: each host reads only its own
rows, the iterator state is just the next step (tiny JSON, independent of process count, workers
and mesh), and a 1-process and an N-process run see the same global batch at every step.

Inside a window, segment ids and positions come from the document offsets: a new segment starts
at each document's bos, positions count from the document start (or the window start for a
document that began earlier). The one input position per boundary whose target is the next
document's bos (the eos of the previous document) gets segment 0, so no target crosses a
document, the same guarantee as the packed raw-source pipeline. Windows never need padding; since
windows of different documents are mixed, weights are shares of tokens exactly.

Distillation from a cached teacher (train.distill_cache=NAME) adds each row's teacher top-K
('teacher_ids', 'teacher_logps' [seq_len, K]) from CACHE/distill/NAME, read with the tokens
(data/teacher_cache.py: row w * seq_len + t belongs to input t of window w).
"""

from __future__ import annotations

import sys
from typing import Optional

import grain
import numpy as np

from mai_jax.config import Config
from mai_jax.data import cache as cache_lib
from mai_jax.data import streams
from mai_jax.data import teacher_cache as tc
from mai_jax.data.sources import SourceError, SourceSpec
from mai_jax.data.tokenizer import Tokenizer


def window_features(tokens: np.ndarray, window: int, offsets: np.ndarray,
                    seq_len: int) -> dict[str, np.ndarray]:
  """One window's tokens int32 [seq_len + 1] -> {'inputs','targets','segment_ids','positions'}
  int32 [seq_len] using the split's document offsets int64 [D + 1]."""
  first = window * seq_len
  index_T1 = np.arange(first, first + seq_len + 1)
  doc_T1 = np.searchsorted(offsets, index_T1, side="right") - 1
  doc_T, next_doc_T = doc_T1[:-1], doc_T1[1:]
  segment_ids = (doc_T - doc_T[0] + 1).astype(np.int32)
  positions = (index_T1[:-1] - np.maximum(offsets[doc_T], first)).astype(np.int32)
  crosses = doc_T != next_doc_T
  segment_ids[crosses] = 0
  positions[crosses] = 0
  return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segment_ids,
          "positions": positions}


class _TagSource(grain.transforms.Map):
  def __init__(self, k: int):
    self._k = k

  def map(self, window):
    return self._k, int(window)


class StepRows(grain.transforms.Map):
  """Global step s -> this host's rows [stop - start, seq_len] of that step's global batch.

  Opens the caches lazily in whichever process runs it (grain workers get a pickled copy)."""

  def __init__(self, paths: list[str], windows: list[int], weights: list[float], seeds: list[int],
               seq_len: int, global_batch: int, start: int, stop: int,
               teacher_paths: Optional[list[str]] = None):
    self._paths, self._windows, self._weights, self._seeds = paths, windows, weights, seeds
    self._seq_len, self._batch, self._start, self._stop = seq_len, global_batch, start, stop
    self._teacher_paths = teacher_paths  # one teacher cache per source, or None
    self._splits, self._rows, self._teachers = None, None, None

  def __getstate__(self):
    return {**self.__dict__, "_splits": None, "_rows": None, "_teachers": None}

  def _open(self):
    self._splits = [cache_lib.open_cache(p)[1]["train"] for p in self._paths]
    if self._teacher_paths:
      self._teachers = [tc.open_teacher_cache(p) for p in self._teacher_paths]
    parts = [grain.MapDataset.range(n).shuffle(seed=s).repeat(None).map(_TagSource(k))
             for k, (n, s) in enumerate(zip(self._windows, self._seeds))]
    self._rows = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self._weights)

  def map(self, step: int) -> dict[str, np.ndarray]:
    if self._rows is None:
      self._open()
    first = int(step) * self._batch
    picks = [self._rows[g] for g in range(first + self._start, first + self._stop)]
    futures = [self._splits[k].tokens[w * self._seq_len:(w + 1) * self._seq_len + 1].read()
               for k, w in picks]  # every read in flight before the first wait
    teacher = [self._teachers[k].read_window(w) for k, w in picks] if self._teachers else []
    rows = [window_features(np.asarray(f.result(), np.int32), w, self._splits[k].offsets,
                            self._seq_len) for f, (k, w) in zip(futures, picks)]
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    counts = np.zeros((len(rows), len(self._paths)), np.int32)
    for i, (k, _) in enumerate(picks):
      counts[i, k] = np.count_nonzero(batch["segment_ids"][i])
    batch["source_tokens"] = counts
    if teacher:
      batch[tc.IDS_KEY] = np.stack([np.asarray(i.result(), np.int32) for i, _ in teacher])
      batch[tc.LOGPS_KEY] = np.stack([np.asarray(lp.result(), np.float32) for _, lp in teacher])
    return batch


def _open_all(specs: tuple[SourceSpec, ...], tokenizer: Tokenizer):
  return [cache_lib.open_cache(s.path, tokenizer) for s in specs]


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                        start: int, stop: int) -> grain.DatasetIterator:
  """This host's rows of every global batch, from the caches `specs` (see module docstring)."""
  seq_len = cfg.data.seq_len
  opened = _open_all(specs, tokenizer)
  windows = [splits["train"].num_windows(seq_len) for _, splits in opened]
  for spec, n in zip(specs, windows):
    if n < 1:
      raise SourceError(f"data.sources {spec.name!r}: the token cache {spec.path} has fewer than "
                        f"data.seq_len + 1 = {seq_len + 1} train tokens")
  seed = streams.shuffle_seed(cfg)
  seeds = [seed if k == 0 else streams.source_seed(seed, k) for k in range(len(specs))]
  step_rows = StepRows([s.path for s in specs], windows, [s.weight for s in specs], seeds,
                       seq_len, cfg.train.global_batch_size, start, stop,
                       _teacher_paths(cfg, specs, opened, windows))
  # data.worker_count reader threads, not processes: the work is tensorstore I/O and NumPy, both
  # outside the GIL, and threads keep the iterator state {'next_index': step} (grain's worker
  # processes would make it depend on the worker count).
  options = grain.ReadOptions(num_threads=max(cfg.data.worker_count, 1),
                              prefetch_buffer_size=streams.READ_OPTIONS.prefetch_buffer_size)
  ds = grain.MapDataset.range(sys.maxsize).map(step_rows).to_iter_dataset(options)
  if cfg.data.prefetch_buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=cfg.data.prefetch_buffer)
  return iter(ds)


def _teacher_paths(cfg: Config, specs, opened, windows) -> Optional[list[str]]:
  """Each source's checked teacher cache (train.distill_cache), or None."""
  if cfg.train.objective != "distill" or not cfg.train.distill_cache:
    return None
  paths = []
  for spec, (manifest, _), n in zip(specs, opened, windows):
    path = tc.cache_dir(spec.path, cfg.train.distill_cache)
    tc.check_for_run(tc.open_teacher_cache(path), path, manifest, n, cfg.data.seq_len,
                     cfg.model.vocab_size)
    paths.append(path)
  return paths


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                      start: int, stop: int, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Validation windows of every cache in order (each validation target scored once), batched;
  the last batch is filled with padding rows (segment id 0)."""
  seq_len, batch_rows = cfg.data.seq_len, cfg.train.global_batch_size
  picks = [(splits["validation"], w) for _, splits in _open_all(specs, tokenizer)
           for w in range(splits["validation"].num_windows(seq_len))]
  if not picks:
    raise SourceError(f"token caches {', '.join(s.path for s in specs)} hold no validation "
                      f"window of {seq_len + 1} tokens; raise data.val_fraction when tokenizing")
  picks = picks[:num_batches * batch_rows]
  pad = {"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id, "segment_ids": 0,
         "positions": 0}
  batches = []
  for b in range(0, len(picks), batch_rows):
    chunk = picks[b:b + batch_rows]
    futures = [split.tokens[w * seq_len:(w + 1) * seq_len + 1].read() for split, w in chunk]
    rows = [window_features(np.asarray(f.result(), np.int32), w, split.offsets, seq_len)
            for f, (split, w) in zip(futures, chunk)]
    rows += [{k: np.full(seq_len, v, np.int32) for k, v in pad.items()}] * (batch_rows - len(rows))
    batch = {k: np.stack([r[k] for r in rows])[start:stop] for k in pad}
    batches.append(batch)
  return batches

