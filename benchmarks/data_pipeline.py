"""Input-pipeline throughput: packed rows ready for the device, per host, from (a) the token cache
and (b) on-the-fly tokenization, each with 0 and 2 workers; plus the token cache's write rate.

  python benchmarks/data_pipeline.py [--max-files N] [--seq-len T] [--batch B] [--seconds S]
                                     [--out benchmarks/results/data_pipeline_cpu.json]

Corpus: the embedded stdlib source (first --max-files files), tokenizer: SentencePiece BPE, vocab
4096, trained on it first. Cache workers are reader threads; on-the-fly workers are grain
processes (see mai_jax/data/cache_pipeline.py and pipeline.py for why).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import git_commit, machine_info  # noqa: E402  (the shared benchmark record)

from mai_jax.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from mai_jax.data import cache, load_or_train_tokenizer, make_train_iterator, sources  # noqa: E402


def delivered(cfg: Config, tok, seconds: float) -> dict:
  """Tokens/s of host rows (all seq_len positions of every row) over `seconds` after one batch."""
  it = make_train_iterator(cfg, tok)
  try:
    next(it)
    start, batches, real = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
      batch = next(it)
      batches += 1
      real += int(np.count_nonzero(batch["segment_ids"]))
    elapsed = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  rows = cfg.train.global_batch_size * batches
  return {"tokens_per_s": rows * cfg.data.seq_len / elapsed,
          "real_tokens_per_s": real / elapsed, "batches": batches, "seconds": elapsed}


def versions() -> dict:
  from importlib import metadata
  return {name: metadata.version(name)
          for name in ("jax", "grain", "tensorstore", "sentencepiece", "numpy")}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--max-files", type=int, default=400)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=8.0)
  parser.add_argument("--out", default="benchmarks/results/data_pipeline_cpu.json")
  args = parser.parse_args(argv)

  base = Config(model=ModelConfig(vocab_size=4096),
                data=DataConfig(seq_len=args.seq_len, max_files=args.max_files,
                                tokenizer_train_chars=1_000_000),
                train=TrainConfig(global_batch_size=args.batch))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    tok = load_or_train_tokenizer(base, tmp)
    spec = sources.source_specs(base.data)[0]
    sources.spec_documents(spec, base.data.max_files)  # read the files once, outside the timings
    start = time.perf_counter()
    manifest = cache.tokenize_source(spec, base.data, tok, os.path.join(tmp, "cache"), workers=2)
    write_s = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    results["cache_write"] = {"tokens": tokens, "seconds": write_s,
                              "tokens_per_s": tokens / write_s, "workers": 2,
                              "note": "tokenization (2 threads) + tensorstore writes"}
    cached = dataclasses.replace(base, data=dataclasses.replace(base.data, sources=(
        {"name": "stdlib", "kind": "cache", "path": os.path.join(tmp, "cache")},)))
    for workers in (0, 2):
      for label, cfg in (("cache", cached), ("on_the_fly", base)):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, worker_count=workers))
        results[f"{label}_workers{workers}"] = delivered(cfg, tok, args.seconds)
        print(label, workers, f"{results[f'{label}_workers{workers}']['tokens_per_s']:,.0f} tok/s",
              flush=True)
  record = {
      "benchmark": "data_pipeline",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python", "benchmarks/data_pipeline.py"] + argv),
      "git_commit": git_commit(), "machine": machine_info(), "versions": versions(),
      "setup": {"corpus": f"stdlib, first {args.max_files} files", "vocab_size": 4096,
                "seq_len": args.seq_len, "global_batch_size": args.batch, "process_count": 1,
                "tokens_per_s": "host rows x seq_len per second (what the device receives)",
                "real_tokens_per_s": "the same, counting only non-padding (segment id > 0)"},
      "goal": {"cache_tokens_per_s": 1_000_000},
      "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(results, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
