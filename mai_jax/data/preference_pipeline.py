"""Preference pairs -> batches for DPO / SimPO / ORPO.

A batch holds train.global_batch_size pairs. The chosen completion uses the usual keys
(`inputs`, `targets`, `segment_ids`, `positions`, `loss_weights`, each [P, seq_len]), the rejected
one the same keys prefixed `rejected_`; the loss stacks both into one forward. A pair is one row
each, never packed with others (its log-probability is a sum over its own row), truncated to
seq_len + 1 tokens, padded with segment id 0. DPO batches also carry the reference model's summed
log-probs `ref_chosen_logps`, `ref_rejected_logps` float32 [P], looked up by record in the table
train/reference.py precomputes once with the starting weights and stores beside the data
(`reference_file`), so no second model is in memory during training; with
train.dpo_reference='online' they carry none (the step computes them).

The train split is shuffled per epoch and repeated (grain, so the stream resumes exactly); the
held-out split is scored in file order, each pair once.
"""

from __future__ import annotations

import hashlib
import json
import os

import grain
import numpy as np

from mai_jax.config import Config, ConfigError
from mai_jax.data import chat, pipeline, readers, sources
from mai_jax.data.chat_template import ChatError, load_template
from mai_jax.data.sources import SourceSpec
from mai_jax.data.tokenizer import Tokenizer

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
REJECTED = "rejected_"
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def precomputed_reference(cfg: Config) -> bool:
  """DPO batches carry the reference log-probs read from the stored table (train.dpo_reference
  'precomputed'); with 'online' the step computes them (train/reference.py)."""
  return cfg.train.objective == "dpo" and cfg.train.dpo_reference == "precomputed"


def split_pairs(cfg: Config, spec: SourceSpec, split: str) -> list[chat.PreferencePair]:
  """The pairs of `split` of one source (split by a hash of 'file:line'), in file order."""
  return sources.split_records(cfg.data, spec, split, chat.read_pairs, "preference pairs")


def encoded_pairs(cfg: Config, tokenizer: Tokenizer, spec: SourceSpec, split: str
                  ) -> list[tuple[str, chat.Encoded, chat.Encoded]]:
  """(record, chosen, rejected) of every pair of the split, checked against data.seq_len."""
  template = load_template(cfg.data.chat_template)
  out = []
  for pair in split_pairs(cfg, spec, split):
    chosen, rejected = chat.encode_preference(pair, template, tokenizer)
    for e in (chosen, rejected):
      if not e.weights[1:cfg.data.seq_len + 1].any():
        raise ChatError(f"{pair.record}: a completion starts after data.seq_len="
                        f"{cfg.data.seq_len} tokens; raise data.seq_len")
    out.append((pair.record, chosen, rejected))
  return out


def row(tokens: np.ndarray, weights: np.ndarray, seq_len: int, pad_id: int) -> dict:
  """One sequence as a fixed row: shifted, truncated to seq_len targets, padded (segment 0)."""
  n = min(len(tokens) - 1, seq_len)
  out = {"inputs": np.full(seq_len, pad_id, np.int32), "targets": np.full(seq_len, pad_id, np.int32),
         "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
         "loss_weights": np.zeros(seq_len, np.float32)}
  out["inputs"][:n], out["targets"][:n] = tokens[:n], tokens[1:n + 1]
  out["segment_ids"][:n], out["positions"][:n] = 1, np.arange(n)
  out["loss_weights"][:n] = weights[1:n + 1]
  return out


def pair_example(chosen: chat.Encoded, rejected: chat.Encoded, seq_len: int, pad_id: int,
                 reference=None) -> dict:
  """The features of one pair (see the module docstring)."""
  example = row(chosen.tokens, chosen.weights, seq_len, pad_id)
  example.update({REJECTED + k: v for k, v in row(rejected.tokens, rejected.weights, seq_len,
                                                   pad_id).items()})
  if reference is not None:
    example.update({k: np.float32(v) for k, v in zip(REFERENCE_KEYS, reference)})
  return example


# ------------------------------------------------------------------------------ reference table

def reference_file(cfg: Config, tokenizer: Tokenizer, spec: SourceSpec) -> str:
  """Where a source's reference log-probs live: a folder beside its data, one file per
  (starting weights, tokenizer, template, seq_len), so a change of any of them recomputes."""
  key = hashlib.sha256(json.dumps([cfg.train.init_from, tokenizer.content_hash,
                                   cfg.data.chat_template, cfg.data.seq_len]).encode()).hexdigest()
  base, _ = readers.source_files(spec.path)
  return os.path.join(base, ".mai_jax_reference", f"{spec.name}-{key[:16]}.json")


def load_reference(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no reference log-probs; `mai-jax train` with "
                      f"train.objective=dpo computes them before its first step")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _examples(cfg, tokenizer, spec, split, source_index=0, num_sources=1):
  """The pairs of a split as features, with `source_tokens` (their real tokens, credited to the
  source) for the loop's data/tokens metrics."""
  reference = None
  if precomputed_reference(cfg):
    reference = load_reference(reference_file(cfg, tokenizer, spec))["logps"]
  out = []
  for record, chosen, rejected in encoded_pairs(cfg, tokenizer, spec, split):
    if reference is not None and record not in reference:
      raise ConfigError(f"{record}: missing from the reference log-probs; delete "
                        f"{reference_file(cfg, tokenizer, spec)} to recompute them")
    example = pair_example(chosen, rejected, cfg.data.seq_len, tokenizer.pad_id,
                           None if reference is None else reference[record])
    example["source_tokens"] = np.zeros(num_sources, np.int32)
    example["source_tokens"][source_index] = (np.count_nonzero(example["segment_ids"])
                                              + np.count_nonzero(example[REJECTED + "segment_ids"]))
    out.append(example)
  return out


# ------------------------------------------------------------------------------------- batches

def make_train_iterator(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                        start: int, stop: int) -> grain.DatasetIterator:
  """This host's pairs [start, stop) of every global batch."""
  seed = pipeline.shuffle_seed(cfg)
  streams = [grain.MapDataset.source(_examples(cfg, tokenizer, spec, "train", k, len(specs)))
             .shuffle(seed=seed if k == 0 else pipeline.source_seed(seed, k)).repeat(None)
             for k, spec in enumerate(specs)]
  ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams,
                                                                  [s.weight for s in specs])
  ds = ds.to_iter_dataset(pipeline.READ_OPTIONS).batch(cfg.train.global_batch_size,
                                                       drop_remainder=True)
  return iter(ds.map(pipeline.HostRows(start, stop)))


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                      start: int, stop: int, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out pairs in order, each once; the last batch is filled with all-padding pairs."""
  examples = [e for spec in specs for e in _examples(cfg, tokenizer, spec, "validation")]
  size = cfg.train.global_batch_size
  batches = []
  for b in range(min(num_batches, -(-len(examples) // size))):
    chunk = examples[b * size:(b + 1) * size]
    filler = {k: np.zeros_like(v) for k, v in chunk[0].items()}
    chunk = chunk + [filler] * (size - len(chunk))
    batch = {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}
    batches.append(pipeline.HostRows(start, stop).map(batch))
  return batches
