"""The SFT input pipeline: conversations -> tokens + loss weights -> packed rows -> batches.

Stages, as in pipeline.py (grain all the way, so the iterator state restores the stream exactly):
  1. every conversation of each 'chat' source is read and encoded once, up front (data/chat.py):
     a malformed record or an empty loss mask stops the run before its first step, naming the
     record, instead of hours in;
  2. the train split (pure function of the record id 'file:line', as for documents) is globally
     shuffled per epoch and repeated forever;
  3. shift: inputs = tokens[:-1], targets = tokens[1:], loss_weights = weights[1:] (the weight of
     a target is that of the token it predicts); a conversation longer than data.seq_len + 1
     tokens keeps its first seq_len + 1 (an error if that leaves nothing trained);
  4. first-fit packing of whole conversations into rows of seq_len with segment ids and
     positions (never across a conversation), loss_weights packed along and 0 on padding;
  5. batch, mix sources by weight (shares of rows), keep this host's rows.
Each batch is {'inputs', 'targets', 'segment_ids', 'positions'} int32 and 'loss_weights' float32,
all [rows, seq_len]; the train step multiplies its per-token loss by loss_weights and divides by
their sum (the number of trained tokens).
"""

from __future__ import annotations

import grain
import numpy as np

from mai_jax.config import Config
from mai_jax.data import chat, pipeline, sources
from mai_jax.data.chat_template import ChatError, load_template
from mai_jax.data.sources import SourceSpec
from mai_jax.data.tokenizer import Tokenizer

WEIGHTS = "loss_weights"
# The packing of pretraining rows, with loss_weights packed along (same first-fit, same padding).
_pack, _pad_rows = pipeline._pack, pipeline._pad_rows  # pylint: disable=protected-access


class ShiftConversation(grain.transforms.Map):
  """Encoded -> {'inputs', 'targets', 'loss_weights'} [n <= seq_len]."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, example: dict) -> dict:
    tokens = example["tokens"][:self._seq_len + 1]
    weights = example["weights"][:self._seq_len + 1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], WEIGHTS: weights[1:]}


def split_conversations(cfg: Config, spec: SourceSpec, split: str) -> list[chat.Conversation]:
  """The conversations of `split` of one source, in file and line order."""
  return sources.split_records(cfg.data, spec, split, chat.read_conversations, "conversations")


def encoded_split(cfg: Config, tokenizer: Tokenizer, spec: SourceSpec, split: str) -> list[dict]:
  """{'tokens', 'weights'} of every conversation of the split (stage 1), checked against
  data.seq_len."""
  template = load_template(cfg.data.chat_template)
  limit = cfg.data.seq_len + 1
  out = []
  for conversation in split_conversations(cfg, spec, split):
    e = chat.encode(conversation, template, tokenizer)
    if not e.weights[1:limit].any():
      raise ChatError(f"{e.record}: its first trained token comes after data.seq_len="
                      f"{cfg.data.seq_len} tokens ({len(e.tokens)} in all); raise data.seq_len")
    out.append({"tokens": e.tokens, "weights": e.weights})
  return out


def _rows(cfg: Config, tokenizer: Tokenizer, examples: list[dict], k: int, num_sources: int,
          seed: int) -> grain.IterDataset:
  ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  ds = ds.map(ShiftConversation(cfg.data.seq_len)).to_iter_dataset(pipeline.READ_OPTIONS)
  return _pack(ds, cfg, tokenizer, seed=seed, shuffle_bins=True, source_index=k,
               num_sources=num_sources, extra=(WEIGHTS,))


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                        start: int, stop: int) -> grain.DatasetIterator:
  """This host's rows [start, stop) of every global batch of the SFT stream."""
  seed = pipeline.shuffle_seed(cfg)
  rows = [_rows(cfg, tokenizer, encoded_split(cfg, tokenizer, spec, "train"), k,
                len(specs), seed if k == 0 else pipeline.source_seed(seed, k))
          for k, spec in enumerate(specs)]
  ds = rows[0] if len(rows) == 1 else grain.IterDataset.mix(rows, [s.weight for s in specs])
  ds = ds.batch(cfg.train.global_batch_size, drop_remainder=True).map(pipeline.HostRows(start,
                                                                                        stop))
  return iter(ds)


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, specs: tuple[SourceSpec, ...],
                      start: int, stop: int, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out conversations of every source, in order, each scored once (trained tokens only);
  the last batch is filled with padding rows."""
  examples = [e for spec in specs
              for e in encoded_split(cfg, tokenizer, spec, "validation")]
  ds = grain.MapDataset.source(examples).map(ShiftConversation(cfg.data.seq_len))
  ds = _pack(ds.to_iter_dataset(pipeline.READ_OPTIONS), cfg, tokenizer, seed=0,
             shuffle_bins=False, extra=(WEIGHTS,))
  ds = ds.batch(cfg.train.global_batch_size, drop_remainder=False)
  batches = []
  for batch in ds:
    batch = {k: batch[k] for k in (*pipeline.FEATURES, WEIGHTS)}
    batches.append(pipeline.HostRows(start, stop).map(
        _pad_rows(batch, cfg.train.global_batch_size, tokenizer.pad_id)))
    if len(batches) == num_batches:
      break
  return batches
