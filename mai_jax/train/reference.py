"""DPO's reference model: the starting weights (train.init_from), frozen.

train.dpo_reference='precomputed' (default) runs it once: before the first step it scores every
pair of every split, and the summed completion log-probs are stored beside the data
(data/preference_pipeline.reference_file), which the pipeline then puts in each batch. Training
holds one model; a rerun or a resumed run reuses the file.

train.dpo_reference='online' holds it in the step instead, through the frozen-model hook of
online distillation (train/trainer.py binds its params as the jitted step's extra argument, the
step's `prepare_batch` adds the reference log-probs to the batch): no pass and no file, but a
second copy of the weights in memory. The copy has the run's own param and compute dtypes (the
same numbers as the precomputed pass, and exactly the policy's log-probs at step 0, so the
rewards start at 0; a bf16 copy of float32 weights would start them off by its rounding).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from mai_jax import workdir as workdir_lib
from mai_jax.config import Config
from mai_jax.data import pipeline, sources
from mai_jax.data import preference_pipeline as pp
from mai_jax.train import init_from as init_from_lib
from mai_jax.train import step as step_lib
from mai_jax.train.frozen import FrozenWeights
from mai_jax.train.preference import pair_logps


class Reference(FrozenWeights):
  """train.init_from's weights in the run's model, shapes and shardings; restored on first use
  (building a trainer reads nothing)."""

  def __init__(self, cfg: Config, mesh):
    self.init_from = cfg.train.init_from
    self.spec, self.abstract_params = workdir_lib.abstract_params(cfg, mesh)

  @functools.cached_property
  def source(self) -> init_from_lib.InitSource:
    return init_from_lib.resolve(self.init_from)

  def logps(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) summed completion log-probs [P] (no gradient flows into them)."""
    model = self.spec.merge(jax.lax.stop_gradient(params))
    return jax.lax.stop_gradient(pair_logps(model, batch)[0][:2])

  def prepare_batch(self, step, batch, params) -> dict:
    """The step's `prepare_batch` of an online reference: the batch with its reference
    log-probs, as the precomputed table would have put them there."""
    del step
    return {**batch, **dict(zip(pp.REFERENCE_KEYS, self.logps(params, batch)))}


def for_run(cfg: Config, mesh) -> Optional[Reference]:
  """The online reference of a DPO run (train.dpo_reference='online'), or None."""
  if cfg.train.objective != "dpo" or cfg.train.dpo_reference != "online":
    return None
  return Reference(cfg, mesh)


def ensure_reference(cfg: Config, tokenizer, mesh, log: Callable[[str], None]) -> None:
  """Writes each source's reference log-probs (train.init_from's weights, every split) unless
  a file for the same weights, tokenizer, template and seq_len is there already."""
  reference = Reference(cfg, mesh)
  source = reference.source
  todo = []
  for spec in sources.source_specs(cfg.data):
    path = pp.reference_file(cfg, tokenizer, spec)
    if os.path.isfile(path) and pp.load_reference(path).get("step") == source.step:
      log(f"mai-jax: reference log-probs: {path} (computed before)")
    else:
      todo.append((spec, path))
  if not todo:
    return
  params = reference.params
  sharding = step_lib.batch_sharding(mesh, cfg)
  score = jax.jit(reference.logps)
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
