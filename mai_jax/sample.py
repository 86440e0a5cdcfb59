"""KV-cache decoding: prefill the prompts once, then one jitted decode step per new token.

Several prompts run as one batch, left-padded to the longest: padding has segment id 0, so real
tokens never attend to it, and positions count from each row's first real token, so a prompt's
continuation does not depend on what it was batched with. Every row then writes the same cache slot
each step (see model.layers.KVCache). The cache is created inside jit and constrained to the
activation shardings of the config's rules ('batch', 'seq', 'kv_heads', 'head_dim').

Choosing a token: temperature 0 is greedy (argmax); otherwise logits / temperature, optionally cut
to the top_k tokens and to the smallest set whose probability reaches top_p (nucleus), then a
categorical draw with key fold_in(key(seed), step), so a seed fixes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mai_jax import sharding as sharding_lib
from mai_jax.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: no cut
  top_p: float = 1.0  # 1: no cut
  seed: int = 0


def check(s: SamplingConfig) -> None:
  if s.max_new_tokens < 1:
    raise ConfigError(f"--max-new-tokens={s.max_new_tokens} must be >= 1")
  if s.temperature < 0:
    raise ConfigError(f"--temperature={s.temperature} must be >= 0 (0 is greedy)")
  if s.top_k < 0:
    raise ConfigError(f"--top-k={s.top_k} must be >= 0 (0 keeps every token)")
  if not 0 < s.top_p <= 1:
    raise ConfigError(f"--top-p={s.top_p} must be in (0, 1] (1 keeps every token)")


def choose_tokens(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Next token per row: greedy, or a draw after temperature / top-k / top-p (static settings)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly better tokens
    keep_BV = before_BV < top_p  # the best token is always kept
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
  """[B, P] tokens, segment ids (1 real / 0 pad) and per-row positions for left-padded prompts."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("every prompt needs at least one token (e.g. bos)")
  P = max(len(p) for p in prompts)
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  segment_ids_BP = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    tokens_BP[b, P - len(p):] = p
    segment_ids_BP[b, P - len(p):] = 1
  positions_BP = np.maximum(np.cumsum(segment_ids_BP, axis=1) - 1, 0).astype(np.int32)
  return tokens_BP, segment_ids_BP, positions_BP


def _with_cache(model: nnx.Module, batch: int, max_len: int) -> nnx.Module:
  model.init_cache(batch, max_len)
  return model


# Module-level jitted functions with the graph definitions as static arguments, so repeated
# `generate` calls with the same shapes reuse their compilations.
@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def empty_cache(graphdef, params, batch: int, max_len: int):
  """A zeroed [batch, max_len] KV cache state (sharded like activations under a mesh)."""
  model = _with_cache(nnx.merge(graphdef, params), batch, max_len)
  return nnx.split(model, nnx.Param, nnx.Cache)[2]


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(cached_graphdef, params, cache, tokens_BT, segment_ids_BT, positions_BT):
  """Logits of each row's last new token, and the cache with the new tokens appended."""
  model = nnx.merge(cached_graphdef, params, cache)
  logits_BTV = model.decode(tokens_BT, segment_ids_BT, positions_BT)
  return logits_BTV[:, -1, :], nnx.state(model, nnx.Cache)


_choose = jax.jit(choose_tokens, static_argnames=("temperature", "top_k", "top_p"))


def cached_graphdef(graphdef, params, batch: int, max_len: int):
  """The graph definition of the model with a [batch, max_len] KV cache (nothing allocated)."""
  cached = nnx.eval_shape(lambda: _with_cache(nnx.merge(graphdef, params), batch, max_len))
  return nnx.split(cached, nnx.Param, nnx.Cache)[0]


def decode_loop(cached_gdef, params, cache, logits_BV: jax.Array, next_pos_B1: np.ndarray,
                sampling: SamplingConfig, *, eos_id: Optional[int],
                stop: Optional[Callable[[list[int]], bool]] = None):
  """The token loop after a prefill: chooses a token per row from `logits_BV`, feeds it back at
  positions next_pos_B1, next_pos_B1 + 1, ... -> (new tokens per row, cache). A row ends at eos
  (kept), when `stop(its new tokens)` is true, or after max_new_tokens; the loop stops when every
  row has. The returned cache holds every new token but the last one chosen (never fed), i.e.
  for one row: the prefilled ids + new[:-1]. Step i draws with fold_in(key(seed), i)."""
  B = logits_BV.shape[0]
  filters = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
  key = jax.random.key(sampling.seed)
  outputs: list[list[int]] = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  ones_B1 = np.ones((B, 1), np.int32)
  for i in range(sampling.max_new_tokens):
    next_B = np.asarray(_choose(logits_BV, jax.random.fold_in(key, i), **filters))
    for b in np.flatnonzero(~done):
      outputs[b].append(int(next_B[b]))
      done[b] = (eos_id is not None and next_B[b] == eos_id) or (
          stop is not None and stop(outputs[b]))
    if done.all() or i + 1 == sampling.max_new_tokens:
      break
    logits_BV, cache = _decode(cached_gdef, params, cache, next_B[:, None], ones_B1,
                               next_pos_B1 + i)
  return outputs, cache


def decoding_context(mesh: Optional[jax.sharding.Mesh], rules):
  """The sharding context every decoding call runs in (the mesh's rules, or none)."""
  return sharding_lib.activate(mesh, rules) if mesh is not None else sharding_lib.use_rules(())


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             eos_id: Optional[int], pad_id: int = 0, mesh: Optional[jax.sharding.Mesh] = None,
             rules=None, stop: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
  """New tokens for each prompt (token ids, bos included if wanted), ending at eos (kept), when
  `stop(row's new tokens so far)` is true (e.g. a multi-token end of turn, see `turn_end_stop`),
  or after max_new_tokens. `model` is a Decoder without a cache; it is not modified."""
  check(sampling)
  tokens_BP, segment_ids_BP, positions_BP = left_pad(prompts, pad_id)
  B, P = tokens_BP.shape
  max_len = P + sampling.max_new_tokens
  graphdef, params = nnx.split(model, nnx.Param)
  cached_gdef = cached_graphdef(graphdef, params, B, max_len)
  with decoding_context(mesh, rules):
    cache = empty_cache(graphdef, params, B, max_len)
    logits_BV, cache = _decode(cached_gdef, params, cache, tokens_BP, segment_ids_BP,
                               positions_BP)
    outputs, _ = decode_loop(cached_gdef, params, cache, logits_BV, positions_BP[:, -1:] + 1,
                             sampling, eos_id=eos_id, stop=stop)
  return outputs


def sample_text(cfg: Config, model: nnx.Module, tokenizer, prompts: Sequence[str],
                sampling: SamplingConfig, mesh: Optional[jax.sharding.Mesh] = None,
                trained_context: Optional[int] = None) -> list[str]:
  """Continuations of text prompts ([bos] + prompt tokens), decoded without the final eos.
  With `trained_context` (the sequence length the weights were trained at), a generation that
  ran past it gets one warning line on stderr."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
  ids = [bos + tokenizer.encode(p) for p in prompts]
  outs = generate(model, ids, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                  mesh=mesh, rules=cfg.mesh.rules)
  warning = context_warning([len(i) + len(o) for i, o in zip(ids, outs)], trained_context)
  if warning:
    print(warning, file=sys.stderr, flush=True)
  return [text_without_eos(tokenizer, o) for o in outs]


def text_without_eos(tokenizer, new_ids: Sequence[int]) -> str:
  """The decoded new tokens, a final eos left out."""
  eos = bool(new_ids) and new_ids[-1] == tokenizer.eos_id
  return tokenizer.decode(list(new_ids[:-1]) if eos else list(new_ids))


def reply_text(tokenizer, new_ids: Sequence[int], end: str) -> str:
  """A reply's text: the new tokens without eos, cut at the end of turn `end` ('' : none)."""
  text = text_without_eos(tokenizer, new_ids)
  return text.split(end)[0] if end else text


def context_warning(lengths: Sequence[int], trained_context: Optional[int]) -> Optional[str]:
  """The warning for sequences (prompt + generated tokens) longer than the model was trained on:
  positions past that length were never seen in training, so the text degrades there."""
  longest = max(lengths, default=0)
  if trained_context is None or longest <= trained_context:
    return None
  over = sum(n > trained_context for n in lengths)
  return (f"mai-jax: warning: {over} of {len(lengths)} generation(s) ran to {longest} tokens, past "
          f"the {trained_context} the model was trained at (data.seq_len); text beyond that "
          f"is unreliable: lower --max-new-tokens or shorten the prompt")


def chat_replies(cfg: Config, model: nnx.Module, tokenizer, conversations: Sequence[Sequence[dict]],
                 sampling: SamplingConfig, mesh: Optional[jax.sharding.Mesh] = None) -> list[str]:
  """The assistant's next reply to each conversation ({'role', 'content'} messages), rendered
  with data.chat_template and tokenized as in SFT (data/chat.py). The reply ends at the
  template's end of turn (ChatML's <|im_end|>, else its eos_token; one token or several, see
  `turn_end_stop`) or the tokenizer's eos, whichever comes first; the end is cut from the text."""
  from mai_jax.data import chat, chat_template  # pylint: disable=import-outside-toplevel
  template = chat_template.load_template(cfg.data.chat_template)
  ids = [chat.prompt_tokens(c, template, tokenizer) for c in conversations]
  end = chat_template.end_of_turn(template)
  outs = generate(model, ids, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                  mesh=mesh, rules=cfg.mesh.rules,
                  stop=turn_end_stop(tokenizer, end) if end else None)
  return [reply_text(tokenizer, o, end) for o in outs]


def turn_end_stop(tokenizer, end: str) -> Callable[[list[int]], bool]:
  """stop(new tokens) -> whether their tail holds the text `end`. Text, not ids: the end of turn
  may be one added token or several pieces (a tokenizer without it as a special token, whose
  pieces may even merge with the reply's last characters). Only the tail is decoded: `end`
  spans at most one token per UTF-8 byte, plus one token it may share with the reply."""
  tail = len(end.encode("utf-8")) + 1
  return lambda ids: end in tokenizer.decode(ids[-tail:])
