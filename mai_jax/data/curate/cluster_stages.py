"""What the Ray engine's tasks compute, as pure functions of batches, groups and staged files.

No Ray here: ray_engine.py maps these over Ray Data blocks and groups, and `in_memory` runs the
same functions over the whole corpus in one process (the reference the fast test holds against
the local engine, dedup.deduplicate). The data each step reads is on the staging folder, which
every node shares, so only counts and partial reports cross to the driver:

  1. `piece_rows`: one staged file's (or one `dedup.against` signatures.npz's) documents as rows
     (doc, exact, sig), doc = the global priority number (earlier corpora first, then files in
     order, then records in file order), from the piece's first number and its row count;
  2. `exact_groups`, over whole groups of rows by exact hash: each group's survivor is its
     smallest doc (dedup.py's rule); removed rows (doc, survivor, stage=exact) for the others,
     and for each survivor with words its LSH band rows (band, k0.., doc), the band's values
     packed two uint32 per int64 so equal keys mean equal bands (no hashing: as
     minhash.band_keys);
  3. `band_edges` over whole (band, k0..) groups, then components.py's rounds: star edges
     (cluster minimum, member), the near-removed rows;
  4. `decide_file`, over the removed rows of one file (`decide_files`: of whole files): writes
     `stage/NNNNNN.removed.npz` (the file's removed positions, survivors and stages) and the
     file's dedup report part;
  then cluster_cut.py's keep_top_fraction cuts add their removals to the same files;
  5. `plan_shards`, on the driver from the per-file survivor counts only: output shard k holds
     the survivors ranked k*shard_docs .. (k+1)*shard_docs-1 in priority order, as segments
     (file, first, end) of each file's survivors, so any task can write shard k alone and the
     shards have the local engine's boundaries, names and bytes;
  6. `write_shard` per shard (tmp file, renamed; then `stage/shard-NNNNN.json` with its report
     part and size, which marks it done: a resumed run skips it); `write_signatures` once.
"""

from __future__ import annotations

import json
import os
import numpy as np

from mai_jax.data.curate import components, dedup, docfilter, records
from mai_jax.data.curate.report import Report

Batch = dict  # column name -> array
# The `stage` column: an index into this, or 2 + r for the r-th keep_top_fraction rule's cut.
STAGES = (docfilter.EXACT, docfilter.NEAR)
REMOVED, BAND = 0, 1                        # exact_groups' `kind` column


def piece(path: str, first: int, count: int, prefix: str = "", file: int = -1) -> dict:
  """One unit of documents on shared storage: a staged file's NNNNNN.npz (file = its number) or
  an earlier output's signatures.npz (prefix 'prior:', file -1)."""
  return {"path": path, "first": first, "count": count, "prefix": prefix, "file": file}


def layout(priors: list[tuple[str, int]], files: list[tuple[str, int]]
           ) -> tuple[list[dict], list[dict], int]:
  """Pieces numbered in priority order from (path, documents) of the earlier outputs and of
  the staged files: (all pieces, the files' pieces, documents before the first file)."""
  pieces, first = [], 0
  for path, count in priors:
    pieces.append(piece(os.path.abspath(path), first, count, "prior:"))
    first += count
  n_prior = first
  for number, (path, count) in enumerate(files):
    pieces.append(piece(path, first, count, file=number))
    first += count
  return pieces, pieces[len(priors):], n_prior


def key_columns(rows: int) -> list[str]:
  return [f"k{i}" for i in range((rows + 1) // 2)]


def piece_rows(p: dict, num_perm: int, exact: bool) -> Batch:
  """Rows (doc, exact, sig) of one piece; `exact` False keys every document apart."""
  with np.load(p["path"], allow_pickle=False) as z:
    exact_N = z["exact"].astype(np.uint64)
    sig_NP = z["sig"][:, :num_perm].astype(np.uint32) if num_perm else None
  doc_N = int(p["first"]) + np.arange(len(exact_N), dtype=np.int64)
  out = {"doc": doc_N, "exact": exact_N.view(np.int64) if exact else -1 - doc_N}
  if sig_NP is not None:
    out["sig"] = sig_NP
  return out


def _whole_groups(keys: list[np.ndarray], doc_N: np.ndarray):
  """Rows sorted by (keys.., doc): the order, the sorted docs, each row's group minimum doc."""
  order = np.lexsort((doc_N, *reversed(keys)))
  doc_N = doc_N[order]
  new = np.zeros(len(doc_N), bool)
  new[:1] = True
  for key in keys:
    key = np.asarray(key)[order]
    new[1:] |= key[1:] != key[:-1]
  starts = np.nonzero(new)[0]
  return order, doc_N, np.repeat(doc_N[starts], np.diff(np.append(starts, len(doc_N))))


def exact_groups(batch: Batch, bands: int, rows: int, n_prior: int) -> Batch:
  """Whole groups of rows by `exact` -> removed rows (kind REMOVED: doc, survivor; `cluster` 1
  on one row of each group that removes a document of this run: report.json's
  duplicate_clusters_exact) and the survivors' band rows (kind BAND: band, k0.., doc)."""
  doc_N = np.asarray(batch["doc"], np.int64)
  order, doc_N, survivor_N = _whole_groups([np.asarray(batch["exact"], np.int64)], doc_N)
  gone = doc_N != survivor_N
  # one row per group: the group's last removed member, counted when it is of this run
  last = gone & np.append(survivor_N[1:] != survivor_N[:-1], True)
  cluster = (last & (doc_N >= n_prior)).astype(np.int64)
  cols = key_columns(rows)
  removed = {"kind": np.full(gone.sum(), REMOVED, np.int64), "doc": doc_N[gone],
             "survivor": survivor_N[gone], "cluster": cluster[gone],
             "band": np.full(gone.sum(), -1, np.int64),
             **{c: np.zeros(gone.sum(), np.int64) for c in cols}}
  if "sig" not in batch or not bands:
    return removed
  sig_NP = np.asarray(batch["sig"], np.uint32).reshape(len(order), -1)[order]
  keep = ~gone & ~np.all(sig_NP == np.iinfo(np.uint32).max, axis=1)  # wordless: no shingles
  docs, sig_NP = doc_N[keep], sig_NP[keep]
  band_rows = {"kind": [], "doc": [], "survivor": [], "cluster": [], "band": [],
               **{c: [] for c in cols}}
  for b in range(bands):
    band_NR = sig_NP[:, b * rows:(b + 1) * rows]
    if rows % 2:
      band_NR = np.concatenate([band_NR, np.zeros((len(docs), 1), np.uint32)], axis=1)
    packed_NK = np.ascontiguousarray(band_NR).view(np.int64)
    for name, values in zip(("kind", "doc", "survivor", "cluster", "band"),
                            (BAND, docs, docs, 0, b)):
      band_rows[name].append(np.broadcast_to(np.asarray(values, np.int64), docs.shape))
    for i, c in enumerate(cols):
      band_rows[c].append(packed_NK[:, i])
  return {k: np.concatenate([removed[k], *band_rows[k]]) for k in removed}


def band_edges(batch: Batch, keys: list[str]) -> Batch:
  """Whole groups of band rows by (band, keys..) -> edges (the group's smallest doc, each other
  doc of the group)."""
  doc_N = np.asarray(batch["doc"], np.int64)
  _, doc_N, low_N = _whole_groups([np.asarray(batch[k], np.int64) for k in ["band", *keys]],
                                  doc_N)
  other = doc_N != low_N
  return {"a": low_N[other], "b": doc_N[other]}


def removed_rows(batch: Batch, stage: int) -> Batch:
  """Columns (doc, survivor, stage) from exact_groups' removed rows (stage 0) or star edges
  (minimum a, member b; stage 1)."""
  if stage == 0:
    doc, survivor = batch["doc"], batch["survivor"]
  else:
    doc, survivor = batch["b"], batch["a"]
  doc = np.asarray(doc, np.int64)
  return {"doc": doc, "survivor": np.asarray(survivor, np.int64),
          "stage": np.full(len(doc), stage, np.int64)}


def locate(batch: Batch, firsts: np.ndarray) -> Batch:
  """Adds each row's file (index into the file pieces, whose first numbers are `firsts`)."""
  doc = np.asarray(batch["doc"], np.int64)
  return {**batch, "file": np.searchsorted(firsts, doc, side="right").astype(np.int64) - 1}


class Ids:
  """Document number -> output id, reading each piece's ids once (only for report examples)."""

  def __init__(self, pieces: list[dict]):
    self.pieces = pieces
    self.firsts = np.array([p["first"] for p in pieces], np.int64)
    self.loaded: dict = {}

  def __call__(self, doc: int) -> str:
    i = int(np.searchsorted(self.firsts, doc, side="right")) - 1
    if i not in self.loaded:
      with np.load(self.pieces[i]["path"], allow_pickle=False) as z:
        self.loaded[i] = z["ids"]
    return self.pieces[i]["prefix"] + str(self.loaded[i][doc - self.pieces[i]["first"]])


def removed_path(staging_path: str) -> str:
  return staging_path[:-len(".jsonl")] + ".removed.npz"


def decide_file(batch: Batch, files: list[dict], staging_paths: list[str], ids: Ids,
                blank: Report) -> dict:
  """The removed rows of one file -> its NNNNNN.removed.npz (positions in the file's staged
  documents, sorted; survivors; stages) and its dedup removals as a report like `blank` (the
  local engine's write pass's counts, examples and details for this file), as JSON."""
  report = Report(list(blank.sources), list(blank.stages), blank.examples_per_rule)
  f = int(np.asarray(batch["file"])[0])
  order = np.argsort(np.asarray(batch["doc"], np.int64))
  local = np.asarray(batch["doc"], np.int64)[order] - files[f]["first"]
  survivor = np.asarray(batch["survivor"], np.int64)[order]
  stage = np.asarray(batch["stage"], np.int64)[order]
  path = removed_path(staging_paths[f])
  with open(path + ".tmp", "wb") as out:
    np.savez(out, local=local, survivor=survivor, stage=stage)
  os.replace(path + ".tmp", path)
  wanted = dict(zip(local.tolist(), zip(survivor.tolist(), stage.tolist())))
  with open(staging_paths[f], encoding="utf-8") as lines:
    for n, line in enumerate(lines):
      if n in wanted:
        rec, (s, st) = json.loads(line), wanted[n]
        name = STAGES[st]
        detail = (f"kept {ids(s)}" if len(report.stages[name]["examples"])
                  < report.examples_per_rule else None)
        report.removed(name, "duplicate", rec["id"], rec["text"],
                       docfilter.doc_counts(rec["text"]), detail=detail)
  return {"file": f, "removed": len(local), "report": json.dumps(report.to_json())}


def decide_files(batch: Batch, files: list[dict], staging_paths: list[str], ids: Ids,
                 blank: Report) -> dict:
  """decide_file over each file whose removed rows `batch` holds (all of them: whole groups by
  file); columns file, removed, report."""
  file_N = np.asarray(batch["file"], np.int64)
  outs = [decide_file({k: np.asarray(v)[file_N == f] for k, v in batch.items()}, files,
                      staging_paths, ids, blank) for f in np.unique(file_N).tolist()]
  return {k: [o[k] for o in outs] for k in ("file", "removed", "report")}


def distinct(batch: Batch, column: str) -> Batch:
  """The number of distinct values of `column` in whole groups by it (summed over batches: the
  number in the dataset)."""
  return {"distinct": np.array([len(np.unique(np.asarray(batch[column])))], np.int64)}


def plan_shards(kept_F: list[int], shard_docs: int) -> list[list[tuple[int, int, int]]]:
  """Per shard, segments (file index, first, end) of the files' survivors (kept_F of each, in
  priority order), shard_docs survivors a shard: the local engine's ShardWriter boundaries."""
  plan, current, room = [], [], shard_docs
  for f, kept in enumerate(kept_F):
    start = 0
    while start < kept:
      take = min(room, kept - start)
      current.append((f, start, start + take))
      start, room = start + take, room - take
      if room == 0:
        plan.append(current)
        current, room = [], shard_docs
  if current:
    plan.append(current)
  return plan


def clear_removed(staging_paths: list[str]) -> None:
  """Removes every file's NNNNNN.removed.npz: decisions are made afresh each attempt (a resumed
  run must not count an earlier attempt's top-fraction removals as dedup's)."""
  for staged in staging_paths:
    if os.path.exists(removed_path(staged)):
      os.remove(removed_path(staged))


def add_removed(staging_path: str, local: np.ndarray, stage: int) -> None:
  """More removed positions (survivor -1) in a file's NNNNNN.removed.npz, kept sorted."""
  path = removed_path(staging_path)
  parts = {"local": [np.asarray(local, np.int64)],
           "survivor": [np.full(len(local), -1, np.int64)],
           "stage": [np.full(len(local), stage, np.int64)]}
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      for k in parts:
        parts[k].insert(0, z[k])
  merged = {k: np.concatenate(v) for k, v in parts.items()}
  order = np.argsort(merged["local"], kind="stable")
  with open(path + ".tmp", "wb") as out:
    np.savez(out, **{k: v[order] for k, v in merged.items()})
  os.replace(path + ".tmp", path)


def removed_local(staging_path: str) -> np.ndarray:
  """The sorted positions of a file's removed documents (dedup's and the cuts')."""
  path = removed_path(staging_path)
  if not os.path.exists(path):
    return np.zeros(0, np.int64)
  with np.load(path, allow_pickle=False) as z:
    return z["local"]


def _survivor_lines(staging_path: str, start: int, end: int):
  """Survivors start..end-1 (ranks among the file's survivors) of one staged file, as records."""
  removed, rank = set(removed_local(staging_path).tolist()), 0
  with open(staging_path, encoding="utf-8") as lines:
    for n, line in enumerate(lines):
      if n in removed:
        continue
      if rank >= end:
        return
      if rank >= start:
        yield json.loads(line)
      rank += 1


def shard_done_path(staging: str, number: int) -> str:
  return os.path.join(staging, "stage", f"shard-{number:05d}.json")


def write_shard(number: int, segments: list, staging_paths: list[str], staging: str, fmt: str,
                blank: Report) -> dict:
  """Shard `number` of the plan into staging/data; returns its file name and its survivors'
  out-counts (a report like `blank`, as JSON). A shard an earlier attempt finished is not
  written again: its saved counts come back."""
  name = records.shard_name(number, fmt)
  path, done = os.path.join(staging, "data", name), shard_done_path(staging, number)
  if os.path.exists(done) and os.path.exists(path):
    with open(done, encoding="utf-8") as f:
      state = json.load(f)
    if state["bytes"] == os.path.getsize(path):
      return {"name": name, "report": json.dumps(state["report"])}
  part = Report(list(blank.sources), list(blank.stages), blank.examples_per_rule)
  rows = [rec for f, start, end in segments
          for rec in _survivor_lines(staging_paths[f], start, end)]
  for rec in rows:
    part.doc_out(rec["source"], docfilter.doc_counts(rec["text"]))
  tmp = os.path.join(staging, "data", f".{name}.tmp")
  records.write_shard(tmp, fmt, rows)
  os.replace(tmp, path)
  with open(done + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"bytes": os.path.getsize(path), "report": part.to_json()}, f)
  os.replace(done + ".tmp", done)
  return {"name": name, "report": json.dumps(part.to_json())}


def write_signatures(path: str, files: list[dict], staging_paths: list[str], params: dict) -> int:
  """signatures.npz of the survivors (ids, exact hashes, signatures in priority order), from the
  staged arrays less each file's removed documents; returns their number."""
  ids, exact, sig = [], [], []
  for p, staged in zip(files, staging_paths):
    with np.load(p["path"], allow_pickle=False) as z:
      keep = np.ones(len(z["exact"]), bool)
      keep[removed_local(staged)] = False
      ids += [str(i) for i in z["ids"][keep]]
      exact.append(z["exact"][keep])
      sig.append(z["sig"][keep])
  num_perm = sig[0].shape[1] if sig else 0
  dedup.save_signatures(path, ids, np.concatenate(exact + [np.zeros(0, np.uint64)]),
                        np.concatenate(sig + [np.zeros((0, num_perm), np.uint32)]), params)
  return len(ids)


def in_memory(pieces: list[dict], staging_paths: list[str], cfg, report: Report,
              n_prior: int) -> tuple[list[int], dict]:
  """Steps 1-4 in one process, every piece's rows one batch of whole groups (priors first, then
  the files): each file's survivor count, and the duplicate cluster counts; `report` gets the
  files' dedup removals."""
  d = cfg.dedup
  num_perm = d.bands * d.rows if d.near else 0
  parts = [piece_rows(p, num_perm, d.exact) for p in pieces if p["count"]]
  files = pieces[len(pieces) - len(staging_paths):]
  kept = [p["count"] for p in files]
  if not parts:
    return kept, {"duplicate_clusters_exact": 0, "duplicate_clusters_near": 0}
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  grouped = exact_groups(rows, d.bands if d.near else 0, d.rows, n_prior)
  gone = grouped["kind"] == REMOVED
  removed = [removed_rows({k: v[gone] for k, v in grouped.items()}, 0)]
  edges = band_edges({k: v[~gone] for k, v in grouped.items()}, key_columns(d.rows))
  near_clusters = 0
  if len(edges["a"]):
    n = int(rows["doc"].max()) + 1
    labels, _ = components.in_memory(n, edges["a"], edges["b"])
    member = np.nonzero(labels != np.arange(n))[0]
    removed.append(removed_rows({"a": labels[member], "b": member}, 1))
    near_clusters = len(np.unique(labels[member[member >= n_prior]]))
  table = locate({c: np.concatenate([r[c] for r in removed]) for c in removed[0]},
                 np.array([p["first"] for p in files], np.int64))
  table = {k: v[table["doc"] >= n_prior] for k, v in table.items()}
  if len(table["doc"]):
    out = decide_files(table, files, staging_paths, Ids(pieces), report)
    for f, count, part in zip(out["file"], out["removed"], out["report"]):
      kept[f] -= count
      report.merge(Report.from_json(json.loads(part), report.examples_per_rule))
  return kept, {"duplicate_clusters_exact": int(grouped["cluster"][gone].sum()),
                "duplicate_clusters_near": near_clusters}
