"""The Ray engine's keep_top_fraction cuts (topcut.py), as pure functions of chunks of staged files.

After dedup has written each file's removed documents (cluster_stages step 4), for each
keep_top_fraction rule in config order, over the documents still kept:
  1. `chunk_histogram` over contiguous chunks of files: the 256 digit counts of the documents'
     score keys (or, when the cut splits a group of equal scores, of those documents' priority
     numbers); the driver adds them up and topcut.select_cut finds the exact cut in 4 passes
     (and at most 8 more to split a tie): 2 KiB a task a pass reach the driver, no scores;
  2. `cut_chunk`: each file's documents past the cut join its NNNNNN.removed.npz (stage 2 + r,
     survivor -1), the mask the shard writer and signatures.npz read, with the file's report
     part (under the rule, reason topcut.REASON, the score and the cut in each example).
`run_cuts` is the driver's loop over rules, given `map_chunks(fn, chunks, **kwargs)` (a list of
fn's results): Ray tasks in ray_engine.py, a plain loop in the fast test. The local engine sorts
the same keys (topcut.local_cuts); the test holds the two to the same survivors and report.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from mai_jax.data.curate import cluster_stages, docfilter, topcut
from mai_jax.data.curate.report import Report

Chunk = list  # [(file piece, staged JSONL path)], contiguous in priority order


def _alive(p: dict, staging_path: str, column: int, higher: bool):
  """(keys, priority numbers, positions, scores) of a file's documents not yet removed."""
  with np.load(p["path"], allow_pickle=False) as z:
    score_N = z["scores"][:, column]
  alive = np.ones(len(score_N), bool)
  alive[cluster_stages.removed_local(staging_path)] = False
  local = np.nonzero(alive)[0]
  return topcut.score_keys(score_N[local], higher), p["first"] + local, local, score_N[local]


def chunk_histogram(chunk: Chunk, column: int, higher: bool, shift: int, prefix: int,
                    tie) -> np.ndarray:
  """topcut.digit_counts over a chunk's kept documents: of their keys (tie None) or of the
  priority numbers of those whose key is `tie`."""
  total = np.zeros(256, np.int64)
  for p, staged in chunk:
    key_N, doc_N, _, _ = _alive(p, staged, column, higher)
    keys = key_N if tie is None else doc_N[key_N == np.uint64(tie)].astype(np.uint64)
    total += topcut.digit_counts(keys, shift, prefix)
  return total


def cut_chunk(chunk: Chunk, column: int, higher: bool, cut, cut_score, rule: str,
              blank: Report) -> list[dict]:
  """Removes each file's documents past `cut` ((key, doc), or None: all): per file with
  removals its number, how many and its report part (JSON), like decide_file's."""
  outs = []
  for p, staged in chunk:
    key_N, doc_N, local, score_N = _alive(p, staged, column, higher)
    gone = np.ones(len(key_N), bool) if cut is None else ~topcut.kept_by_cut(key_N, doc_N, cut)
    if not gone.any():
      continue
    cluster_stages.add_removed(staged, local[gone], len(cluster_stages.STAGES) + column)
    report = Report(list(blank.sources), list(blank.stages), blank.examples_per_rule)
    wanted = dict(zip(local[gone].tolist(), score_N[gone].tolist()))
    with open(staged, encoding="utf-8") as lines:
      for n, line in enumerate(lines):
        if n in wanted:
          rec = json.loads(line)
          report.removed(rule, topcut.REASON, rec["id"], rec["text"],
                         docfilter.doc_counts(rec["text"]),
                         detail=topcut.detail(wanted[n], cut_score))
    outs.append({"file": int(p["file"]), "removed": int(gone.sum()),
                 "report": json.dumps(report.to_json())})
  return outs


MapChunks = Callable[..., list]  # (fn, chunks, **kwargs) -> [fn(chunk, **kwargs) for chunk]


def run_cuts(cfg, files: list[dict], staging_paths: list[str], kept: list[int], blank: Report,
             map_chunks: MapChunks, chunks: int) -> tuple[list[int], list[Report], dict]:
  """Every keep_top_fraction rule's cut, in config order, over files (cluster_stages.layout's
  file pieces) whose survivors number `kept`: (the survivors after the cuts, each file's report
  parts in rule then file order, report.json's top_fraction)."""
  kept, parts, info = list(kept), [], {}
  live = [(files[f], staging_paths[f]) for f in range(len(files)) if files[f]["count"]]
  groups = [list(g) for g in np.array_split(np.arange(len(live)), max(1, min(chunks, len(live))))
            if len(g)]
  groups = [[live[i] for i in g] for g in groups]
  doc_bits = int(files[-1]["first"] + files[-1]["count"]).bit_length() if files else 1
  for column, rule in enumerate(topcut.ranked(cfg.rules)):
    higher = rule.higher_is_better
    n = sum(kept)
    k = topcut.keep_count(rule.keep_top_fraction, n)
    cut, cut_score = None, None
    if k:
      def histogram(shift, prefix, tie, column=column, higher=higher):
        return sum(map_chunks(chunk_histogram, groups, column=column, higher=higher,
                              shift=shift, prefix=prefix, tie=tie))
      cut = topcut.select_cut(histogram, k, doc_bits)
      cut_score = topcut.key_score(cut[0], higher)
    if k < n:
      outs = [o for chunk_outs in map_chunks(cut_chunk, groups, column=column, higher=higher,
                                             cut=cut, cut_score=cut_score, rule=rule.name,
                                             blank=blank)
              for o in chunk_outs]
      for out in sorted(outs, key=lambda o: o["file"]):
        kept[out["file"]] -= out["removed"]
        parts.append(Report.from_json(json.loads(out["report"]), blank.examples_per_rule))
    info[rule.name] = topcut.summary(rule, n, k, cut_score)
  return kept, parts, info


def in_process(fn, chunks: list, **kwargs) -> list:
  """A MapChunks in this process (the fast test's stand-in for Ray tasks)."""
  return [fn(chunk, **kwargs) for chunk in chunks]
