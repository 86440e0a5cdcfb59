"""Curation throughput per core, side by side with datatrove on the same corpus: each heuristic
rule, language id, and MinHash signatures; plus the agreement of kept documents per shared rule.

  python benchmarks/curate.py [--docs N] [--datatrove DIR] [--out benchmarks/results/curate_cpu.json]

Corpus: English prose with code that is on every machine: the stdlib's pydoc topics, .rst/.txt
notes and the docstrings of its modules (one text per module), cut at blank lines into documents
of 1-4 KB, plus near copies (10%: two words changed), in one fixed order. One process, so docs/s and MB/s are per core.

datatrove (not a dependency: `pip install --target DIR datatrove dill loguru multiprocess` and
pass --datatrove DIR) reads English words with NLTK's punkt, which must be downloaded; this
benchmark swaps in mai_jax's regex word splitter (textstats.WORD_RE) and sentence splitter
(rules.SENTENCE_SPLIT_RE, what its C4 rule counts with), so the comparison is of the rule code,
and the agreement figures isolate rule differences from tokenizer differences. Its MinHash stage is timed through its own
get_shingles + get_signature (sha1 shingle hashes, since its default xxhash path fails with
xxhash 4.x; NumPy universal hashing; 14 x 8).
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import save_result  # noqa: E402  (the shared benchmark record)

from mai_jax.data.curate import langid, minhash, rules  # noqa: E402
from mai_jax.data.curate.textstats import WORD_RE, DocText  # noqa: E402

SHARED_RULES = {"gopher_quality": "GopherQualityFilter", "gopher_repetition":
                "GopherRepetitionFilter", "c4": "C4QualityFilter", "fineweb": "FineWebQualityFilter"}


def corpus(max_docs: int) -> list[str]:
  """Documents of 1-4 KB from the stdlib's documentation text, then 10% near copies."""
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  lib = sysconfig.get_paths()["stdlib"]
  for path in sorted(glob.glob(os.path.join(lib, "**", "*.rst"), recursive=True)
                     + glob.glob(os.path.join(lib, "**", "*.txt"), recursive=True)):
    if "site-packages" not in path and "/test" not in path:
      with open(path, encoding="utf-8", errors="replace") as f:
        texts.append(f.read())
  for path in sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)):
    if "site-packages" in path or "/test" in path:
      continue
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    texts.append("\n\n".join(d for node in ast.walk(tree)
                              if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                              and (d := ast.get_docstring(node))))
  docs = []
  for text in texts:
    current = ""
    for para in re.split(r"\n\s*\n", text):
      current = f"{current}\n\n{para}" if current else para
      if len(current) >= 1024:
        docs.append(current[:4096])
        current = ""
    if len(current) >= 256:
      docs.append(current)
  docs = docs[:int(max_docs / 1.1)]
  rng = random.Random(0)
  for i in range(len(docs) // 10):
    words = docs[i * 7 % len(docs)].split(" ")
    for _ in range(2):
      words[rng.randrange(len(words))] = "changed"
    docs.append(" ".join(words))
  return docs


def timed(fn, docs, mb) -> tuple[dict, list]:
  t0 = time.perf_counter()
  out = [fn(d) for d in docs]
  dt = time.perf_counter() - t0
  return {"docs_per_s": round(len(docs) / dt, 1), "mb_per_s": round(mb / dt, 3),
          "seconds": round(dt, 3)}, out


def our_rules(docs, mb) -> tuple[dict, dict]:
  speed, kept = {}, {}
  for name in SHARED_RULES:
    rule = {r.name: r for r in (rules.GopherQuality(), rules.GopherRepetition(),
                                rules.C4Quality(), rules.FineWebQuality())}[name]
    speed[name], decisions = timed(lambda d, r=rule: r.apply(DocText(d))[0] is None, docs, mb)
    kept[name] = decisions
  chain = [rules.GopherRepetition(), rules.GopherQuality(), rules.C4Quality(),
           rules.FineWebQuality()]

  def run_chain(text):
    doc = DocText(text)
    for rule in chain:
      why, new = rule.apply(doc)
      if why:
        return False
      if new is not None:
        doc = DocText(new)
    return True
  speed["chain_4_rules"], _ = timed(run_chain, docs, mb)
  speed["language"], _ = timed(lambda d: langid.Language().apply(DocText(d)), docs, mb)
  return speed, kept


def patch_datatrove_tokenizer():
  from datatrove.pipeline.dedup import minhash as dt_minhash  # pylint: disable=import-outside-toplevel
  from datatrove.utils import word_tokenizers  # pylint: disable=import-outside-toplevel

  class RegexTokenizer(word_tokenizers.WordTokenizer):
    def word_tokenize(self, text):
      return WORD_RE.findall(text)

    def sent_tokenize(self, text):
      return [s for s in rules.SENTENCE_SPLIT_RE.split(text) if s]

    def span_tokenize(self, text):
      return list(word_tokenizers.simple_span_tokenize(text, self.sent_tokenize(text)))

  tok = RegexTokenizer("en")
  word_tokenizers.load_word_tokenizer = lambda language=None: tok
  dt_minhash.load_word_tokenizer = word_tokenizers.load_word_tokenizer


def datatrove_rules(docs, mb) -> tuple[dict, dict]:
  from datatrove.data import Document  # pylint: disable=import-outside-toplevel
  from datatrove.pipeline import filters  # pylint: disable=import-outside-toplevel
  speed, kept = {}, {}

  def keep(flt, text):
    result = flt.filter(Document(text=text, id="x"))
    return result is True or (isinstance(result, tuple) and result[0])
  for name, cls in SHARED_RULES.items():
    flt = getattr(filters, cls)()
    speed[name], kept[name] = timed(lambda d, f=flt: keep(f, d), docs, mb)
  chain = [filters.GopherRepetitionFilter(), filters.GopherQualityFilter(),
           filters.C4QualityFilter(), filters.FineWebQualityFilter()]

  def run_chain(text):
    doc = Document(text=text, id="x")
    for flt in chain:
      result = flt.filter(doc)
      if not (result is True or (isinstance(result, tuple) and result[0])):
        return False
    return True
  speed["chain_4_rules"], _ = timed(run_chain, docs, mb)
  return speed, kept


def agreement(ours: list, theirs: list) -> dict:
  a, b = np.array(ours), np.array(theirs)
  return {"agree": round(float(np.mean(a == b)), 4), "kept_by_both": int(np.sum(a & b)),
          "removed_by_both": int(np.sum(~a & ~b)), "only_mai_jax_removes": int(np.sum(~a & b)),
          "only_datatrove_removes": int(np.sum(a & ~b))}


def candidate_pairs(sig_NP: np.ndarray) -> set:
  pairs = set()
  for key_N in minhash.band_keys(sig_NP, 14, 8):
    order = np.argsort(key_N, kind="stable")
    same = np.nonzero(key_N[order][1:] == key_N[order][:-1])[0]
    pairs.update((int(order[j]), int(order[j + 1])) for j in same)
  return {tuple(sorted(p)) for p in pairs}


def minhash_bench(docs, mb, with_datatrove: bool) -> dict:
  out = {}
  t0 = time.perf_counter()
  sig_NP = minhash.signatures(docs, 5, 112, 1)
  dt = time.perf_counter() - t0
  out["mai_jax_rensa"] = {"docs_per_s": round(len(docs) / dt, 1), "mb_per_s": round(mb / dt, 3),
                          "seconds": round(dt, 3)}
  sets = [minhash.shingles(d, 5) for d in docs]
  t0 = time.perf_counter()
  minhash.set_signatures(sets, 112, 1)
  out["rensa_given_shingles"] = {"docs_per_s": round(len(docs) / (time.perf_counter() - t0), 1)}
  try:
    import datasketch  # pylint: disable=import-outside-toplevel
    encoded = [[s.encode() for s in x] for x in sets]
    t0 = time.perf_counter()
    datasketch.MinHash.bulk(encoded, num_perm=112, seed=1)
    out["datasketch_bulk_given_shingles"] = {
        "docs_per_s": round(len(docs) / (time.perf_counter() - t0), 1),
        "version": datasketch.__version__ if hasattr(datasketch, "__version__") else None}
  except ImportError:
    out["datasketch_bulk_given_shingles"] = "not installed"
  ours_pairs = candidate_pairs(sig_NP)
  out["mai_jax_candidate_pairs"] = len(ours_pairs)
  if with_datatrove:
    from datatrove.pipeline.dedup.minhash import (  # pylint: disable=import-outside-toplevel
        MinhashConfig, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig  # pylint: disable=import-outside-toplevel
    # Its default xxhash shingle hash passes str to xxhash 4.x, which wants bytes: use sha1.
    stage = MinhashDedupSignature(output_folder=tempfile.mkdtemp(), config=MinhashConfig(
        hash_config=HashConfig(precision=64, hash_fc="sha1")))

    def sig(text):
      return np.array(stage.get_signature(stage.get_shingles(text)), np.uint64).ravel()
    out["datatrove"], dt_sigs = timed(sig, docs, mb)
    dt_pairs = candidate_pairs(np.stack(dt_sigs).astype(np.uint32))
    out["datatrove_candidate_pairs"] = len(dt_pairs)
    out["candidate_pairs_in_both"] = len(ours_pairs & dt_pairs)
  return out


def engine_bench(docs, mb) -> dict:
  """`pipeline.curate` (engine local) end to end (default rule chain, decontamination, exact + near dedup, JSONL out)
  on the corpus as 8 JSONL files, with 1 and 2 worker processes."""
  from mai_jax.data.curate import pipeline, settings  # pylint: disable=import-outside-toplevel
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for k in range(8):
      with open(os.path.join(tmp, f"in{k}.jsonl"), "w", encoding="utf-8") as f:
        for d in docs[k::8]:
          f.write(json.dumps({"text": d}) + "\n")
    for workers in (1, 2):
      cfg = settings.parse({"sources": [{"name": "docs", "path": os.path.join(tmp, "in*.jsonl")}],
                            "workers": workers}, "benchmark")
      t0 = time.perf_counter()
      report = pipeline.curate(cfg, os.path.join(tmp, f"out{workers}"), log=lambda m: None)
      dt = time.perf_counter() - t0
      out[f"workers_{workers}"] = {"docs_per_s": round(len(docs) / dt, 1),
                                   "mb_per_s": round(mb / dt, 3), "seconds": round(dt, 3),
                                   "docs_out": report["sources"]["docs"]["out"]["docs"]}
  return out


def versions(with_datatrove: bool) -> dict:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  names = ["rensa", "py3langid", "numpy", "datasketch"] + (["datatrove"] if with_datatrove else [])
  found = {}
  for name in names:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = None
  return found


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, default=3000)
  parser.add_argument("--datatrove", default="", help="folder datatrove was pip-installed into")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "curate_cpu.json"))
  args = parser.parse_args(argv)
  with_dt = bool(args.datatrove)
  if with_dt:
    sys.path.insert(0, args.datatrove)
    patch_datatrove_tokenizer()
  docs = corpus(args.docs)
  mb = sum(len(d.encode()) for d in docs) / 1e6
  speed, kept = our_rules(docs, mb)
  result = {"corpus": {"docs": len(docs), "mb": round(mb, 3),
                       "what": "stdlib pydoc topics, .rst/.txt, module docstrings; 1-4 KB chunks; "
                               "+10% near copies"},
            "mai_jax": speed}
  if with_dt:
    dt_speed, dt_kept = datatrove_rules(docs, mb)
    result["datatrove"] = dt_speed
    result["agreement_of_kept"] = {n: agreement(kept[n], dt_kept[n]) for n in SHARED_RULES}
    result["speedup_vs_datatrove"] = {n: round(speed[n]["docs_per_s"] / dt_speed[n]["docs_per_s"], 2)
                                      for n in dt_speed}
  result["minhash_14x8_5gram"] = minhash_bench(docs, mb, with_dt)
  result["engine_local_end_to_end"] = engine_bench(docs, mb)
  save_result("curate", argv, {"curate_versions": versions(with_dt), "result": result}, args.out)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
