"""Conversation files for supervised fine-tuning: reading them, and turning one into tokens and
per-token loss weights.

A data.sources entry of kind 'chat' names JSONL files, one conversation per line, in any of:
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...",
                 "loss": false}, ...]}          optional per-message `loss` overrides the role
  {"prompt": "...", "completion": "..."}      a user turn and the assistant's reply (each may also
                                               be a list of messages, TRL's conversational form)
  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}   ShareGPT
Preference pairs (DPO and friends) are {"prompt", "chosen", "rejected"}, each a string (a user
turn / an assistant reply) or a message list; when chosen and rejected are whole conversations
that start alike, the shared messages are split off into the prompt.
Unlike pretraining text, where a crawl always holds bad documents that are counted and skipped, a
fine-tuning set is curated: a malformed record, or one with nothing to learn (an empty loss mask,
e.g. no assistant turn), is an error naming file:line, never a silent zero loss.

Tokens (`encode`): the template's text is cut where the mask changes and each run is tokenized
on its own, so a token never straddles a trained and an untrained character and the mask is exact
per token. A prompt for sampling is cut the same way (`prompt_tokens`), so training and
inference agree on its ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from mai_jax.data.chat_template import ChatError, ChatTemplate, render_with_mask
from mai_jax.data.tokenizer import Tokenizer

T = TypeVar("T")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool"}
_FORMATS = ("{'messages': [{'role', 'content', 'loss'?}]}, {'prompt', 'completion'} or "
            "ShareGPT {'conversations': [{'from', 'value'}]}")


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One record: `record` is 'path:line' (errors, and the train/validation split key)."""
  record: str
  messages: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A conversation's tokens int32 [N] and loss weights float32 [N] (1: trained, 0: context)."""
  record: str
  tokens: np.ndarray
  weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A prompt and two completions of it (message tuples); `record` is 'path:line'."""
  record: str
  prompt: tuple[dict, ...]
  chosen: tuple[dict, ...]
  rejected: tuple[dict, ...]


# -------------------------------------------------------------------------------------- reading

def parse_record(raw, record: str) -> Conversation:
  """One JSON value in any of the supported formats -> a Conversation (or ChatError)."""
  if not isinstance(raw, dict):
    raise ChatError(f"{record}: expected a JSON object, one of {_FORMATS}")
  if "messages" in raw:
    messages = [_message(m, record, i) for i, m in enumerate(_list(raw["messages"], record))]
  elif "conversations" in raw:
    messages = []
    for i, turn in enumerate(_list(raw["conversations"], record)):
      if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
        raise ChatError(f"{record}: conversations[{i}] needs 'from' in "
                        f"{sorted(SHAREGPT_ROLES)} and a string 'value'")
      messages.append(_message({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value"),
                                **({"loss": turn["loss"]} if "loss" in turn else {})}, record, i))
  elif "prompt" in raw and "completion" in raw:
    messages = (_turns(raw["prompt"], "user", record, "prompt")
                + _turns(raw["completion"], "assistant", record, "completion"))
  else:
    raise ChatError(f"{record}: keys {sorted(raw)} are none of the formats {_FORMATS}")
  if not messages:
    raise ChatError(f"{record}: the conversation has no messages")
  return Conversation(record, tuple(messages))


def _list(value, record):
  if not isinstance(value, list):
    raise ChatError(f"{record}: expected a list of messages, got {type(value).__name__}")
  return value


def _message(m, record: str, i: int) -> dict:
  if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
      m.get("content"), str):
    raise ChatError(f"{record}: message {i} needs a string 'role' and a string 'content'")
  loss = m.get("loss")
  if loss is not None and not isinstance(loss, bool):
    raise ChatError(f"{record}: message {i} has 'loss'={loss!r}; it must be true or false")
  return dict(m)


def _turns(value, role: str, record: str, key: str) -> list[dict]:
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list):
    return [_message(m, record, i) for i, m in enumerate(value)]
  raise ChatError(f"{record}: '{key}' must be a string or a list of messages")


def parse_preference(raw, record: str) -> PreferencePair:
  """{"prompt"?, "chosen", "rejected"} -> a PreferencePair with the shared prefix in the prompt."""
  if not isinstance(raw, dict) or "chosen" not in raw or "rejected" not in raw:
    raise ChatError(f"{record}: a preference record is {{'prompt', 'chosen', 'rejected'}} "
                    f"(strings or message lists; 'prompt' may be left out when both start alike)")
  prompt = _turns(raw["prompt"], "user", record, "prompt") if "prompt" in raw else []
  chosen = _turns(raw["chosen"], "assistant", record, "chosen")
  rejected = _turns(raw["rejected"], "assistant", record, "rejected")
  shared = 0
  while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
    shared += 1
  prompt, chosen, rejected = prompt + chosen[:shared], chosen[shared:], rejected[shared:]
  if chosen == rejected:
    raise ChatError(f"{record}: 'chosen' and 'rejected' are the same; nothing to prefer")
  if not prompt:
    raise ChatError(f"{record}: the pair has no prompt: give a 'prompt', or chosen and rejected "
                    f"conversations that start with the same messages")
  return PreferencePair(record, tuple(prompt), tuple(chosen), tuple(rejected))


def read_conversations(base: str, rel: str) -> Iterator[Conversation]:
  """The conversations of one JSONL file; records are named 'rel:line' (rel: path under base)."""
  return read_records(base, rel, parse_record)


def read_pairs(base: str, rel: str) -> Iterator[PreferencePair]:
  """The preference pairs of one JSONL file, named 'rel:line'."""
  return read_records(base, rel, parse_preference)


def read_records(base: str, rel: str, parse: Callable[[object, str], T]) -> Iterator[T]:
  """parse(json value, 'rel:line') for every non-blank line of base/rel."""
  path = os.path.join(base, rel)
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise ChatError(f"{path}: cannot be read ({e.strerror})") from None
  with f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise ChatError(f"{path}:{number}: not JSON ({e.msg}); one record per line") from None
      yield parse(raw, f"{rel}:{number}")


# ------------------------------------------------------------------------------------- encoding

def encode(conversation: Conversation, template: ChatTemplate, tokenizer: Tokenizer) -> Encoded:
  """Tokens and loss weights of a conversation; an empty mask is a ChatError naming the record."""
  text, mask = render_with_mask(template, conversation.messages, conversation.record)
  if not mask.any():
    raise ChatError(
        f"{conversation.record}: nothing to learn: no token of this conversation is trained (no "
        f"assistant message, every one has \"loss\": false, or template {template.name} renders "
        f"none); give it an assistant reply or drop the record")
  tokens, weights = encode_runs(text, mask, tokenizer, template.prepend_bos)
  if not weights.any():
    raise ChatError(f"{conversation.record}: the trained characters encode to no tokens")
  return Encoded(conversation.record, tokens, weights)


def encode_preference(pair: PreferencePair, template: ChatTemplate, tokenizer: Tokenizer
                      ) -> tuple[Encoded, Encoded]:
  """(chosen, rejected) tokens, each weighted on its completion's assistant tokens only (the
  prompt's own assistant turns, if any, are context)."""
  prompt = tuple({**m, "loss": False} for m in pair.prompt)
  return tuple(encode(Conversation(pair.record, prompt + completion), template, tokenizer)
               for completion in (pair.chosen, pair.rejected))


def encode_runs(text: str, mask: np.ndarray, tokenizer: Tokenizer, prepend_bos: bool
                ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes each maximal run of equal mask on its own; weights are the runs' mask."""
  ids: list[int] = [tokenizer.bos_id] if prepend_bos and tokenizer.bos_id >= 0 else []
  weights: list[float] = [0.0] * len(ids)
  edges = [0, *(np.flatnonzero(mask[1:] != mask[:-1]) + 1).tolist(), len(text)]
  for start, end in zip(edges[:-1], edges[1:]):
    if end > start:
      piece = tokenizer.encode(text[start:end])
      ids += piece
      weights += [float(mask[start])] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def prompt_tokens(messages: Sequence[dict], template: ChatTemplate, tokenizer: Tokenizer,
                  record: str = "prompt") -> list[int]:
  """Token ids of a prompt for sampling: the conversation so far (cut where its training mask
  changes, exactly as in training) plus the generation prompt."""
  text = template.render(messages, add_generation_prompt=True)
  history, mask = render_with_mask(template, messages, record)
  if not text.startswith(history):
    raise ChatError(f"{record}: chat template {template.name} renders the generation prompt "
                    f"somewhere else than after the conversation")
  mask = np.concatenate([mask, np.zeros(len(text) - len(history), bool)])
  return encode_runs(text, mask, tokenizer, template.prepend_bos)[0].tolist()
