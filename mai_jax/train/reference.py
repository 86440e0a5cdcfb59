"""DPO's reference model, run once: before the first step, the starting weights
(train.init_from) score every pair of every split, and the summed completion log-probs are stored
beside the data (data/preference_pipeline.reference_file), which the pipeline then puts in each
batch. Training holds one model; a rerun or a resumed run reuses the file."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from mai_jax import workdir as workdir_lib
from mai_jax.config import Config
from mai_jax.data import pipeline, sources
from mai_jax.data import preference_pipeline as pp
from mai_jax.train import init_from as init_from_lib
from mai_jax.train import step as step_lib
from mai_jax.train.preference import pair_logps


def ensure_reference(cfg: Config, tokenizer, mesh, log: Callable[[str], None]) -> None:
  """Writes each source's reference log-probs (train.init_from's weights, every split) unless
  a file for the same weights, tokenizer, template and seq_len is there already."""
  source = init_from_lib.resolve(cfg.train.init_from)
  todo = []
  for spec in sources.source_specs(cfg.data):
    path = pp.reference_file(cfg, tokenizer, spec)
    if os.path.isfile(path) and pp.load_reference(path).get("step") == source.step:
      log(f"mai-jax: reference log-probs: {path} (computed before)")
    else:
      todo.append((spec, path))
  if not todo:
    return
  model_spec, target = workdir_lib.abstract_params(cfg, mesh)
  params = init_from_lib.restore_params(source, target)
  sharding = step_lib.batch_sharding(mesh, cfg)
  score = jax.jit(lambda p, b: pair_logps(model_spec.merge(p), b)[0][:2])
  size = cfg.train.global_batch_size
  lo, hi = pipeline.host_rows(cfg, jax.process_index(), jax.process_count())
  for spec, path in todo:
    encoded = [e for split in sources.SPLITS for e in pp.encoded_pairs(cfg, tokenizer, spec, split)]
    logps = {}
    for start in range(0, len(encoded), size):
      chunk = encoded[start:start + size]
      examples = [pp.pair_example(c, r, cfg.data.seq_len, tokenizer.pad_id) for _, c, r in chunk]
      examples += [{k: np.zeros_like(v) for k, v in examples[0].items()}] * (size - len(chunk))
      host = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
      batch = step_lib.global_batch({k: v[lo:hi] for k, v in host.items()}, sharding, size)
      scored = score(params, batch)
      chosen, rejected = (multihost_utils.process_allgather(scored, tiled=True)
                          if jax.process_count() > 1 else jax.device_get(scored))
      for (record, _, _), c, r in zip(chunk, chosen, rejected):
        logps[record] = [float(c), float(r)]
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"init_from": source.workdir, "step": source.step, "logps": logps}, f)
      os.replace(path + ".tmp", path)
    log(f"mai-jax: reference log-probs of {len(logps)} pairs ({spec.name}) from "
        f"{source.describe()} written to {path}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mai_jax reference log-probs written")
