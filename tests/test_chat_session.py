"""`mai-jax chat`'s session: the KV cache kept across turns (rolled back to the prefix the next
turn's ids share with it) gives the replies a re-prefill of the whole conversation gives, while
prefilling fewer tokens; bucketed prefills; the fall back when the conversation outgrows it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mai_jax import chat_session, sample
from mai_jax.config import Config, ModelConfig
from mai_jax.model import Decoder

SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]  # ids 0..3: pad, bos, ChatML markers
CHARS = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?!.,'-"  # ids 4..63
VOCAB = len(SPECIALS) + len(CHARS)
USER_LINES = ["hi there", "why?", "bye"]
GREEDY = sample.SamplingConfig(max_new_tokens=8, temperature=0)
CAPACITY = 128  # holds the three turns of USER_LINES (one set of compilations for the file)


class CharTokenizer:
  """One id per character or special marker. With `aliases`, the upper-case ids decode to lower
  case, and text is never encoded to them: a reply holding one comes back as other ids."""
  pad_id, bos_id, eos_id = 0, 1, None

  def __init__(self, aliases: bool = False):
    self.pieces = SPECIALS + list(CHARS.lower() if aliases else CHARS)

  def encode(self, text):
    ids = []
    while text:
      special = next((i for i, s in enumerate(SPECIALS) if text.startswith(s)), None)
      ids.append(special if special is not None else len(SPECIALS) + CHARS.index(text[0]))
      text = text[len(SPECIALS[special]) if special is not None else 1:]
    return ids

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


def tiny_model(scan_layers: bool):
  """A random decoder. Its weights are drawn with NumPy into the abstract model: an eager nnx
  init dispatches (and compiles) op by op, about 20 s of this file's time on a busy 2-core box."""
  cfg = ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                    vocab_size=VOCAB, compute_dtype="float32", remat="none", num_layers=2,
                    scan_layers=scan_layers)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape, np.float32)),
                       abstract)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return tiny_model(scan_layers=True)


def _chat(model, tokenizer, lines, **options):
  session = chat_session.ChatSession(Config(), model, tokenizer, GREEDY, **options)
  return [session.reply(line) for line in lines], session.turns


@pytest.fixture(scope="module")
def re_prefilled(model):
  """The old path's replies to USER_LINES: every turn re-renders and re-prefills everything."""
  replies, turns = _chat(model, CharTokenizer(), USER_LINES, reuse_cache=False)
  assert turns == [] and all(replies), replies  # replies to compare, not empty strings
  return replies


def test_rewind_hides_the_slots_past_it():
  """Prefill 4 tokens, roll back to 2, decode 2 others: the logits of the full forward on the
  kept 2 and the new 2 (the stale slots are neither seen nor left behind). With one cache per
  layer (scan_layers=False; the stacked cache of the scanned layers is what the chats below
  run on)."""
  model = tiny_model(scan_layers=False)
  graphdef, params = nnx.split(model)
  ones_14 = jnp.ones((1, 4), jnp.int32)

  @jax.jit
  def run(params):
    full_1TV = nnx.merge(graphdef, params)(jnp.array([[5, 6, 9, 10]]))
    cached = nnx.merge(graphdef, params)
    cached.init_cache(1, 8)
    cached.decode(jnp.array([[5, 6, 7, 8]]), ones_14, jnp.arange(4)[None])
    cached.rewind_cache(2)
    return cached.decode(jnp.array([[9, 10]]), ones_14[:, :2], jnp.arange(2, 4)[None]), full_1TV

  rewound_1TV, full_1TV = run(params)
  np.testing.assert_allclose(np.asarray(rewound_1TV), np.asarray(full_1TV[:, 2:]), atol=1e-5)


def test_the_kept_cache_gives_the_replies_of_a_re_prefill_and_prefills_less(model, re_prefilled):
  compiled = chat_session._prefill._cache_size()
  replies, turns = _chat(model, CharTokenizer(), USER_LINES, max_context=CAPACITY)
  assert replies == re_prefilled
  assert turns[0].reused == 0 and turns[0].prefilled == turns[0].prompt_tokens
  for turn in turns[1:]:
    # The tokenizer gives back the sampled ids: the whole cache is kept, only the new turn runs.
    assert turn.reused == turn.held > 0
    assert turn.prefilled == turn.prompt_tokens - turn.reused < turn.prompt_tokens
  # Prefills of different lengths, one padded shape: one compilation for the three turns.
  assert len({t.prefilled for t in turns}) == 3 and {t.padded_to for t in turns} == {32}
  assert chat_session._prefill._cache_size() - compiled <= 1


def test_a_reply_re_tokenized_to_other_ids_rolls_the_cache_back(model):
  """The upper-case ids the model samples come back as lower-case ones: the next turn shares
  only part of the reply with the cache, which is rolled back to there."""
  tokenizer, lines = CharTokenizer(aliases=True), USER_LINES[:2]
  replies, turns = _chat(model, tokenizer, lines, max_context=CAPACITY)
  assert replies == _chat(model, tokenizer, lines, reuse_cache=False)[0]
  assert turns[0].prompt_tokens <= turns[1].reused < turns[1].held, turns  # the case in point


def test_a_conversation_that_outgrows_the_cache_re_prefills_and_says_so_once(model, re_prefilled,
                                                                              capsys):
  tokenizer = CharTokenizer()
  session = chat_session.ChatSession(Config(), model, tokenizer, GREEDY, max_context=CAPACITY)
  replies = [session.reply(line) for line in USER_LINES + ["ok"]]
  assert replies[:3] == re_prefilled
  turns = session.turns
  assert turns[2].prompt_tokens + GREEDY.max_new_tokens <= CAPACITY < (
      turns[3].prompt_tokens + GREEDY.max_new_tokens)
  assert [t.padded_to > 0 for t in turns] == [True, True, True, False]
  # The kept cache is let go; the turns after this one re-prefill too (the conversation grows).
  assert session.decoder.cache is None and session.decoder.outgrown
  assert replies[3] == sample.chat_replies(Config(), model, tokenizer, [session.messages[:7]],
                                           GREEDY)[0]  # the old path on the same conversation
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"does not fit the chat's {CAPACITY}-slot KV cache" in err
