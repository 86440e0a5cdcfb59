"""Bytes per document that reach the driver of `mai-jax data curate --engine ray`, and its wall
time next to `--engine local`, on a synthetic corpus with exact and near duplicates.

  python benchmarks/curate_ray_driver.py [--docs 20000] [--files 40] [--workers 2] [--code DIR]
      [--out benchmarks/results/curate_ray_driver.json]

Counted: everything Ray Data hands back to the engine on the driver (rows of iter_rows, also
under take/take_all, batches of iter_batches, count/sum results), as the bytes of the values
(str/bytes lengths, array nbytes, 8 per number), not Ray's serialization or its own metadata.
`--code DIR` runs another copy of mai_jax (e.g. `git archive <commit> mai_jax | tar -x -C DIR`,
and run from DIR so Ray's workers import it too): the engine before a change, measured the same
way. `same_output`: both engines wrote the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--docs", type=int, default=20000)
ap.add_argument("--files", type=int, default=40)
ap.add_argument("--workers", type=int, default=2)
ap.add_argument("--code", default="")
ap.add_argument("--out", default="")
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.code or os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402

import mai_jax  # noqa: E402
from mai_jax.data.curate import pipeline, ray_engine, settings  # noqa: E402

WORDS = ("the people who live in this small town have always said that river is heart of their "
         "community and many families walk along its banks every evening children play near old "
         "trees while parents talk about work school weather food history music books gardens "
         "markets bridges roads farms houses").split()


def corpus(root: str, docs: int, files: int) -> None:
  """docs documents of 60-200 words; 10% exact copies (spacing changed), 10% near copies (two
  words changed) of an earlier document, anywhere in the corpus."""
  rng = random.Random(0)
  texts = []
  for i in range(docs):
    if i > 10 and rng.random() < 0.1:
      texts.append("  " + texts[rng.randrange(i)].replace(" ", "  "))
    elif i > 10 and rng.random() < 0.11:
      words = texts[rng.randrange(i)].split()
      for _ in range(2):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
      texts.append(" ".join(words))
    else:
      texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))) + ".")
  os.makedirs(os.path.join(root, "in"))
  per = -(-docs // files)
  for f in range(files):
    with open(os.path.join(root, "in", f"part{f:03d}.jsonl"), "w") as out:
      for t in texts[f * per:(f + 1) * per]:
        out.write(json.dumps({"text": t}) + "\n")


def _size(value) -> int:
  if isinstance(value, (bytes, str)):
    return len(value)
  if isinstance(value, np.ndarray):
    return value.nbytes
  if isinstance(value, dict):
    return sum(_size(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return sum(_size(v) for v in value)
  return 8


RECEIVED = [0]


def _counting(method):
  def wrapper(*a, **kw):
    out = method(*a, **kw)
    if hasattr(out, "__next__") or (hasattr(out, "__iter__") and not isinstance(
        out, (dict, list, tuple, str, bytes, np.ndarray))):
      def gen():
        for item in out:
          RECEIVED[0] += _size(item)
          yield item
      return gen()
    RECEIVED[0] += _size(out)
    return out
  return wrapper


def instrument() -> None:
  ds = ray.data.Dataset
  for name in ("iter_rows", "iter_batches", "count", "sum"):  # take_all/take go via iter_rows
    setattr(ds, name, _counting(getattr(ds, name)))


def same_output(a: str, b: str) -> bool:
  for folder, _, names in os.walk(a):
    for name in names:
      path = os.path.join(folder, name)
      other = os.path.join(b, os.path.relpath(path, a))
      if not os.path.exists(other) or open(path, "rb").read() != open(other, "rb").read():
        return False
  return True


def main() -> None:
  root = tempfile.mkdtemp(prefix="curate_ray_")
  corpus(root, args.docs, args.files)
  cfg = settings.parse({"sources": [{"name": "web", "path": os.path.join(root, "in")}],
                        "rules": {"gopher_quality": {}},
                        "decontamination": {"enabled": False},
                        "output": {"shard_docs": 2000}}, "bench.toml")
  quiet = lambda m: None  # noqa: E731
  t0 = time.perf_counter()
  local = pipeline.curate(cfg, os.path.join(root, "local"), workers=args.workers, log=quiet,
                          progress=False)
  t_local = time.perf_counter() - t0
  with ray_engine.session(args.workers):
    instrument()
    t0 = time.perf_counter()
    pipeline.curate(cfg, os.path.join(root, "ray"), engine="ray", workers=args.workers,
                    log=quiet, progress=False)
    t_ray = time.perf_counter() - t0
  kept = local["sources"]["web"]["out"]["docs"]
  record = {
      "mai_jax": os.path.dirname(mai_jax.__file__), "docs": args.docs, "files": args.files,
      "kept": kept, "workers": args.workers,
      "removed_exact": local["stages"]["exact_dedup"]["removed"]["docs"],
      "removed_near": local["stages"]["near_dedup"]["removed"]["docs"],
      "driver_bytes": RECEIVED[0], "driver_bytes_per_doc": round(RECEIVED[0] / args.docs, 2),
      "local_s": round(t_local, 1), "ray_s": round(t_ray, 1),
      "same_output": same_output(os.path.join(root, "local"), os.path.join(root, "ray"))}
  print(json.dumps(record, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
