"""The decoder as a specification: causality, document masking, parity of RoPE and attention with
independent NumPy references, scan == loop, remat changes nothing, exact parameter counts, logical
partition specs, sharded construction on 8 devices, and 16-bit compute."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mai_jax import sharding
from mai_jax.config import DEFAULT_RULES, MeshConfig, ModelConfig
from mai_jax.model import Decoder, count_params
from mai_jax.model import remat as remat_lib
from mai_jax.model.layers import Attention, apply_rope, attention_implementation
from mai_jax.model.transformer import Block, _block_fn

PARAM_AXES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}


def small_cfg(**overrides) -> ModelConfig:
  base = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48,
              vocab_size=61, compute_dtype="float32", param_dtype="float32", remat="none",
              scan_layers=True, attention_impl="xla", init_std=0.1)
  base.update(overrides)
  return ModelConfig(**base)


@nnx.jit
def forward(model, tokens_BT, segment_ids_BT=None, positions_BT=None):
  return model(tokens_BT, segment_ids_BT, positions_BT)


def numpy_init(make_module, seed):
  """`make_module()` with NumPy-random weights (norm scales near 1).

  The forward-pass tests do not depend on the initializer, and XLA:CPU takes seconds per shape to
  compile jax.random.normal; building abstractly and filling from NumPy keeps the file fast. The
  real initializer runs in the sharded-init and bf16 tests.
  """
  graphdef, state = nnx.split(nnx.eval_shape(make_module))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    noise = rng.normal(scale=0.1, size=var.shape)
    value = 1.0 + noise if path[-1] == "scale" else noise
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def make_decoder(cfg, seed):
  return numpy_init(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), seed)


def random_tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=shape), jnp.int32)


# ------------------------------------------------------------------------------------------------
# Masking


def test_causal():
  cfg = small_cfg()
  model = make_decoder(cfg, 0)
  T = 10
  tokens_BT = random_tokens(0, (1, T), cfg.vocab_size)
  base_BTV = np.asarray(forward(model, tokens_BT))
  for t in (0, 4, T - 1):
    changed_BT = tokens_BT.at[0, t].set((tokens_BT[0, t] + 7) % cfg.vocab_size)
    new_BTV = np.asarray(forward(model, changed_BT))
    np.testing.assert_allclose(new_BTV[:, :t], base_BTV[:, :t], atol=1e-6, rtol=0)
    assert np.abs(new_BTV[:, t:] - base_BTV[:, t:]).max(axis=-1).min() > 1e-4, t


def test_packed_documents_match_separate_runs():
  cfg = small_cfg()
  model = make_decoder(cfg, 1)
  doc_a = random_tokens(1, (6,), cfg.vocab_size)
  doc_b = random_tokens(2, (7,), cfg.vocab_size)
  pad = jnp.zeros((3,), jnp.int32)
  # Row 0: A, B, padding. Row 1: B, A, padding (documents at other offsets).
  tokens_BT = jnp.stack([jnp.concatenate([doc_a, doc_b, pad]),
                         jnp.concatenate([doc_b, doc_a, pad])])
  seg_a, seg_b, seg_pad = np.ones(6), np.full(7, 2), np.zeros(3)
  segment_ids_BT = jnp.asarray(np.stack([np.concatenate([seg_a, seg_b, seg_pad]),
                                         np.concatenate([seg_b, seg_a, seg_pad])]), jnp.int32)
  pos_a, pos_b, pos_pad = np.arange(6), np.arange(7), np.zeros(3)
  positions_BT = jnp.asarray(np.stack([np.concatenate([pos_a, pos_b, pos_pad]),
                                       np.concatenate([pos_b, pos_a, pos_pad])]), jnp.int32)
  packed_BTV = np.asarray(forward(model, tokens_BT, segment_ids_BT, positions_BT))
  alone_a = np.asarray(forward(model, doc_a[None]))[0]
  alone_b = np.asarray(forward(model, doc_b[None]))[0]
  assert np.isfinite(packed_BTV).all()  # padding rows are not fully masked
  np.testing.assert_allclose(packed_BTV[0, :6], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed_BTV[0, 6:13], alone_b, atol=1e-5)
  np.testing.assert_allclose(packed_BTV[1, :7], alone_b, atol=1e-5)
  np.testing.assert_allclose(packed_BTV[1, 7:13], alone_a, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Parity with NumPy references


def rope_reference(x_BTHK: np.ndarray, positions_BT: np.ndarray, theta: float) -> np.ndarray:
  """HF Llama RoPE written out per pair: dims (i, i + K/2) rotate by pos * theta^(-2i/K)."""
  x = np.asarray(x_BTHK, np.float64)
  K = x.shape[-1]
  out = np.empty_like(x)
  for i in range(K // 2):
    angle_BT = np.asarray(positions_BT, np.float64) * theta ** (-2.0 * i / K)
    cos, sin = np.cos(angle_BT)[..., None], np.sin(angle_BT)[..., None]
    first, second = x[..., i], x[..., i + K // 2]
    out[..., i] = first * cos - second * sin
    out[..., i + K // 2] = second * cos + first * sin
  return out


def test_rope_matches_pairwise_reference():
  rng = np.random.default_rng(0)
  B, T, H, K = 2, 7, 3, 16
  x_BTHK = rng.normal(size=(B, T, H, K)).astype(np.float32)
  positions_BT = rng.integers(0, 500, size=(B, T)).astype(np.int32)
  for theta in (10000.0, 500000.0):
    got = np.asarray(apply_rope(jnp.asarray(x_BTHK), jnp.asarray(positions_BT), theta))
    np.testing.assert_allclose(got, rope_reference(x_BTHK, positions_BT, theta), atol=1e-4)
  # The same rotation as multiplying complex numbers (first half + i * second half) by e^{i angle}.
  z = x_BTHK[..., :K // 2] + 1j * x_BTHK[..., K // 2:]
  angles = positions_BT[..., None, None] * 10000.0 ** (-np.arange(0, K, 2) / K)
  rotated = z * np.exp(1j * angles)
  np.testing.assert_allclose(rope_reference(x_BTHK, positions_BT, 10000.0),
                             np.concatenate([rotated.real, rotated.imag], axis=-1), atol=1e-9)
  # Position 0 is the identity; scores depend on relative position only.
  zeros_BT = jnp.zeros((B, T), jnp.int32)
  np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x_BTHK), zeros_BT, 1e4)), x_BTHK)
  q_K, k_K = x_BTHK[0, 0, 0], x_BTHK[0, 1, 0]

  def score(m, n):
    rq = apply_rope(jnp.asarray(q_K)[None, None, None], jnp.full((1, 1), m), 1e4)
    rk = apply_rope(jnp.asarray(k_K)[None, None, None], jnp.full((1, 1), n), 1e4)
    return float(jnp.sum(rq * rk))

  assert abs(score(5, 2) - score(13, 10)) < 1e-4


def attention_reference(attn: Attention, cfg: ModelConfig, x_BTD, segment_ids_BT, positions_BT):
  """Softmax attention in float64: query head h reads kv head h // (H / KV), causal AND same doc."""
  wq = np.asarray(attn.q_proj[...], np.float64)
  wk = np.asarray(attn.k_proj[...], np.float64)
  wv = np.asarray(attn.v_proj[...], np.float64)
  wo = np.asarray(attn.o_proj[...], np.float64)
  x = np.asarray(x_BTD, np.float64)
  q = rope_reference(np.einsum("btd,dhk->bthk", x, wq), positions_BT, cfg.rope_theta)
  k = rope_reference(np.einsum("btd,dgk->btgk", x, wk), positions_BT, cfg.rope_theta)
  v = np.einsum("btd,dgk->btgk", x, wv)
  B, T, H, K = q.shape
  group = H // cfg.num_kv_heads
  seg = np.asarray(segment_ids_BT)
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      g = h // group
      scores = q[b, :, h] @ k[b, :, g].T / np.sqrt(K)
      allowed = np.tril(np.ones((T, T), bool)) & (seg[b][:, None] == seg[b][None, :])
      scores = np.where(allowed, scores, -np.inf)
      p = np.exp(scores - scores.max(axis=-1, keepdims=True))
      p /= p.sum(axis=-1, keepdims=True)
      out[b, :, h] = p @ v[b, :, g]
  return np.einsum("bthk,hkd->btd", out, wo)


def test_attention_matches_gqa_reference():
  cfg = small_cfg(num_heads=6, num_kv_heads=2, d_model=24, head_dim=8)
  attn = numpy_init(lambda: Attention(cfg, rngs=nnx.Rngs(0)), 3)
  rng = np.random.default_rng(3)
  B, T = 2, 9
  x_BTD = rng.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  segment_ids_BT = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
  positions_BT = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0], list(range(T))], np.int32)
  got = np.asarray(attn(jnp.asarray(x_BTD), jnp.asarray(segment_ids_BT), jnp.asarray(positions_BT)))
  want = attention_reference(attn, cfg, x_BTD, segment_ids_BT, positions_BT)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_implementation_choice():
  assert attention_implementation(small_cfg(attention_impl="auto")) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  float32_auto = small_cfg(attention_impl="auto", compute_dtype="float32")
  assert attention_implementation(float32_auto) == "xla"
  with pytest.raises(ValueError, match="compute_dtype"):
    attention_implementation(small_cfg(attention_impl="cudnn", compute_dtype="float32"))


# ------------------------------------------------------------------------------------------------
# Scan, loop and remat are the same function


def copy_stacked_into_list(scanned: Decoder, looped: Decoder) -> None:
  nnx.update(looped.embed, nnx.state(scanned.embed))
  nnx.update(looped.final_norm, nnx.state(scanned.final_norm))
  looped.unembed[...] = scanned.unembed[...]
  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(looped.blocks):
    layer = jax.tree.map(lambda a: a[i], stacked)
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
      var[...] = dict(nnx.to_flat_state(layer))[path][...]


def test_scan_equals_loop():
  cfg = small_cfg(num_layers=3)
  scanned = make_decoder(cfg, 4)
  looped = make_decoder(dataclasses.replace(cfg, scan_layers=False), 5)
  copy_stacked_into_list(scanned, looped)
  tokens_BT = random_tokens(4, (2, 8), cfg.vocab_size)
  segment_ids_BT = jnp.asarray([[1] * 5 + [2] * 3, [1] * 8], jnp.int32)
  positions_BT = jnp.asarray([list(range(5)) + list(range(3)), list(range(8))], jnp.int32)
  np.testing.assert_allclose(np.asarray(forward(looped, tokens_BT, segment_ids_BT, positions_BT)),
                             np.asarray(forward(scanned, tokens_BT, segment_ids_BT, positions_BT)),
                             atol=1e-5)


def test_tied_embeddings_use_the_embedding_table_as_output_layer():
  cfg = small_cfg(tie_embeddings=True)
  tied = make_decoder(cfg, 9)
  untied = make_decoder(dataclasses.replace(cfg, tie_embeddings=False), 9)
  nnx.update(untied, nnx.state(tied))  # every shared parameter
  untied.unembed[...] = tied.embed.embedding[...].T
  assert not hasattr(tied, "unembed")
  tokens_BT = random_tokens(9, (2, 7), cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(forward(tied, tokens_BT)),
                             np.asarray(forward(untied, tokens_BT)), atol=1e-5)


def loss_and_grads(model: Decoder, tokens_BT):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params, tokens_BT):
    logits_BTV = nnx.merge(graphdef, params, rest)(tokens_BT[:, :-1])
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1))

  return jax.value_and_grad(loss_fn)(params, tokens_BT)


def test_remat_and_loop_change_nothing():
  """Loss and gradients agree: scanned with remat none / full / dots, and the loop with full (the
  other policies differ only in the names they save: test_each_remat_policy_saves_...)."""
  cfg = small_cfg(remat="none")
  tokens_BT = random_tokens(6, (2, 9), cfg.vocab_size)
  scanned = make_decoder(cfg, 6)
  loss_ref, grads_ref = loss_and_grads(scanned, tokens_BT)
  assert np.isfinite(float(loss_ref))
  for remat in ("full", "dots"):
    loss, grads = loss_and_grads(make_decoder(dataclasses.replace(cfg, remat=remat), 6), tokens_BT)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, grads_ref)

  looped = make_decoder(dataclasses.replace(cfg, scan_layers=False, remat="full"), 60)
  copy_stacked_into_list(scanned, looped)
  loss, grads = loss_and_grads(looped, tokens_BT)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
  stacked = {path: var.get_value() for path, var in nnx.to_flat_state(grads_ref)}
  for path, var in nnx.to_flat_state(grads):
    want = stacked[("blocks",) + path[2:]][path[1]] if path[0] == "blocks" else stacked[path]
    np.testing.assert_allclose(var.get_value(), want, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_scan_compiles_one_block_whatever_the_depth():
  def num_eqns(num_layers):
    cfg = small_cfg(num_layers=num_layers, remat="full")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return len(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens).eqns)

  assert num_eqns(2) == num_eqns(12)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_wraps_each_block(scan_layers):
  def num_checkpoints(remat):
    cfg = small_cfg(remat=remat, scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    return str(jaxpr).count(" remat2[")  # the jax.checkpoint primitive

  blocks_traced = 1 if scan_layers else small_cfg().num_layers
  assert num_checkpoints("none") == 0
  assert num_checkpoints("full") == num_checkpoints("dots") == blocks_traced


def saved_names(remat: str, moe: bool = False) -> set[str]:
  """checkpoint_name tags of what one block's backward keeps under `remat` (jax's own report)."""
  cfg = small_cfg(**(dict(num_experts=4, experts_per_token=2) if moe else {}))
  graphdef, state = nnx.split(Block(cfg, rngs=nnx.Rngs(0), moe=moe))
  block_fn = _block_fn(graphdef, remat, in_scan=False)
  seg_BT, pos_BT = jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None]
  report = io.StringIO()
  with contextlib.redirect_stdout(report):
    jax.ad_checkpoint.print_saved_residuals(
        lambda x, s: block_fn(x, s, seg_BT, pos_BT)[0], jnp.ones((1, 4, cfg.d_model)), state)
  return set(re.findall(r"named '(\w+)'", report.getvalue()))


def test_each_remat_policy_saves_what_its_name_says():
  """jax's saved-residual report per policy: exactly the tagged outputs the policy lists that the
  backward needs (mlp_down's output is not needed: the next block's input is checkpointed)."""
  needed = {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up"}
  assert saved_names("full") == set()
  assert saved_names("dots") == needed
  assert saved_names("attn_proj") == {"q_proj", "k_proj", "v_proj", "o_proj"}
  assert saved_names("qkv_proj") == {"q_proj", "k_proj", "v_proj"}
  for remat, names in remat_lib.SAVED_NAMES.items():
    if names is not None:
      assert saved_names(remat) == needed & set(names), remat
  assert "router_logits" in saved_names("dots", moe=True)
  assert "router_logits" not in saved_names("attn_proj", moe=True)


# ------------------------------------------------------------------------------------------------
# Parameters: counts, logical axes, sharded construction


def param_sizes(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_count_params_matches_created(tie, scan_layers):
  cfg = small_cfg(tie_embeddings=tie, scan_layers=scan_layers, num_layers=3)
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  assert count_params(cfg) == param_sizes(model)


def test_count_params_llama3_8b():
  cfg = ModelConfig(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                    d_ff=14336, vocab_size=128256, tie_embeddings=False)
  assert count_params(cfg) == 8_030_261_248


def test_partition_specs_are_logical_with_layers_leading():
  cfg = small_cfg()
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  flat_specs = dict(nnx.to_flat_state(specs))
  flat_shapes = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  names = set()
  for path, var in flat_specs.items():
    spec = tuple(var.get_value())
    assert len(spec) == len(flat_shapes[path].shape), path
    names.update(spec)
    if path[0] == "blocks":
      assert spec[0] == "layers" and flat_shapes[path].shape[0] == cfg.num_layers, path
    else:
      assert "layers" not in spec, path
  assert names == PARAM_AXES
  spec_of = {"/".join(map(str, p)): tuple(v.get_value()) for p, v in flat_specs.items()}
  assert spec_of["blocks/attn/q_proj"] == ("layers", "embed", "heads", "head_dim")
  assert spec_of["blocks/attn/k_proj"] == ("layers", "embed", "kv_heads", "head_dim")
  assert spec_of["blocks/attn/o_proj"] == ("layers", "heads", "head_dim", "embed")
  assert spec_of["blocks/mlp/down_proj"] == ("layers", "mlp", "embed")
  assert spec_of["embed/embedding"] == ("vocab", "embed")
  assert spec_of["unembed"] == ("embed", "vocab")
  assert spec_of["final_norm/scale"] == ("norm",)


def test_sharded_init_and_forward_on_8_devices():
  """The training path: abstract model -> logical specs -> mesh shardings -> jitted init.

  Creation happens under `jax.set_mesh`, where flax's eager sharding would (if the model let it)
  read the logical names as mesh axes and fail. (`nnx.eval_shape` itself must run outside the mesh
  or under `nnx.logical_axis_rules`: it attaches shardings from the names whatever eager_sharding.)
  """
  cfg = small_cfg(vocab_size=64)
  mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(7)))
  graphdef, abstract_state = nnx.split(abstract)
  with jax.set_mesh(mesh):
    traced_state = jax.eval_shape(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(7))))
  assert jax.tree.map(lambda x: x.shape, traced_state) == jax.tree.map(lambda x: x.shape,
                                                                       abstract_state)
  specs = nnx.get_partition_spec(abstract_state)
  assert tuple(specs["blocks"]["attn"]["q_proj"].get_value()) == (
      "layers", "embed", "heads", "head_dim")
  shardings = jax.tree.map(
      lambda spec, x: sharding.named_sharding(mesh, DEFAULT_RULES, tuple(spec), x.shape),
      specs, abstract_state)

  def init():
    return nnx.state(Decoder(cfg, rngs=nnx.Rngs(7)))

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  q_proj = state["blocks"]["attn"]["q_proj"][...]
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q_proj.addressable_shards[0].data.shape == (cfg.num_layers, cfg.d_model // 4,
                                                     cfg.num_heads // 2, cfg.head_dim)

  @jax.jit
  def apply(state, tokens_BT):
    with sharding.use_rules(DEFAULT_RULES):
      return nnx.merge(graphdef, state)(tokens_BT)

  tokens_BT = random_tokens(7, (8, 6), cfg.vocab_size)
  with jax.set_mesh(mesh):
    logits_BTV = apply(state, tokens_BT)
  unsharded_BTV = apply(jax.device_get(state), tokens_BT)
  assert np.isfinite(np.asarray(unsharded_BTV)).all()
  np.testing.assert_allclose(np.asarray(logits_BTV), np.asarray(unsharded_BTV), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_returns_float32_logits(param_dtype):
  cfg = small_cfg(compute_dtype="bfloat16", param_dtype=param_dtype, remat="full")
  model = make_decoder(cfg, 8)
  tokens_BT = random_tokens(8, (2, 8), cfg.vocab_size)
  logits_BTV = forward(model, tokens_BT, jnp.ones((2, 8), jnp.int32))
  assert logits_BTV.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits_BTV)).all()
  assert all(x.dtype == jnp.dtype(param_dtype)
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # Close to the same weights run in float32.
  model32 = make_decoder(dataclasses.replace(cfg, compute_dtype="float32"), 8)
  np.testing.assert_allclose(np.asarray(logits_BTV), np.asarray(forward(model32, tokens_BT)),
                             atol=0.1)
