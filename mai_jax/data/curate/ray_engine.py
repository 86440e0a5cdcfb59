"""The Ray engine: the local engine's stages with the parallel parts on Ray Data.

  * filtering: one Ray Data row per input file, `map` runs docfilter.filter_file (the same
    function as the local engine) on the cluster's CPUs; partial reports travel back as JSON,
    ids as JSON, hashes and signatures as raw bytes;
  * near dedup: rows (band, key, document) for every LSH band, a Ray Data
    `groupby(band, key).map_groups` emits the edges joining each group; union-find over those
    edges runs on the driver (one edge per duplicate, small next to the corpus), as does exact
    dedup (one sort of the 8-byte hashes the workers computed);
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
from typing import Iterable

import numpy as np

import mai_jax
from mai_jax.config import ConfigError
from mai_jax.data.curate import docfilter
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
def session(workers: int):
  """A Ray connection for one run (shut down afterwards if this run started it)."""
  ray = _ray()
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
    if started:
      ray.shutdown()


def filter_files(cfg, index, jobs: list, workers: int) -> list:
  """docfilter.filter_file over `jobs` as a Ray Data map; FileResults in job order."""
  del workers  # the cluster's CPUs decide
  ray = _ray()
  rows = [{"number": j.number, "source": cfg.sources.index(j.source), "base": j.base,
           "rel": j.rel, "staging_path": j.staging_path} for j in jobs]

  def work(row):
    job = docfilter.FileJob(int(row["number"]), cfg.sources[int(row["source"])], row["base"],
                            row["rel"], row["staging_path"])
    r = docfilter.filter_file(cfg, index, job)
    return {"number": r.number, "ids": json.dumps(r.ids), "exact": r.exact_N.tobytes(),
            "sig": r.sig_NP.tobytes(), "report": json.dumps(r.report.to_json())}

  num_perm = cfg.dedup.bands * cfg.dedup.rows if cfg.dedup.near else 0
  results = []
  for out in ray.data.from_items(rows, override_num_blocks=len(rows)).map(work).take_all():
    number = int(out["number"])
    ids = json.loads(out["ids"])
    results.append(docfilter.FileResult(
        number, jobs[number].staging_path, ids, np.frombuffer(out["exact"], np.uint64).copy(),
        np.frombuffer(out["sig"], np.uint32).reshape(len(ids), num_perm).copy(),
        Report.from_json(json.loads(out["report"]), cfg.output.examples_per_rule)))
  return sorted(results, key=lambda r: r.number)


def _group_edges(batch: dict) -> dict:
  docs = np.sort(np.asarray(batch["doc"], np.int64))
  return {"a": np.full(len(docs) - 1, docs[0], np.int64), "b": docs[1:]}


def same_key_pairs(keys: list, members: np.ndarray) -> Iterable[tuple[int, int]]:
  """dedup.same_key_pairs by a Ray Data groupby: edges from each group's smallest member."""
  if not keys or not len(members):
    return []
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  table = pa.table({
      "band": np.concatenate([np.full(len(k), t, np.int64) for t, k in enumerate(keys)]),
      "key": np.concatenate([np.asarray(k).astype(np.int64) for k in keys]),
      "doc": np.tile(np.asarray(members, np.int64), len(keys))})
  edges = _ray().data.from_arrow(table).groupby(["band", "key"]).map_groups(
      _group_edges, batch_format="numpy").take_all()
  return [(int(e["a"]), int(e["b"])) for e in edges]
