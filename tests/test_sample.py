"""KV-cache sampling: greedy equals the no-cache argmax path, the sampling filters, EOS, seeds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mai_jax import sample
from mai_jax.config import ConfigError, MeshConfig, ModelConfig, DEFAULT_RULES
from mai_jax.model import Decoder
from mai_jax import sharding

VOCAB = 61


def tiny_model(scan_layers=True, seed=0, **kw):
  kw.setdefault("num_layers", 2)
  cfg = ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                    vocab_size=VOCAB, compute_dtype="float32", remat="none", init_std=0.3,
                    scan_layers=scan_layers, **kw)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


FORWARD = nnx.jit(lambda m, t: m(t))
BUFFER = 16  # every reference forward's length: one compilation per model


def greedy_without_cache(model, prompt, steps, eos_id=None):
  """Reference: rerun the full forward on the whole sequence for every new token (on a fixed-size
  buffer, one compilation per model: positions past the sequence cannot affect it, attention is
  causal)."""
  assert len(prompt) + steps <= BUFFER
  seq = list(prompt)
  out = []
  for _ in range(steps):
    buffer = np.zeros((1, BUFFER), np.int32)
    buffer[0, :len(seq)] = seq
    token = int(jnp.argmax(FORWARD(model, jnp.asarray(buffer))[0, len(seq) - 1]))
    out.append(token)
    seq.append(token)
    if token == eos_id:
      break
  return out


PROMPTS = [[5, 17, 3, 9, 44, 2, 8], [7], [12, 30, 30, 1]]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_batched_equals_no_cache_argmax_path(scan_layers):
  model = tiny_model(scan_layers)
  got = sample.generate(model, PROMPTS, sample.SamplingConfig(max_new_tokens=6, temperature=0),
                        eos_id=None)
  assert got == [greedy_without_cache(model, p, 6) for p in PROMPTS]


MIXTRAL = dict(num_experts=4, experts_per_token=2)  # every layer MoE
# dense stack, then groups of (dense, MoE): nested scans
GROUPS = dict(num_experts=4, experts_per_token=2, num_layers=5, first_dense_layers=1,
              moe_layer_interval=2)


# The scanned MoE stack in the fast suite; the unrolled loop (~25 s of compiles) and the nested
# scans (~40 s) in the slow one.
@pytest.mark.parametrize("moe,scan_layers", [
    pytest.param(MIXTRAL, True, id="mixtral-True"),
    pytest.param(MIXTRAL, False, id="mixtral-False", marks=pytest.mark.slow),
    pytest.param(GROUPS, True, id="dense_then_groups-True", marks=pytest.mark.slow),
    pytest.param(GROUPS, False, id="dense_then_groups-False", marks=pytest.mark.slow),
])
def test_greedy_moe_decoding_equals_no_cache_argmax_path(moe, scan_layers):
  """The KV caches of every stack (dense_blocks, MoE blocks, the dense blocks inside groups) are
  extended: a cache left behind anywhere would change the continuation."""
  model = tiny_model(scan_layers, **moe)
  got = sample.generate(model, PROMPTS, sample.SamplingConfig(max_new_tokens=5, temperature=0),
                        eos_id=None)
  assert got == [greedy_without_cache(model, p, 5) for p in PROMPTS]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_cached_logits_equal_full_forward_on_8_devices(sequence_parallel):
  """Prefill + decode logits equal the full forward for left-padded rows, on a sharded mesh;
  the cache is sharded like activations. With sequence parallelism the 4-token prefill's
  residual is split over tensor=2 and the one-token step's stays whole."""
  model = tiny_model(sequence_parallel=sequence_parallel)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  tokens_BP, seg_BP, pos_BP = sample.left_pad([[3, 4, 5, 6], [9, 8, 7, 6], [1, 2]], pad_id=0)
  tokens_BP, seg_BP, pos_BP = (np.concatenate([x, x[:1]]) for x in (tokens_BP, seg_BP, pos_BP))
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params):
    m = nnx.merge(graphdef, params)
    m.init_cache(4, 6)
    prefill = m.decode(tokens_BP, seg_BP, pos_BP)
    step = m.decode(jnp.full((4, 1), 11), jnp.ones((4, 1), jnp.int32), pos_BP[:, -1:] + 1)
    return prefill, step, m.blocks.attn.cache.k[...]

  with sharding.activate(mesh, DEFAULT_RULES):
    prefill, step, k_cache = run(params)
  assert k_cache.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")
  for b, n in enumerate([4, 4, 2, 4]):
    seq = np.concatenate([tokens_BP[b, -n:], [11]])[None]
    full = np.asarray(model(jnp.asarray(seq)))[0]
    np.testing.assert_allclose(np.asarray(prefill)[b, -n:], full[:n], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step)[b, 0], full[n], atol=1e-5)


def test_stops_at_eos_and_max_new_tokens():
  model = tiny_model()
  path = greedy_without_cache(model, PROMPTS[0], 5)
  eos = path[2]
  got = sample.generate(model, PROMPTS[:1], sample.SamplingConfig(5, temperature=0), eos_id=eos)
  assert got == [path[:path.index(eos) + 1]]
  got = sample.generate(model, PROMPTS, sample.SamplingConfig(3, temperature=0), eos_id=None)
  assert [len(g) for g in got] == [3, 3, 3]


def test_seeded_sampling_is_deterministic_and_top_k_1_is_greedy():
  model = tiny_model()
  cfg = sample.SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
  first = sample.generate(model, PROMPTS, cfg, eos_id=None)
  assert sample.generate(model, PROMPTS, cfg, eos_id=None) == first
  others = [sample.generate(model, PROMPTS, dataclasses.replace(cfg, seed=s), eos_id=None)
            for s in (4, 5)]
  assert any(o != first for o in others)
  greedy = sample.generate(model, PROMPTS, sample.SamplingConfig(8, temperature=0), eos_id=None)
  assert sample.generate(model, PROMPTS, dataclasses.replace(cfg, top_k=1), eos_id=None) == greedy
  assert sample.generate(model, PROMPTS, dataclasses.replace(cfg, top_p=1e-6),
                         eos_id=None) == greedy


def test_filters_draw_from_the_right_distribution():
  logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))[None]
  logits_NV = jnp.broadcast_to(jnp.asarray(logits), (20000, 4))  # 20000 independent draws

  def freqs(**kw):
    draws = sample.choose_tokens(logits_NV, jax.random.key(0), **kw)
    return np.bincount(np.asarray(draws), minlength=4) / len(logits_NV)

  np.testing.assert_allclose(freqs(temperature=1.0, top_k=0, top_p=1.0), [.4, .3, .2, .1],
                             atol=0.015)
  np.testing.assert_allclose(freqs(temperature=1.0, top_k=2, top_p=1.0), [4 / 7, 3 / 7, 0, 0],
                             atol=0.015)
  # nucleus 0.75: 0.4 + 0.3 < 0.75, so the third token is needed too
  np.testing.assert_allclose(freqs(temperature=1.0, top_k=0, top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0],
                             atol=0.015)
  p = np.array([.4, .3, .2, .1]) ** 2
  np.testing.assert_allclose(freqs(temperature=0.5, top_k=0, top_p=1.0), p / p.sum(), atol=0.015)


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5)])
def test_bad_settings_are_config_errors(field, value):
  with pytest.raises(ConfigError, match=field.replace("_", "-")):
    sample.check(dataclasses.replace(sample.SamplingConfig(), **{field: value}))



class _IdTokenizer:
  """Text '5 17 3' <-> ids [5, 17, 3]; no bos, no eos."""
  bos_id, eos_id, pad_id = None, None, 0

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return " ".join(map(str, ids))


def test_sampling_past_the_trained_context_warns_once(capsys):
  """PROMPTS and 3 new tokens (the shapes test_stops_at_eos... compiled): 7 + 3 > 9 once."""
  from mai_jax.config import Config
  texts = sample.sample_text(Config(), tiny_model(), _IdTokenizer(),
                             [" ".join(map(str, p)) for p in PROMPTS],
                             sample.SamplingConfig(3, temperature=0), trained_context=9)
  assert [len(t.split()) for t in texts] == [3, 3, 3]
  err = capsys.readouterr().err
  assert err.count("\n") == 1
  assert err.startswith("mai-jax: warning: 1 of 3 generation(s) ran to 10 tokens, past the 9 the "
                        "model was trained at (data.seq_len)")


@pytest.mark.parametrize("lengths, context, warned", [
    ([10, 4], 10, False), ([11, 4], 10, True), ([11], None, False), ([], 10, False)])
def test_context_warning_only_past_the_trained_length(lengths, context, warned):
  assert (sample.context_warning(lengths, context) is not None) == warned
