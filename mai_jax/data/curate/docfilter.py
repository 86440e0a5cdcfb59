"""The per-file stage of every engine: read, rules in order, decontamination, signatures.

`filter_file` is a pure function of (config, evaluation index, one input file): it writes the
file's kept documents, in file order, as output records to a staging JSONL file and returns their
ids, exact hashes, MinHash signatures and the scores of its keep_top_fraction rules (topcut.py)
with a partial report. Engines run it over files in any order and on any number of workers;
dedup, the top-fraction cuts and writing then follow one global priority order, so the output
does not depend on the engine or the worker count.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import numpy as np

from mai_jax.data.curate import decontam, dedup, minhash, records, topcut
from mai_jax.data.curate.report import Report
from mai_jax.data.curate.settings import CurateConfig, Source
from mai_jax.data.curate.textstats import DocText

READ, DECONTAM, EXACT, NEAR = "read", "decontamination", "exact_dedup", "near_dedup"


def stage_order(cfg: CurateConfig) -> list[str]:
  return [READ, *(r.name for r in cfg.rules), DECONTAM, EXACT, NEAR]


def new_report(cfg: CurateConfig) -> Report:
  return Report([s.name for s in cfg.sources], stage_order(cfg), cfg.output.examples_per_rule)


def doc_counts(text: str, doc: Optional[DocText] = None) -> dict:
  words = (doc or DocText(text)).words
  return {"docs": 1, "words": len(words), "bytes": len(text.encode("utf-8"))}


@dataclasses.dataclass
class FileJob:
  number: int        # position of the file in priority order
  source: Source
  base: str
  rel: str
  staging_path: str


@dataclasses.dataclass
class FileResult:
  number: int
  staging_path: str
  ids: list          # output ids of the kept documents, file order
  exact_N: np.ndarray
  sig_NP: np.ndarray
  report: Report
  scores_NR: np.ndarray  # float32: column r is the r-th keep_top_fraction rule's score


def filter_file(cfg: CurateConfig, index: Optional[decontam.EvalIndex], job: FileJob) -> FileResult:
  report = new_report(cfg)
  name = job.source.name
  ids, texts, ranks = [], [], []
  column = {i: c for c, i in enumerate(i for i, r in enumerate(cfg.rules) if topcut.is_ranked(r))}
  with open(job.staging_path, "w", encoding="utf-8") as staging:
    for doc_id, text, meta, reason in records.read_records(job.source.kind, job.source.field,
                                                           job.base, job.rel):
      out_id = f"{name}/{doc_id}"
      if text is None:
        report.doc_in(name, {"docs": 1, "words": 0, "bytes": 0})
        report.skipped(name, reason)
        continue
      doc = DocText(text)
      counts = doc_counts(text, doc)
      report.doc_in(name, counts)
      removed, scores, rank = False, {}, [0.0] * len(column)
      for i, rule in enumerate(cfg.rules):
        why, new_text = rule.apply(doc)
        if why is not None:
          report.removed(rule.name, why, out_id, text, counts)
          removed = True
          break
        if hasattr(rule, "fields"):  # scoring rules (quality.py) write their score into meta
          scores.update(rule.fields(doc))
        if i in column:  # scored at its place in the chain, on the text as it is there
          rank[column[i]] = rule.rank_score(doc)
        if new_text is not None:
          doc = DocText(new_text)
          report.rewritten[rule.name] += 1
      if removed:
        continue
      # The text as read, not as rewritten: C4 stripping '[1]' must not hide a leaked item.
      hit = index.match(text) if index is not None else None
      if hit is not None:
        report.removed(DECONTAM, "eval_overlap", out_id, text, counts, detail=f"{hit[0]}: {hit[1]}")
        continue
      staging.write(json.dumps({"id": out_id, "source": name, "text": doc.text,
                                "meta": {**meta, **scores}},
                               ensure_ascii=False) + "\n")
      ids.append(out_id)
      texts.append(doc.text)
      ranks.append(rank)
  d = cfg.dedup
  exact_N = np.array([dedup.exact_hash(t) for t in texts], np.uint64)
  if d.near:
    sig_NP = minhash.signatures(texts, d.ngram, d.bands * d.rows, d.seed)
  else:
    sig_NP = np.zeros((len(texts), 0), np.uint32)
  scores_NR = np.array(ranks, np.float32).reshape(len(ids), len(column))
  return FileResult(job.number, job.staging_path, ids, exact_N, sig_NP, report, scores_NR)
