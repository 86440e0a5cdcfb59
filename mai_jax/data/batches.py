"""A run's batches by objective: pretraining text and token caches (pipeline.py,
cache_pipeline.py), SFT conversations (chat_pipeline.py) or preference pairs
(preference_pipeline.py), behind the two calls the loop and `mai-jax eval` make. SFT batches add
`loss_weights` to the pretraining keys; preference batches hold a chosen and a rejected row per
pair."""

from __future__ import annotations

from typing import Optional

import grain
import numpy as np

from mai_jax.config import PREFERENCE_OBJECTIVES, Config
from mai_jax.data import chat_pipeline, pipeline, preference_pipeline, sources
from mai_jax.data.tokenizer import Tokenizer


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1,
                        source_root: Optional[str] = None) -> grain.DatasetIterator:
  """This host's infinite training stream (see pipeline.make_train_iterator)."""
  module = _post_training(cfg)
  if module is not None:
    start, stop = pipeline.host_rows(cfg, process_index, process_count)
    return module.make_train_iterator(cfg, tokenizer, sources.source_specs(cfg.data), start, stop)
  return pipeline.make_train_iterator(cfg, tokenizer, process_index=process_index,
                                      process_count=process_count, source_root=source_root)


def eval_batch_count(cfg: Config) -> int:
  """How many validation batches a run scores: data.eval_tokens rounded up to whole batches of
  global_batch_size x seq_len, else (eval_tokens=0) train.eval_batches."""
  if cfg.data.eval_tokens:
    per_batch = cfg.train.global_batch_size * cfg.data.seq_len
    return -(-cfg.data.eval_tokens // per_batch)
  return cfg.train.eval_batches


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, *, num_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      source_root: Optional[str] = None) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` held-out batches (see pipeline.make_eval_batches)."""
  module = _post_training(cfg)
  if module is not None:
    if num_batches < 1:
      raise ValueError(f"num_batches={num_batches} must be >= 1 (train.eval_batches)")
    start, stop = pipeline.host_rows(cfg, process_index, process_count)
    return module.make_eval_batches(cfg, tokenizer, sources.source_specs(cfg.data), start, stop,
                                    num_batches)
  return pipeline.make_eval_batches(cfg, tokenizer, num_batches=num_batches,
                                    process_index=process_index, process_count=process_count,
                                    source_root=source_root)


def _post_training(cfg: Config):
  """The pipeline module of a post-training objective, None for pretraining."""
  if cfg.train.objective == "sft":
    return chat_pipeline
  return preference_pipeline if cfg.train.objective in PREFERENCE_OBJECTIVES else None
