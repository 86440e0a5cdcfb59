"""What every training stream of a run agrees on, whatever its sources (raw documents packed by
pipeline.py, or token caches read by cache_pipeline.py): which rows of each global batch this host
reads, the shuffle seed of each source, and grain's read options."""

from __future__ import annotations

import grain
import numpy as np

from mai_jax.config import Config, ConfigError

# Documents tokenized ahead by grain's reader thread in each process (a second thread gave no
# measurable gain on 2 cores).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)


def shuffle_seed(cfg: Config) -> int:
  """One 32-bit seed from train.seed and data.shuffle_seed (either changes the order)."""
  return int(np.random.SeedSequence([cfg.train.seed, cfg.data.shuffle_seed,
                                     0x6d61692d]).generate_state(1)[0])


def host_rows(cfg: Config, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of the global batch's rows that belong to this host."""
  batch = cfg.train.global_batch_size
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count})")
  if batch % process_count:
    raise ConfigError(f"train.global_batch_size={batch} must be divisible by the "
                      f"{process_count} processes, each of which loads an equal share of rows")
  per_host = batch // process_count
  return process_index * per_host, (process_index + 1) * per_host


def source_seed(seed: int, source_index: int) -> int:
  """The shuffle seed of the source_index-th source (the first keeps the run's seed)."""
  return int(np.random.SeedSequence([seed, source_index]).generate_state(1)[0])
