"""The Ray engine: the local engine's stages on Ray Data, with no per-document data on the driver.

  * filter: one Ray Data row per input file; `map` runs docfilter.filter_file (the local
    engine's function) and staging.save_result on the worker, so each file's documents, exact
    hashes and MinHash signatures go straight to the staging folder (a stopped run resumes file
    by file, as locally); the driver gets the file's document count and partial report;
  * dedup (cluster_stages.py steps 1-4): workers read the staged arrays into rows (doc, exact,
    sig); grouped by the exact hash (a Ray Data sort, then one call per block of whole groups:
    `_grouped`), each group's smallest doc survives, the others are removed, and the survivors'
    LSH band rows are emitted; grouped by (band, k0..), each bucket gives edges from its
    smallest doc; connected components run as rounds of large-star / small-star groupings
    (components.py) to the star edges (cluster minimum, member), the near-removed; grouped by
    file, each file's removed positions are written next to its staged file
    (`NNNNNN.removed.npz`) with that file's dedup report part;
  * keep_top_fraction cuts (cluster_cut.py), over the dedup survivors: Ray tasks over chunks of
    files send 256-bin histograms of the score keys to the driver, which finds the exact cut
    by radix selection; then tasks add each file's documents past the cut to its removed.npz;
  * write (steps 5-6): the driver plans the shards from the per-file survivor counts alone
    (shard k = survivors ranked k*shard_docs.. in priority order, as segments of files), and a
    Ray Data `map` writes each shard on a worker (records.write_shard, the local engine's
    writer), so names, boundaries and bytes equal the local engine's; a finished shard is marked
    by `stage/shard-NNNNN.json` and a resumed run skips it. One Ray task writes signatures.npz.
Survivors follow dedup.py's rule (each cluster's smallest priority number), so the output bytes
equal the local engine's for the same input and config (tested on a local Ray instance, and the
same functions without Ray in the fast test).

What reaches the driver: per file a count and a partial report (its removed examples, at most
examples_per_rule a stage), per shard its name and counts, and a few totals: O(files + shards),
not O(documents). Measured (benchmarks/curate_ray_driver.py, results/curate_ray_driver.json:
20,000 synthetic documents in 40 files, 10% exact and 10% near copies, 2 shared CPUs): 484 bytes
a document reached the driver before this design (signatures, hashes and ids came back and dedup
ran there), 7.3 after, most of it the per-file reports; wall time 85 and 123 s before (two runs),
73 s after (a Python call per LSH bucket in Ray Data's map_groups had made it 222 s; the local
engine: 10-22 s; Ray's fixed costs, worker start-up and seconds a sort, dominate at this size).

Still on one node: signatures.npz (one file by format: the survivors' ids, hashes and
signatures, one task), an earlier corpus's signatures.npz in `dedup.against` (read by one task
each), and the ids a removed example names (read from its survivor's staged file).

Ray connects to RAY_ADDRESS when it is set, else starts a local instance with `workers` CPUs
whose workers import this same mai_jax. The staging folder (next to OUT) must be on storage
every Ray node can read and write.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Iterator

import numpy as np

import mai_jax
from mai_jax.config import ConfigError
from mai_jax.data.curate import cluster_cut, cluster_stages, components, docfilter, topcut
from mai_jax.data.curate import staging as staging_lib
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
  # Task-based sort shuffle for the sorts that group rows: the default hash shuffle starts
  # long-lived aggregator actors, seconds each, and near dedup sorts twice a round.
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


def _one(batch: dict) -> dict:
  """A Ray Data numpy batch of one row -> that row as Python values."""
  values = {k: np.asarray(v)[0] for k, v in batch.items()}
  return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def _filter(cfg, index, jobs: list, staging: str, progress: Progress) -> Iterator[tuple]:
  """docfilter.filter_file over `jobs` as a Ray Data map, each worker staging its file's
  documents, hashes and signatures itself (staging.save_result, on the shared staging
  folder); (file number, documents kept, partial report) come back as they finish."""
  if not jobs:
    return
  ray = _ray()
  rows = [{"number": j.number, "source": cfg.sources.index(j.source), "base": j.base,
           "rel": j.rel, "staging_path": j.staging_path} for j in jobs]

  def work(row):
    job = docfilter.FileJob(int(row["number"]), cfg.sources[int(row["source"])], row["base"],
                            row["rel"], row["staging_path"])
    r = docfilter.filter_file(cfg, index, job)
    staging_lib.save_result(staging, r)
    return {"number": r.number, "docs": len(r.ids), "report": json.dumps(r.report.to_json())}

  done = ray.data.from_items(rows, override_num_blocks=len(rows)).map(work).iter_rows()
  for out in progress(done, len(rows), "filter", "file"):
    yield (int(out["number"]), int(out["docs"]),
           Report.from_json(json.loads(out["report"]), cfg.output.examples_per_rule))


def _grouped(ds, keys: list[str], fn):
  """fn over whole groups of `ds` by `keys`: Ray Data's sort puts equal keys in one block, and
  each block is one batch, which is what groupby(keys).map_groups does under the sort shuffle,
  but with one call a block, not one a group (a Python call per LSH bucket cost 80 of the 110 s
  of near dedup on 20,000 documents). fn takes and returns numpy batches of whole groups."""
  return ds.sort(keys).map_batches(fn, batch_size=None, batch_format="numpy")


def _run_round(ds):
  """components.one_round as Ray Data sorts, materialized: its changed count is read before
  the next round, which must not recompute it."""
  ds = _grouped(ds.map_batches(components.both_directions, batch_format="numpy"), ["u"],
                components.large_star)
  return _grouped(ds, ["b"], components.small_star).materialize()


def _changed(ds) -> int:
  return int(ds.sum("changed") or 0)


def _stars(band_rows, keys: list[str], n: int, progress: Progress):
  """Band rows (band, keys.., doc) -> the star edges (cluster minimum a, member b) of every
  cluster of 0..n-1 with two or more members, or None: a Ray Data sort for the LSH groups,
  components.converge over Ray Data sorts for the clusters."""
  band_rows = band_rows.materialize()
  rows = band_rows.count()
  if rows == 0:  # every document wordless
    return None
  edges = _grouped(band_rows, ["band", *keys], functools.partial(
      cluster_stages.band_edges, keys=keys)).materialize()
  if edges.count() == 0:
    return None
  with progress(desc="near dedup", unit="round") as bar:
    def on_round(_, changed):
      bar.update(1)
      bar.set_postfix(rewired=changed)
    edges, _ = components.converge(edges, _run_round, _changed, n, on_round)
  return edges


def near_components(keys: list, members: np.ndarray, n: int, progress: Progress = OFF
                    ) -> np.ndarray:
  """dedup.local_components on the cluster (a dedup.ComponentsFn: band keys given as arrays),
  by the same `_stars` the engine runs on band rows its workers built."""
  labels = np.arange(n, dtype=np.int64)
  if not keys or not len(members):
    return labels
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  table = pa.table({
      "band": np.concatenate([np.full(len(k), t, np.int64) for t, k in enumerate(keys)]),
      "key": np.concatenate([np.asarray(k).astype(np.int64) for k in keys]),
      "doc": np.tile(np.asarray(members, np.int64), len(keys))})
  stars = _stars(_ray().data.from_arrow(table), ["key"], n, progress)
  for batch in ([] if stars is None else stars.iter_batches(batch_format="numpy",
                                                            batch_size=1 << 16)):
    labels[batch["b"]] = batch["a"]  # star edges: (cluster minimum, member)
  return labels


def _select(kind: int, columns: list[str]):
  def select(batch):
    keep = np.asarray(batch["kind"]) == kind
    return {c: np.asarray(batch[c])[keep] for c in columns}
  return select


def _decide(cfg, pieces: list, files: list, staging_paths: list, n_prior: int, blank: Report,
            progress: Progress) -> tuple[list, dict, list]:
  """cluster_stages steps 1-4 on Ray Data: (each file's survivor count, the duplicate cluster
  counts, each file's dedup report part). Every per-document row stays on the cluster; the
  removed positions land next to each staged file."""
  ray, d = _ray(), cfg.dedup
  kept = [p["count"] for p in files]
  clusters = {"duplicate_clusters_exact": 0, "duplicate_clusters_near": 0}
  live = [p for p in pieces if p["count"]]
  if not live or not (d.exact or d.near):
    return kept, clusters, []
  num_perm = d.bands * d.rows if d.near else 0
  rows = ray.data.from_items(live, override_num_blocks=len(live)).map_batches(
      lambda b: cluster_stages.piece_rows(_one(b), num_perm, d.exact), batch_size=1,
      batch_format="numpy")
  group = functools.partial(cluster_stages.exact_groups, bands=d.bands if d.near else 0,
                            rows=d.rows, n_prior=n_prior)
  total = sum(p["count"] for p in live)
  grouped = (_grouped(rows, ["exact"], group) if d.exact
             else rows.map_batches(group, batch_format="numpy")).materialize()
  clusters["duplicate_clusters_exact"] = int(grouped.sum("cluster") or 0)
  removed = grouped.map_batches(_select(cluster_stages.REMOVED, ["doc", "survivor"]),
                                batch_format="numpy").map_batches(
      functools.partial(cluster_stages.removed_rows, stage=0), batch_format="numpy")
  keys = cluster_stages.key_columns(d.rows)
  band_rows = grouped.map_batches(_select(cluster_stages.BAND, ["band", *keys, "doc"]),
                                  batch_format="numpy")
  stars = _stars(band_rows, keys, n_prior + total, progress) if d.near else None
  if stars is not None:
    removed = removed.union(stars.map_batches(
        functools.partial(cluster_stages.removed_rows, stage=1), batch_format="numpy"))
    ours = stars.filter(expr=f"b >= {n_prior}")
    clusters["duplicate_clusters_near"] = int(_grouped(ours, ["a"], functools.partial(
        cluster_stages.distinct, column="a")).sum("distinct") or 0) if ours.count() else 0
  firsts = np.array([p["first"] for p in files], np.int64)
  removed = removed.map_batches(lambda b: cluster_stages.locate(b, firsts), batch_format="numpy"
                                ).filter(expr=f"doc >= {n_prior}").materialize()
  if removed.count() == 0:
    return kept, clusters, []
  ids = cluster_stages.Ids(pieces)
  decide = functools.partial(cluster_stages.decide_files, files=files,
                             staging_paths=staging_paths, ids=ids, blank=blank)
  parts = []
  for out in _grouped(removed, ["file"], decide).iter_rows():
    kept[int(out["file"])] -= int(out["removed"])
    parts.append((int(out["file"]), Report.from_json(json.loads(out["report"]),
                                                     blank.examples_per_rule)))
  return kept, clusters, [r for _, r in sorted(parts, key=lambda fr: fr[0])]


def _write(plan: list, staging_paths: list, staging: str, fmt: str, blank: Report,
           progress: Progress) -> tuple[list, list]:
  """cluster_stages.write_shard for every planned shard as a Ray Data map: (shard names,
  their reports) in shard order."""
  data = os.path.join(staging, "data")
  os.makedirs(data, exist_ok=True)
  for name in os.listdir(data):  # an interrupted attempt's half-written shards
    if name.endswith(".tmp"):
      os.remove(os.path.join(data, name))
  if not plan:
    return [], []
  tasks = [{"number": k, "segments": json.dumps(seg)} for k, seg in enumerate(plan)]

  def work(row):
    return {"number": row["number"], **cluster_stages.write_shard(
        int(row["number"]), json.loads(row["segments"]), staging_paths, staging, fmt, blank)}

  done = _ray().data.from_items(tasks, override_num_blocks=len(tasks)).map(work).iter_rows()
  out = sorted(progress(done, len(tasks), "write", "shard"), key=lambda r: int(r["number"]))
  return ([r["name"] for r in out],
          [Report.from_json(json.loads(r["report"]), blank.examples_per_rule) for r in out])


_TASKS: dict = {}  # function -> its Ray remote function, made once


def _map_chunks(fn, chunks: list, **kwargs) -> list:
  """cluster_cut's MapChunks as one Ray task a chunk."""
  ray = _ray()
  if fn not in _TASKS:
    _TASKS[fn] = ray.remote(num_cpus=1)(fn)
  task = _TASKS[fn]
  return ray.get([task.remote(chunk, **kwargs) for chunk in chunks])


def run(cfg, jobs: list, done: set, priors: list, index, staging: str, workers: int,
        progress: Progress = OFF) -> Report:
  """The Ray engine after listing (pipeline.curate's `run`): filter the files not `done`, dedup
  and write, every stage on the cluster. `priors`: (path, documents) of dedup.against. Returns
  the Report (report.json not written yet)."""
  del workers  # the cluster's CPUs decide
  ray = _ray()
  counts, parts = {}, {}
  for number, (count, part) in staging_lib.load_reports(
      staging, [j for j in jobs if j.number in done], cfg).items():
    counts[number], parts[number] = count, part
  for number, count, part in _filter(cfg, index, [j for j in jobs if j.number not in done],
                                     staging, progress):
    counts[number], parts[number] = count, part
  report = docfilter.new_report(cfg)
  for number in sorted(parts):
    report.merge(parts[number])
  pieces, files, n_prior = cluster_stages.layout(
      priors, [(staging_lib.result_path(staging, j.number), counts[j.number]) for j in jobs])
  staging_paths = [j.staging_path for j in jobs]
  blank = docfilter.new_report(cfg)  # what the tasks' report parts look like
  cluster_stages.clear_removed(staging_paths)
  kept, clusters, dedup_parts = _decide(cfg, pieces, files, staging_paths, n_prior, blank,
                                        progress)
  for part in dedup_parts:
    report.merge(part)
  cuts = {}
  if topcut.ranked(cfg.rules):
    kept, cut_parts, cuts = cluster_cut.run_cuts(
        cfg, files, staging_paths, kept, blank, _map_chunks,
        int(ray.cluster_resources().get("CPU", 1)))
    for part in cut_parts:
      report.merge(part)
  names = []
  if sum(kept):  # else pipeline.seal refuses the run
    plan = cluster_stages.plan_shards(kept, cfg.output.shard_docs)
    names, shard_parts = _write(plan, staging_paths, staging, cfg.output.format, blank,
                               progress)
    for part in shard_parts:
      report.merge(part)
    write = ray.remote(num_cpus=1)(cluster_stages.write_signatures)
    ray.get(write.remote(os.path.join(staging, "signatures.npz"), files, staging_paths,
                         cfg.dedup.signature_params()))
  report.extra.update(
      **clusters, prior_documents=n_prior,
      decontamination_items=index.items if index else 0,
      decontamination_items_too_short=index.skipped_short if index else 0,
      shards=names, **topcut.report_extra(cuts))
  return report
