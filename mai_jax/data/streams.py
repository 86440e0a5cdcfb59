"""What every training stream of a run agrees on, whatever its sources (raw documents packed by
pipeline.py, or token caches read by cache_pipeline.py): which rows of each global batch this host
reads, the shuffle seed of each source, and grain's read options."""

from __future__ import annotations

import grain
import numpy as np

from mai_jax.config import MESH_AXES, Config, ConfigError, mesh_shape

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
  if cfg.mesh.stage > 1 and process_count > 1:
    import jax  # pylint: disable=import-outside-toplevel
    return _rows_by_mesh(cfg, process_index, process_count, jax.device_count())
  per_host = batch // process_count
  return process_index * per_host, (process_index + 1) * per_host


def _rows_by_mesh(cfg: Config, process_index: int, process_count: int,
                  num_devices: int) -> tuple[int, int]:
  """The rows this host's devices hold when the batch is not split over every process: pipeline
  stages across hosts hold the same rows (the batch is replicated over 'stage'), so the hosts of
  one data-parallel group load the same rows. Devices are ordered by process, the mesh axes run
  outer to inner (sharding.make_mesh), and the batch is split over the 'batch' rule's axes."""
  sizes = mesh_shape(cfg.mesh, num_devices)
  per_process = num_devices // process_count
  coords = np.unravel_index(np.arange(process_index * per_process,
                                      (process_index + 1) * per_process),
                            tuple(sizes[a] for a in MESH_AXES))
  block = np.zeros(per_process, np.int64)
  blocks = 1
  for axis in dict(cfg.mesh.rules).get("batch", ()):
    block = block * sizes[axis] + coords[MESH_AXES.index(axis)]
    blocks *= sizes[axis]
  lo, hi = int(block.min()), int(block.max()) + 1
  if len(np.unique(block)) != hi - lo:
    raise ConfigError(f"process {process_index}'s devices hold non-contiguous batch rows under "
                      f"mesh {sizes}; put the batch axes outside the per-process devices")
  rows = cfg.train.global_batch_size // blocks
  return lo * rows, hi * rows


def source_seed(seed: int, source_index: int) -> int:
  """The shuffle seed of the source_index-th source (the first keeps the run's seed)."""
  return int(np.random.SeedSequence([seed, source_index]).generate_state(1)[0])
