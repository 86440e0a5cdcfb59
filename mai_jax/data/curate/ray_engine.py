"""The Ray engine: the local engine's stages with the parallel parts on Ray Data.

  * filtering: one Ray Data row per input file, `map` runs docfilter.filter_file (the same
    function as the local engine) on the cluster's CPUs; partial reports travel back as JSON,
    ids as JSON, hashes and signatures as raw bytes, and each file is staged as it arrives;
  * near dedup: rows (band, key, document) for every LSH band, a Ray Data
    `groupby(band, key).map_groups` emits edges from each group's smallest member; connected
    components over those edges run on the cluster too, as rounds of large-star / small-star
    group-bys (components.py) until no edge changes, so the edge list never gathers on the
    driver: only each document's cluster minimum comes back (8 bytes a document, next to the
    signatures the driver already holds). Exact dedup is one sort of the 8-byte hashes the
    workers computed, on the driver;
  * writing: on the driver, by the local engine's code, in the same priority order.
So the output bytes equal the local engine's for the same input and config (tested on a local Ray
instance). Ray connects to RAY_ADDRESS when it is set, else starts a local instance with `workers`
CPUs whose workers import this same mai_jax. The staging folder (next to OUT) must be on storage
every Ray node can read and write.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import numpy as np

import mai_jax
from mai_jax.config import ConfigError
from mai_jax.data.curate import components, docfilter
from mai_jax.data.curate.progress import OFF, Progress
from mai_jax.data.curate.report import Report


def _ray():
  try:
    import ray  # pylint: disable=import-outside-toplevel
    import ray.data  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ConfigError("--engine ray needs Ray Data: pip install 'mai_jax[ray]'") from e
  return ray


def check_installed() -> None:
  _ray()


@contextlib.contextmanager
def session(workers: int, progress: Progress = OFF):
  """A Ray connection for one run (shut down afterwards if this run started it); Ray Data's
  progress bars follow `progress` meanwhile."""
  ray = _ray()
  context = ray.data.DataContext.get_current()
  saved = context.enable_progress_bars, context.shuffle_strategy
  context.enable_progress_bars = progress.on
  # Task-based sort shuffle for the group-bys: the default hash shuffle starts long-lived
  # aggregator actors, seconds per group-by, and near dedup runs two group-bys a round.
  context.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
  started = not ray.is_initialized()
  if started:
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
      root = os.path.dirname(os.path.dirname(os.path.abspath(mai_jax.__file__)))
      path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
      kwargs.update(num_cpus=workers, runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray.init(**kwargs)
  try:
    yield
  finally:
    context.enable_progress_bars, context.shuffle_strategy = saved
    if started:
      ray.shutdown()


def filter_files(cfg, index, jobs: list, workers: int, progress: Progress = OFF
                 ) -> Iterator[docfilter.FileResult]:
  """docfilter.filter_file over `jobs` as a Ray Data map; FileResults as they finish, so each
  is staged (and a stopped run resumes) without waiting for the others."""
  del workers  # the cluster's CPUs decide
  if not jobs:
    return
  ray = _ray()
  rows = [{"number": j.number, "source": cfg.sources.index(j.source), "base": j.base,
           "rel": j.rel, "staging_path": j.staging_path} for j in jobs]
  by_number = {j.number: j for j in jobs}

  def work(row):
    job = docfilter.FileJob(int(row["number"]), cfg.sources[int(row["source"])], row["base"],
                            row["rel"], row["staging_path"])
    r = docfilter.filter_file(cfg, index, job)
    return {"number": r.number, "ids": json.dumps(r.ids), "exact": r.exact_N.tobytes(),
            "sig": r.sig_NP.tobytes(), "report": json.dumps(r.report.to_json())}

  num_perm = cfg.dedup.bands * cfg.dedup.rows if cfg.dedup.near else 0
  done = ray.data.from_items(rows, override_num_blocks=len(rows)).map(work).iter_rows()
  for out in progress(done, len(rows), "filter", "file"):
    number = int(out["number"])
    ids = json.loads(out["ids"])
    yield docfilter.FileResult(
        number, by_number[number].staging_path, ids,
        np.frombuffer(out["exact"], np.uint64).copy(),
        np.frombuffer(out["sig"], np.uint32).reshape(len(ids), num_perm).copy(),
        Report.from_json(json.loads(out["report"]), cfg.output.examples_per_rule))


def _group_edges(batch: dict) -> dict:
  docs = np.sort(np.asarray(batch["doc"], np.int64))
  return {"a": np.full(len(docs) - 1, docs[0], np.int64), "b": docs[1:]}


ROWS_PER_PARTITION = 1 << 20


def _partitions(rows: int) -> int:
  """Shuffle partitions for a group-by of `rows` rows: about a million rows each, at most Ray
  Data's default parallelism (its 200 partitions of a few rows each cost more than the work)."""
  most = _ray().data.DataContext.get_current().default_hash_shuffle_parallelism
  return max(1, min(most, -(-rows // ROWS_PER_PARTITION)))


def _run_round(ds):
  """components.one_round as Ray Data group-bys, materialized: its changed count is read before
  the next round, which must not recompute it."""
  parts = _partitions(2 * ds.count())
  ds = ds.map_batches(components.both_directions, batch_format="numpy")
  ds = ds.groupby("u", num_partitions=parts).map_groups(components.large_star,
                                                        batch_format="numpy")
  return ds.groupby("b", num_partitions=parts).map_groups(components.small_star,
                                                          batch_format="numpy").materialize()


def _changed(ds) -> int:
  return int(ds.sum("changed") or 0)


def near_components(keys: list, members: np.ndarray, n: int, progress: Progress = OFF
                    ) -> np.ndarray:
  """dedup.local_components on the cluster: each of 0..n-1's cluster minimum, the LSH groups by a
  Ray Data groupby and the clusters by components.converge over Ray Data group-bys."""
  labels = np.arange(n, dtype=np.int64)
  if not keys or not len(members):
    return labels
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  table = pa.table({
      "band": np.concatenate([np.full(len(k), t, np.int64) for t, k in enumerate(keys)]),
      "key": np.concatenate([np.asarray(k).astype(np.int64) for k in keys]),
      "doc": np.tile(np.asarray(members, np.int64), len(keys))})
  edges = _ray().data.from_arrow(table).groupby(
      ["band", "key"], num_partitions=_partitions(len(table))).map_groups(
          _group_edges, batch_format="numpy").materialize()
  if edges.count() == 0:
    return labels
  with progress(desc="near dedup", unit="round") as bar:
    def on_round(_, changed):
      bar.update(1)
      bar.set_postfix(rewired=changed)
    edges, _ = components.converge(edges, _run_round, _changed, n, on_round)
  for batch in edges.iter_batches(batch_format="numpy", batch_size=1 << 16):
    labels[batch["b"]] = batch["a"]  # star edges: (cluster minimum, member)
  return labels
