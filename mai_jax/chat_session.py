"""A multi-turn chat (`mai-jax chat`) that keeps its KV cache across turns where it can.

Every turn renders the whole conversation and tokenizes it as training does
(data/chat.py `prompt_tokens`), so the reply just sampled comes back re-tokenized from its text,
and that need not give the ids the model emitted (a BPE merges pieces the model wrote apart).
Extending the cache with the new turn alone would then condition on other ids than a re-prefill.
So the session remembers exactly which ids its cache holds (the last prompt and the tokens fed
while sampling: every new token but the last, which was chosen and never fed), keeps the longest
prefix these share with the new prompt (rolling the cache back to it, KVCache.rewind) and
prefills only the rest. The reply conditions on exactly the prompt's ids, as a re-prefill would,
so replies equal `sample.chat_replies` on the whole conversation (the old path, kept as
`reuse_cache=False`).

Compilations: the suffix is right-padded to a power of two (at least MIN_BUCKET tokens; pads
have segment id 0 and come after every real token, so none of those sees them, and the cache is
rolled back past them), so a chat compiles one prefill per bucket length, not one per turn; the
decode step and the cache are compiled once for the session.

Capacity: one batch-1 cache of `max_context` slots (default data.seq_len), allocated at the first
turn. A turn whose prompt plus max_new_tokens does not fit is sampled by `sample.generate` with a
fresh prefill into a cache of its own size, and so are the turns after it (the conversation only
grows); the first such turn prints one line on stderr. An empty common prefix needs nothing
special: the rollback to slot 0 is a fresh prefill into the kept cache.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from mai_jax import sample
from mai_jax.config import Config
from mai_jax.data import chat, chat_template

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Turn:
  """What one turn computed. prompt_tokens: the rendered conversation's ids; held: the ids the
  kept cache held before the turn; reused: the prefix of both, kept; prefilled: the ones computed
  (prompt_tokens - reused), in a prefill of padded_to tokens (0: the turn did not fit and was
  re-prefilled by sample.generate)."""
  prompt_tokens: int
  held: int
  reused: int
  prefilled: int
  padded_to: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(mismatch[0]) if mismatch.size else n


def bucket(n: int, room: int) -> int:
  """The padded length of an n-token prefill: a power of two >= max(n, MIN_BUCKET), at most
  `room` (the free slots, >= n)."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), room)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill(cached_gdef, params, cache, start, tokens_1T, segment_ids_1T, positions_1T, length):
  """Rolls the cache back to `start` slots, appends the first `length` of the T tokens (the rest
  is padding, rolled back again) -> (logits of the last real token [1, V], cache)."""
  model = nnx.merge(cached_gdef, params, cache)
  model.rewind_cache(start)
  logits_1TV = model.decode(tokens_1T, segment_ids_1T, positions_1T)
  model.rewind_cache(start + length)
  logits_1V = jax.lax.dynamic_index_in_dim(logits_1TV, length - 1, axis=1, keepdims=False)
  return logits_1V, nnx.state(model, nnx.Cache)


class CachedDecoder:
  """Samples a reply to one prompt after another, reusing the KV cache's common prefix."""

  def __init__(self, model: nnx.Module, capacity: int, *, pad_id: int,
               mesh: Optional[jax.sharding.Mesh] = None, rules=()):
    self.model, self.capacity, self.pad_id, self.mesh, self.rules = (model, capacity, pad_id,
                                                                     mesh, rules)
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.cached_gdef = sample.cached_graphdef(self.graphdef, self.params, 1, capacity)
    self.cache = None
    self.ids: list[int] = []  # what the cache holds, slot by slot
    self.turns: list[Turn] = []
    self.outgrown = False  # a turn did not fit: the rest re-prefill (said once on stderr)

  def generate(self, prompt: Sequence[int], sampling: sample.SamplingConfig, *,
               eos_id: Optional[int], stop=None) -> list[int]:
    """sample.generate(model, [prompt], ...)[0], from the kept cache when the prompt fits it."""
    sample.check(sampling)
    # Until this turn has finished, the cache is no one's: a failure midway (a donated buffer
    # half used) leaves an empty session, not a wrong one.
    cache, held, self.cache, self.ids = self.cache, self.ids, None, []
    if self.outgrown or len(prompt) + sampling.max_new_tokens > self.capacity:
      if not self.outgrown:
        self.outgrown = True
        print(f"mai-jax: note: the conversation ({len(prompt)} tokens) plus --max-new-tokens "
              f"{sampling.max_new_tokens} does not fit the chat's {self.capacity}-slot KV cache "
              f"(--max-context, default data.seq_len); every turn from here on re-prefills the "
              f"whole conversation", file=sys.stderr, flush=True)
      self.turns.append(Turn(len(prompt), len(held), 0, len(prompt), 0))
      return sample.generate(self.model, [prompt], sampling, eos_id=eos_id, pad_id=self.pad_id,
                             mesh=self.mesh, rules=self.rules, stop=stop)[0]
    start = min(common_prefix(held, prompt), len(prompt) - 1)  # prefill at least one token
    n = len(prompt) - start
    T = bucket(n, self.capacity - start)
    tokens_1T = np.full((1, T), self.pad_id, np.int32)
    tokens_1T[0, :n] = prompt[start:]
    segment_ids_1T = (np.arange(T) < n).astype(np.int32)[None]
    positions_1T = (start + np.arange(T, dtype=np.int32))[None]  # batch 1: position = slot
    with sample.decoding_context(self.mesh, self.rules):
      if cache is None:
        cache = sample.empty_cache(self.graphdef, self.params, 1, self.capacity)
      logits_1V, cache = _prefill(self.cached_gdef, self.params, cache, start, tokens_1T,
                                  segment_ids_1T, positions_1T, n)
      (new,), cache = sample.decode_loop(self.cached_gdef, self.params, cache, logits_1V,
                                         np.array([[len(prompt)]], np.int32), sampling,
                                         eos_id=eos_id, stop=stop)
    self.cache, self.ids = cache, list(prompt) + new[:-1]
    self.turns.append(Turn(len(prompt), len(held), start, n, T))
    return new


class ChatSession:
  """One conversation: `reply(user_text)` adds the user's turn and the assistant's reply to it.
  reuse_cache=False re-renders and re-prefills everything each turn (sample.chat_replies)."""

  def __init__(self, cfg: Config, model: nnx.Module, tokenizer, sampling: sample.SamplingConfig,
               mesh: Optional[jax.sharding.Mesh] = None, system: str = "", *,
               max_context: Optional[int] = None, reuse_cache: bool = True):
    self.cfg, self.model, self.tokenizer, self.sampling, self.mesh = (cfg, model, tokenizer,
                                                                      sampling, mesh)
    self.template = chat_template.load_template(cfg.data.chat_template)
    self.end = chat_template.end_of_turn(self.template)
    self.messages = [{"role": "system", "content": system}] if system else []
    self.decoder = (CachedDecoder(model, max_context or cfg.data.seq_len,
                                  pad_id=tokenizer.pad_id, mesh=mesh, rules=cfg.mesh.rules)
                    if reuse_cache else None)

  @property
  def turns(self) -> list[Turn]:
    return self.decoder.turns if self.decoder else []

  def reply(self, text: str) -> str:
    self.messages.append({"role": "user", "content": text})
    if self.decoder is None:
      reply = sample.chat_replies(self.cfg, self.model, self.tokenizer, [self.messages],
                                  self.sampling, self.mesh)[0]
    else:
      prompt = chat.prompt_tokens(self.messages, self.template, self.tokenizer)
      stop = sample.turn_end_stop(self.tokenizer, self.end) if self.end else None
      new = self.decoder.generate(prompt, self.sampling, eos_id=self.tokenizer.eos_id, stop=stop)
      reply = sample.reply_text(self.tokenizer, new, self.end)
    self.messages.append({"role": "assistant", "content": reply})
    return reply


def chat_session(cfg: Config, model: nnx.Module, tokenizer, lines: Iterable[str],
                 sampling: sample.SamplingConfig, mesh: Optional[jax.sharding.Mesh] = None,
                 system: str = "", *, max_context: Optional[int] = None,
                 reuse_cache: bool = True) -> Iterator[str]:
  """Yields the assistant's reply to each user line of `lines` (an iterable of strings; a blank
  line ends the session), the whole conversation as context (see ChatSession)."""
  session = ChatSession(cfg, model, tokenizer, sampling, mesh, system, max_context=max_context,
                        reuse_cache=reuse_cache)
  for line in lines:
    text = line.rstrip("\n")
    if not text.strip():
      return
    yield session.reply(text)
