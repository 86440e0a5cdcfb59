"""OUT.partial: where a run writes before it becomes OUT, and what lets an interrupted run resume.

Each input file's filtered documents (`stage/NNNNNN.jsonl`) are followed, once complete, by its
result (`NNNNNN.npz`: ids, exact hashes, MinHash signatures, `scores` float32 [docs, rules] of the
keep_top_fraction rules; `NNNNNN.report.json`), each written to a temporary name and renamed, so
a file counts as done only when all of it is on disk. A run that stops (crash, Ctrl-C, a lost
node) leaves OUT.partial; the same command again skips the files already done. The Ray engine
adds, per file, `NNNNNN.removed.npz` (its duplicates and the documents past a keep_top_fraction
cut: the file's keep mask, made afresh each attempt) and, per output shard, `shard-NNNNN.json`
(its counts and size, written after the shard: a resumed run skips that shard). `run.json` holds
a fingerprint of the config and of every input file (size, mtime): resuming with another config
or changed inputs is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from mai_jax.config import ConfigError
from mai_jax.data.curate import dedup, docfilter
from mai_jax.data.curate.report import Report
from mai_jax.data.curate.settings import CurateConfig


def fingerprint(cfg: CurateConfig, files: list[tuple]) -> str:
  """sha256 of the config (less `workers`, which does not change the output) and the inputs."""
  stats = []
  for source, base, rel in files:
    try:
      st = os.stat(os.path.join(base, rel))
      stats.append([source.name, rel, st.st_size, st.st_mtime_ns])
    except OSError:
      stats.append([source.name, rel, None, None])
  blob = json.dumps({"config": repr(dataclasses.replace(cfg, workers=1)), "files": stats})
  return hashlib.sha256(blob.encode()).hexdigest()


def open_staging(out_dir: str, print_: str) -> tuple[str, bool]:
  """(OUT.partial, whether it is resumed); a folder from another config or input is refused."""
  staging = out_dir + ".partial"
  run_json = os.path.join(staging, "run.json")
  if os.path.exists(staging):
    try:
      with open(run_json, encoding="utf-8") as f:
        saved = json.load(f).get("fingerprint")
    except (OSError, ValueError):
      saved = None
    if saved != print_:
      raise ConfigError(f"{staging!r} holds an interrupted run of another config or other inputs "
                        f"(or is not a curation folder); remove it to start over")
    return staging, True
  os.makedirs(os.path.join(staging, "stage"))
  with open(run_json, "w", encoding="utf-8") as f:
    json.dump({"fingerprint": print_}, f)
  return staging, False


def _paths(staging: str, number: int) -> tuple[str, str]:
  stem = os.path.join(staging, "stage", f"{number:06d}")
  return stem + ".npz", stem + ".report.json"


def save_result(staging: str, result: docfilter.FileResult) -> None:
  npz, report = _paths(staging, result.number)
  with open(npz + ".tmp", "wb") as f:
    np.savez(f, ids=np.array(result.ids, dtype=np.str_), exact=result.exact_N, sig=result.sig_NP,
             scores=result.scores_NR)
  with open(report + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result.report.to_json(), f)
  os.replace(npz + ".tmp", npz)
  os.replace(report + ".tmp", report)  # last: its presence marks the file done


def done_numbers(staging: str, jobs: list) -> set:
  """The numbers of the jobs an earlier attempt finished (save_result wrote all of)."""
  return {j.number for j in jobs if all(os.path.exists(p) for p in _paths(staging, j.number))}


def load_results(staging: str, jobs: list, cfg: CurateConfig) -> dict:
  """{file number: FileResult} of `jobs`, which an earlier attempt finished."""
  done = {}
  for job in jobs:
    npz, report = _paths(staging, job.number)
    with np.load(npz, allow_pickle=False) as z:
      ids, exact_N, sig_NP = [str(i) for i in z["ids"]], z["exact"], z["sig"]
      scores_NR = z["scores"] if "scores" in z.files else np.zeros((len(ids), 0), np.float32)
    with open(report, encoding="utf-8") as f:
      state = json.load(f)
    done[job.number] = docfilter.FileResult(job.number, job.staging_path, ids, exact_N, sig_NP,
                                            Report.from_json(state, cfg.output.examples_per_rule),
                                            scores_NR)
  return done


def load_reports(staging: str, jobs: list, cfg: CurateConfig) -> dict:
  """{file number: (documents kept, Report)} of `jobs`, which an earlier attempt finished,
  without their arrays (the Ray engine leaves those on the staging folder for its workers)."""
  done = {}
  for job in jobs:
    npz, report = _paths(staging, job.number)
    with open(report, encoding="utf-8") as f:
      state = json.load(f)
    done[job.number] = (dedup.npz_rows(npz, "exact"),
                        Report.from_json(state, cfg.output.examples_per_rule))
  return done


def result_path(staging: str, number: int) -> str:
  """Where save_result puts a file's ids, exact hashes and signatures."""
  return _paths(staging, number)[0]
