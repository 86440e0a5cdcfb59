"""The grain input pipeline: documents -> token ids -> packed rows -> this host's part of a batch.

Stages of the training stream (every stage is a grain dataset, so `get_state()`/`set_state()` of
the final iterator restores the stream exactly):

  1. documents of the train split, globally shuffled with a fresh permutation each epoch and
     repeated forever (`MapDataset.shuffle(seed).repeat()`; seed from train.seed and
     data.shuffle_seed);
  2. tokenize: [bos] + ids + [eos] (in `data.worker_count` processes when > 0);
  3. cut each document into chunks of at most seq_len + 1 tokens that overlap by one token and
     shift them: inputs = chunk[:-1], targets = chunk[1:]. Every target is the next token of the
     same document, and no (input, target) pair is lost at chunk borders;
  4. shuffle chunks in a window (`_CHUNK_SHUFFLE_WINDOW`), so the chunks of one long file spread
     over many steps instead of filling one batch;
  5. pack chunks into rows of exactly seq_len with grain's first-fit packing, which yields
     `segment_ids` (1, 2, ... per chunk within a row, 0 for padding) and `positions` (0, 1, ...
     restarting at each chunk; a continuation chunk of a long document restarts at 0 too, which
     rotary attention does not mind); padding has inputs = targets = pad_id;
  6. batch train.global_batch_size rows, then keep this host's rows.

Why first-fit packing rather than concat-then-split: concat-then-split cuts documents wherever a
row happens to end, so the next row starts mid-document without context at position 0. First-fit
places whole chunks (documents are cut only every seq_len tokens, stage 3, so nothing is dropped for
length) at the cost of a little padding: 0.9% of tokens on the stdlib at seq_len 256, 2% at 1024,
masked out of the loss by segment id 0.

Mixtures: with several data.sources, stages 1-5 run per source and grain's `IterDataset.mix`
interleaves the packed rows by weight, so weights are shares of rows, i.e. of tokens. Each row
carries `source_tokens` int32 [num_sources] (its real tokens, credited to its source) for the
loop's `data/tokens/<name>` metrics; `DataMetrics` adds the `data/skipped_<reason>` counts.

Host slicing: every host builds the same global stream and keeps rows
[process_index * B/P, (process_index + 1) * B/P) of each global batch, so the global batch is the
same whatever the process count. It is simple, not efficient (each host tokenizes everything);
token caches (cache_pipeline.py) compute only the host's rows. The iterator state is identical on
every host for the same reason.

Workers: `mp_prefetch` runs only stages 1-2 (a one-to-one map), and grain interleaves worker
outputs in index order, so the stream, and the checkpointed state's meaning, do not depend on
data.worker_count. Chunking, shuffling, packing and batching run in the calling process. grain
starts workers with the 'spawn' method, which re-imports the main module: a script that builds a
worker_count > 0 iterator at import time must sit under `if __name__ == "__main__":`, and
callers should `it.close()` such an iterator when done.

Throughput (worker_count=0, 2 busy CPU cores, stdlib, vocab 4096): ~0.5M tokens/s at seq_len 256
and ~0.6M at 1024, far above what a CPU training step consumes.
"""

from __future__ import annotations

from typing import Optional

import grain
import numpy as np

from mai_jax.config import Config
from mai_jax.data import cache_pipeline, sources
from mai_jax.data.streams import READ_OPTIONS, host_rows, shuffle_seed, source_seed
from mai_jax.data.tokenizer import Tokenizer

FEATURES = ("inputs", "targets", "segment_ids", "positions")

# Chunks shuffled together after tokenization (memory: window x seq_len x 8 bytes; restoring a
# checkpoint re-tokenizes at most this many chunks).
_CHUNK_SHUFFLE_WINDOW = 1024
# First-fit packing bins: more bins leave less padding; each element is tried against every bin.
_MIN_PACKING_BINS = 64


class Tokenize(grain.transforms.Map):
  """text -> int32 [len(ids) + 2]: [bos] + ids + [eos]. A tokenizer without one of them (id -1,
  e.g. an imported HF tokenizer without a BOS token, evaluated with `mai-jax eval`) frames
  documents with the one it has; training requires both (tokenizer._checked)."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    self._eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []

  def map(self, text: str) -> np.ndarray:
    return np.asarray([*self._bos, *self._tokenizer.encode(text), *self._eos], dtype=np.int32)


class ChunkAndShift(grain.experimental.FlatMapTransform):
  """tokens [N] -> chunks {'inputs': [n], 'targets': [n]} with n <= seq_len.

  Chunk c covers tokens[c*seq_len : c*seq_len + seq_len + 1] (consecutive chunks share one token),
  so every token but the first is a target exactly once; eos is never an input.
  """

  max_fan_out = 1 << 30  # unbounded: used by the IterDataset flat-map only, which never checks it

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    n, last = self._seq_len, len(tokens) - 1
    return [{"inputs": tokens[s:min(s + n, last)], "targets": tokens[s + 1:min(s + n, last) + 1]}
            for s in range(0, last, n)]


class PackedToBatchFeatures(grain.transforms.Map):
  """Renames grain's packing outputs to the batch contract (inputs, targets, segment_ids,
  positions); inputs and targets share segment ids and positions by construction. Adds
  `source_tokens` int32 [num_sources]: the row's real tokens, all credited to the row's source
  (rows are packed per source), which the loop sums into `data/tokens/<name>` metrics."""

  def __init__(self, source_index: int = 0, num_sources: int = 1, extra: tuple[str, ...] = ()):
    self._source_index, self._num_sources = source_index, num_sources
    self._extra = extra  # further per-token features packed alongside (SFT: loss_weights)

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = row["inputs_segment_ids"]
    counts = np.zeros(self._num_sources, np.int32)
    counts[self._source_index] = np.count_nonzero(segment_ids)
    return {"inputs": row["inputs"], "targets": row["targets"],
            "segment_ids": segment_ids, "positions": row["inputs_positions"],
            "source_tokens": counts, **{k: row[k] for k in self._extra}}


class HostRows(grain.transforms.Map):
  """Global batch [B, T] -> this host's rows [B/P, T]."""

  def __init__(self, start: int, stop: int):
    self._start, self._stop = start, stop

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[self._start:self._stop]) for k, v in batch.items()}


def _pack(ds: grain.IterDataset, cfg: Config, tokenizer: Tokenizer, *, seed: int,
          shuffle_bins: bool, source_index: int = 0, num_sources: int = 1,
          extra: tuple[str, ...] = ()) -> grain.IterDataset:
  """chunks -> packed rows of seq_len; `extra` per-token features are packed along, padded
  with 0."""
  seq_len, batch = cfg.data.seq_len, cfg.train.global_batch_size
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len, **{k: seq_len for k in extra}},
      num_packing_bins=max(batch, _MIN_PACKING_BINS), seed=seed, shuffle_bins=shuffle_bins,
      padding_struct={"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id,
                      **{k: 0 for k in extra}})
  return ds.map(PackedToBatchFeatures(source_index, num_sources, extra))


def _pack_and_batch(ds: grain.IterDataset, cfg: Config, tokenizer: Tokenizer, *, seed: int,
                    shuffle_bins: bool, drop_remainder: bool) -> grain.IterDataset:
  """chunks -> packed rows of seq_len -> global batches [B, seq_len]."""
  ds = _pack(ds, cfg, tokenizer, seed=seed, shuffle_bins=shuffle_bins)
  return ds.batch(cfg.train.global_batch_size, drop_remainder=drop_remainder)


def mark_absl_flags_parsed() -> None:
  """grain 0.2.18's mp_prefetch reads absl flags, which raise when unparsed outside an absl app
  (grain issue #1355). Marking them parsed keeps their defaults and parses no argv."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1,
                        source_root: Optional[str] = None) -> grain.DatasetIterator:
  """The infinite training stream of this host.

  Each `next(it)` is {'inputs', 'targets', 'segment_ids', 'positions'}: int32
  [global_batch_size / process_count, seq_len]. `it.get_state()` is a JSON-able dict;
  `set_state` on a fresh iterator built from the same config and tokenizer continues with exactly
  the batches that followed. `source_root` overrides where the source reads files (tests).
  """
  start, stop = host_rows(cfg, process_index, process_count)
  specs = sources.source_specs(cfg.data)
  if specs[0].kind == "cache":
    return cache_pipeline.make_train_iterator(cfg, tokenizer, specs, start, stop)
  seed = shuffle_seed(cfg)
  splits = sources.load_splits(cfg.data, "train", root=source_root)
  rows = [_source_rows(cfg, tokenizer, docs, k, len(splits), seed if k == 0 else
                       source_seed(seed, k)) for k, docs in enumerate(splits)]
  ds = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [s.weight for s in specs])
  ds = ds.batch(cfg.train.global_batch_size, drop_remainder=True)
  ds = ds.map(HostRows(start, stop))
  if cfg.data.prefetch_buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=cfg.data.prefetch_buffer)
  return iter(ds)


def _source_rows(cfg: Config, tokenizer: Tokenizer, docs: sources.DocumentSource, k: int,
                 num_sources: int, seed: int) -> grain.IterDataset:
  """Packed rows of one source: stages 1-5 of the module docstring. Rows are packed per source
  and mixed afterwards, so data.sources weights are shares of rows, i.e. of tokens."""
  ds = grain.MapDataset.source(docs).shuffle(seed=seed).repeat(None).map(Tokenize(tokenizer))
  ds = ds.to_iter_dataset(READ_OPTIONS)
  if cfg.data.worker_count > 0:
    mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.data.worker_count,
        per_worker_buffer_size=max(cfg.data.prefetch_buffer, 1)))
  ds = grain.experimental.FlatMapIterDataset(ds, ChunkAndShift(cfg.data.seq_len))
  window = max(_CHUNK_SHUFFLE_WINDOW // num_sources, 1)  # same memory whatever the mixture
  ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed)
  return _pack(ds, cfg, tokenizer, seed=seed, shuffle_bins=True, source_index=k,
               num_sources=num_sources)


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, *, num_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      source_root: Optional[str] = None) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` batches of the validation split, same keys and shapes as training.

  Deterministic: documents in source order, no shuffling, so every call (and every run with the
  same tokenizer) scores the same tokens. Each validation token is used at most once: when the
  split runs out, fewer batches come back, and the last one is filled with padding rows
  (segment id 0, masked out of the loss).
  """
  if num_batches < 1:
    raise ValueError(f"num_batches={num_batches} must be >= 1 (train.eval_batches)")
  start, stop = host_rows(cfg, process_index, process_count)
  specs = sources.source_specs(cfg.data)
  if specs[0].kind == "cache":
    return cache_pipeline.make_eval_batches(cfg, tokenizer, specs, start, stop, num_batches)
  docs = [text for split in sources.load_splits(cfg.data, "validation", root=source_root)
          for text in split.texts]  # every source, in data.sources order
  ds = grain.MapDataset.source(docs).map(Tokenize(tokenizer)).to_iter_dataset(READ_OPTIONS)
  ds = grain.experimental.FlatMapIterDataset(ds, ChunkAndShift(cfg.data.seq_len))
  ds = _pack_and_batch(ds, cfg, tokenizer, seed=0, shuffle_bins=False, drop_remainder=False)
  batches = []
  for batch in ds:
    batch = {k: batch[k] for k in FEATURES}
    batches.append(HostRows(start, stop).map(_pad_rows(batch, cfg.train.global_batch_size,
                                                       tokenizer.pad_id)))
    if len(batches) == num_batches:
      break
  return batches


def _pad_rows(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a final partial batch [r, T] to [rows, T] with rows of padding."""
  have = len(batch["inputs"])
  if have == rows:
    return batch
  fill = {"inputs": pad_id, "targets": pad_id, "segment_ids": 0, "positions": 0,
          "loss_weights": 0}
  return {k: np.concatenate([v, np.full((rows - have,) + v.shape[1:], fill[k], v.dtype)])
          for k, v in batch.items()}


class DataMetrics:
  """What the loop logs about the data: `data/tokens/<source>` (real tokens of this process's
  rows delivered so far, summed over processes by the caller's `gather`) and `data/skipped_<why>`
  (documents or files left out, or `split_long` ones cut into pieces, over all sources)."""

  def __init__(self, cfg: Config, source_root: Optional[str] = None):
    specs = sources.source_specs(cfg.data)
    self.names = [s.name for s in specs]
    self.tokens = np.zeros(len(specs), np.int64)
    self.skipped: dict[str, int] = {}
    for reason, n in _skipped_counts(cfg, specs, source_root).items():
      key = "data/skipped_" + "".join(c if c.isalnum() else "_"
                                      for c in reason.split(" (")[0].lower())
      self.skipped[key] = self.skipped.get(key, 0) + n

  def add(self, batch: dict[str, np.ndarray]) -> None:
    self.tokens += np.asarray(batch["source_tokens"], np.int64).sum(axis=0)

  def scalars(self, gather=None) -> dict[str, float]:
    """`gather(x)` sums x over processes (e.g. process_allgather(x).sum(0)); None: this one."""
    tokens = gather(self.tokens) if gather is not None else self.tokens
    return {**{f"data/tokens/{n}": float(t) for n, t in zip(self.names, tokens)},
            **{k: float(v) for k, v in self.skipped.items()}}


def _skipped_counts(cfg: Config, specs, source_root: Optional[str]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for spec in specs:
    if spec.kind in ("chat", "preference"):  # bad records are errors, never skipped (chat.py)
      continue
    if spec.kind == "cache":
      from mai_jax.data import cache  # pylint: disable=import-outside-toplevel
      found = cache.open_cache(spec.path)[0]["skipped"]
    else:
      found = sources.spec_documents(spec, cfg.data.max_files, source_root).skipped_counts()
    for reason, n in found.items():
      counts[reason] = counts.get(reason, 0) + n
  return counts
