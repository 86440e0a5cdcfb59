"""A curation run, on either engine: list files, filter per file, global dedup, write the shards.

Stages: (1) list every source's files (a source without files is an error before anything is
written); (2) `docfilter.filter_file` per file, each writing a staging file; (3) exact + near
dedup over all kept documents in priority order, plus the documents of `dedup.against`, then the
keep_top_fraction cuts over the dedup survivors (topcut.py); (4) the survivors written to shards
in that order, the report and signatures.npz. Engine 'local' runs (2) on `workers` processes
(fork, so the evaluation index built once is shared) and (3)-(4) on this process (union-find,
one pass over the staging files); engine 'ray' runs every stage on the cluster (ray_engine.py,
cluster_stages.py, cluster_cut.py), the driver keeping only per-file and per-shard
counts and reports. Everything is written into OUT.partial (staging.py), renamed to OUT only
when the run succeeds: a refused run or one with no documents left leaves nothing; an
interrupted one leaves OUT.partial, and the same command resumes it file by file (and, on
'ray', shard by shard). Stages 2-4 show progress bars on stderr (progress.py). Memory of the
local engine: the signatures (4 x bands x rows bytes a document), ids and keep_top_fraction
scores (4 bytes a document a rule) of the kept documents; the texts stay on disk.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
from typing import Callable, Iterator, Optional

import numpy as np

from mai_jax.config import ConfigError
from mai_jax.data import readers
from mai_jax.data.curate import decontam, dedup, docfilter, records, topcut
from mai_jax.data.curate import staging as staging_lib
from mai_jax.data.curate.progress import Progress
from mai_jax.data.curate.settings import CurateConfig

_WORKER: dict = {}  # config and evaluation index, set before the pool forks


def _work(job: docfilter.FileJob) -> docfilter.FileResult:
  return docfilter.filter_file(_WORKER["cfg"], _WORKER["index"], job)


def list_files(cfg: CurateConfig) -> list[tuple]:
  """(source, base, rel) of every input file, in priority order."""
  files = []
  for source in cfg.sources:
    base, rels = readers.source_files(source.path)
    if not rels:
      raise ConfigError(f"sources {source.name!r}: path {source.path!r} matches no files")
    files += [(source, base, rel) for rel in rels]
  return files


def eval_index(cfg: CurateConfig) -> Optional[decontam.EvalIndex]:
  d = cfg.decontamination
  if not d.enabled:
    return None
  files = (decontam.task_files() if d.tasks else []) + list(d.files)
  return decontam.build_index(files, d.field, d.ngram, d.min_tokens)


def check_out_dir(out_dir: str) -> None:
  if os.path.exists(out_dir):
    raise ConfigError(f"--out {out_dir!r} already exists; curation writes a new folder: remove it "
                      f"or choose another")


ENGINES = ("local", "ray")


def curate(cfg: CurateConfig, out_dir: str, engine: str = "local", workers: Optional[int] = None,
           log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Curates cfg.sources into out_dir (which must not exist); returns the report as a dict.
  `progress`: bars on stderr for the long stages when it is a terminal (progress.py)."""
  if engine not in ENGINES:
    raise ConfigError(f"--engine {engine!r}; valid engines: {', '.join(ENGINES)}")
  out_dir = os.path.abspath(out_dir)
  check_out_dir(out_dir)
  files = list_files(cfg)
  params = cfg.dedup.signature_params()
  index = eval_index(cfg)
  workers = max(1, min(workers or cfg.workers, len(files)))
  bars = Progress(progress)
  if engine == "ray":
    from mai_jax.data.curate import ray_engine  # pylint: disable=import-outside-toplevel
    ray_engine.check_installed()
    priors = [(p, dedup.signature_rows(p, params)) for p in cfg.dedup.against]
    connection, run = ray_engine.session(workers, bars), ray_engine.run
  else:
    priors = [dedup.load_signatures(p, params) for p in cfg.dedup.against]
    connection, run = contextlib.nullcontext(), _run_local
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  staging, resumed = staging_lib.open_staging(out_dir, staging_lib.fingerprint(cfg, files))
  try:
    jobs = [docfilter.FileJob(i, s, b, r, os.path.join(staging, "stage", f"{i:06d}.jsonl"))
            for i, (s, b, r) in enumerate(files)]
    done = staging_lib.done_numbers(staging, jobs) if resumed else set()
    log(f"curating {len(files)} files from {len(cfg.sources)} sources, engine {engine}"
        + (f"; resuming {staging}: {len(done)} files already done" if resumed else ""))
    with connection:
      report = run(cfg, jobs, done, priors, index, staging, workers, bars)
    report = seal(cfg, staging, report, log)
    os.rename(staging, out_dir)
  except ConfigError:  # nothing to resume: the input or config must change first
    shutil.rmtree(staging, ignore_errors=True)
    raise
  except BaseException:
    log(f"stopped; the same command resumes from {staging} (delete it to start over)")
    raise
  return report


def _run_local(cfg, jobs, done, priors, index, staging, workers, progress):
  """The local engine after listing: filter the files not `done` on a process pool, then
  dedup and write on this process. Returns the Report (report.json not written yet)."""
  results = list(staging_lib.load_results(staging, [j for j in jobs if j.number in done],
                                          cfg).values())
  for result in _filter_all(cfg, index, [j for j in jobs if j.number not in done], workers,
                            progress):
    staging_lib.save_result(staging, result)
    results.append(result)
  return _finish(cfg, results, priors, index, staging, dedup.local_components, progress)


def _filter_all(cfg, index, jobs, workers, progress: Progress) -> Iterator[docfilter.FileResult]:
  """docfilter.filter_file over jobs on `workers` processes, results in job order as they end."""
  _WORKER.update(cfg=cfg, index=index)
  try:
    if workers == 1:
      yield from (_work(j) for j in progress(jobs, len(jobs), "filter", "file"))
      return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
      yield from progress(pool.imap(_work, jobs), len(jobs), "filter", "file")
  finally:
    _WORKER.clear()


def _finish(cfg: CurateConfig, results: list, priors: list, index, staging: str,
            components: dedup.ComponentsFn, progress: Progress):
  report = docfilter.new_report(cfg)
  for r in sorted(results, key=lambda r: r.number):
    report.merge(r.report)
  results = sorted(results, key=lambda r: r.number)
  prior_ids = [f"prior:{i}" for ids, _, _ in priors for i in ids]
  num_perm = cfg.dedup.bands * cfg.dedup.rows if cfg.dedup.near else 0
  ids = prior_ids + [i for r in results for i in r.ids]
  exact_N = np.concatenate([e for _, e, _ in priors] + [r.exact_N for r in results]
                           + [np.zeros(0, np.uint64)])
  sig_NP = np.concatenate([s[:, :num_perm] for _, _, s in priors] + [r.sig_NP for r in results]
                          + [np.zeros((0, num_perm), np.uint32)])
  d = cfg.dedup
  result = dedup.deduplicate(exact_N, sig_NP, exact=d.exact, near=d.near, bands=d.bands,
                             rows=d.rows, components=components, progress=progress)
  removed_exact, removed_near = result.removed_exact(), result.removed_near()
  n_prior, ranked = len(prior_ids), topcut.ranked(cfg.rules)
  scores_NR = np.concatenate([r.scores_NR for r in results]
                             + [np.zeros((0, len(ranked)), np.float32)])
  cut_N, cut_scores, cuts = topcut.local_cuts(cfg.rules, scores_NR,
                                              ~(removed_exact | removed_near)[n_prior:])
  shutil.rmtree(os.path.join(staging, "data"), ignore_errors=True)  # a resumed run's partial shards
  writer = records.ShardWriter(os.path.join(staging, "data"), cfg.output.format,
                               cfg.output.shard_docs)
  keep = np.zeros(len(ids), bool)
  n = n_prior
  clusters = {"exact": set(), "near": set()}
  for r in progress(results, len(results), "write", "file"):
    with open(r.staging_path, encoding="utf-8") as f:
      for line in f:
        rec = json.loads(line)
        counts = docfilter.doc_counts(rec["text"])
        if removed_exact[n] or removed_near[n]:
          stage, survivor = ((docfilter.EXACT, result.exact_survivor[n]) if removed_exact[n]
                             else (docfilter.NEAR, result.near_survivor[n]))
          clusters["exact" if removed_exact[n] else "near"].add(int(survivor))
          report.removed(stage, "duplicate", rec["id"], rec["text"], counts,
                         detail=f"kept {ids[survivor]}")
        elif cut_N[n - n_prior] >= 0:
          r = int(cut_N[n - n_prior])
          report.removed(ranked[r].name, topcut.REASON, rec["id"], rec["text"], counts,
                         detail=topcut.detail(scores_NR[n - n_prior, r], cut_scores[r]))
        else:
          keep[n] = True
          writer.add(rec)
          report.doc_out(rec["source"], counts)
        n += 1
  writer.flush()
  report.extra.update(
      duplicate_clusters_exact=len(clusters["exact"]),
      duplicate_clusters_near=len(clusters["near"]),
      prior_documents=len(prior_ids),
      decontamination_items=index.items if index else 0,
      decontamination_items_too_short=index.skipped_short if index else 0,
      shards=[os.path.basename(p) for p in writer.paths], **topcut.report_extra(cuts))
  if keep.any():
    dedup.save_signatures(os.path.join(staging, "signatures.npz"),
                          [ids[i] for i in np.nonzero(keep)[0]], exact_N[keep], sig_NP[keep],
                          d.signature_params())
  return report


def seal(cfg: CurateConfig, staging: str, report, log) -> dict:
  """The end of a run on either engine: refuses an empty result, writes report.json and
  summary.txt, removes what only resuming needed. Returns the report as a dict."""
  total_out = sum(s["out"]["docs"] for s in report.sources.values())
  if total_out == 0:
    raise report.nothing_left(r.name for r in cfg.rules)
  report.write(staging)
  shutil.rmtree(os.path.join(staging, "stage"))
  os.remove(os.path.join(staging, "run.json"))
  log(f"kept {total_out} of {sum(s['in']['docs'] for s in report.sources.values())} documents "
      f"in {len(report.extra['shards'])} shards")
  return report.to_json()
