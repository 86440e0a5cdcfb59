"""Llama building blocks: RMSNorm, rotary embedding, grouped-query attention, SwiGLU MLP, embedding.

Every parameter is created through `create_param`, which records its logical axis names
('embed', 'heads', 'mlp', ...) as metadata; `nnx.get_partition_spec` reads them back and the mesh
rules in the config turn them into shardings. Parameters are stored in `param_dtype` and cast to
`compute_dtype` at each matmul; norm statistics, rotary angles, attention softmax and logits are in
float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mai_jax.config import ModelConfig
from mai_jax.model import fp8_matmul, packed_attention
from mai_jax.sharding import shard_act

# Names of the projection outputs (checkpoint_name tags): what remat 'dots' saves
# (model/transformer.py REMAT_POLICIES). Named rather than "every dot without batch dims"
# because under the pipeline's vmap over stages every dot gains a batch dimension, and a
# shape-based policy would then save nothing.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down",
               "router_logits")

# The only logical names parameters may use (the mesh rules in mai_jax.config map them).
PARAM_AXES = ("embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "experts", "layers",
              "norm")


def create_param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str],
                 dtype) -> nnx.Param:
  """Creates a Param annotated with logical axis names.

  `eager_sharding=False`: flax 0.12 shards new variables eagerly by default when a mesh is set, and
  would read our logical names as mesh axes. Placement is decided elsewhere (abstract model ->
  `nnx.get_partition_spec` -> rules -> jitted init with out_shardings), so the model only records
  the names. (`nnx.eval_shape` is stricter: under a mesh it turns these names into shardings
  whatever eager_sharding says, so build abstract models outside `jax.set_mesh`, or inside
  `nnx.logical_axis_rules(rules)`.)
  """
  assert len(shape) == len(axes) and all(a in PARAM_AXES for a in axes), (shape, axes)
  init = nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)))


def compute_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.compute_dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale_D, statistics in float32; returns the input's dtype."""

  def __init__(self, dim: int, eps: float, param_dtype: str, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = create_param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x32_BTD = x_BTD.astype(jnp.float32)
    ms_BT1 = jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True)
    y_BTD = x32_BTD * jax.lax.rsqrt(ms_BT1 + self.eps)
    return (y_BTD * self.scale[...].astype(jnp.float32)[None, None, :]).astype(x_BTD.dtype)


def rotate_half(x_BTHK: jax.Array) -> jax.Array:
  """[x1, x2] -> [-x2, x1] over the last axis split in halves (HF Llama layout)."""
  x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


# (factor, low_freq_factor, high_freq_factor, original_max_len) of Llama 3.1 RoPE scaling.
RopeScaling = tuple[float, float, float, int]


def rope_scaling(cfg: ModelConfig) -> Optional[RopeScaling]:
  if cfg.rope_scaling_factor == 1:
    return None
  return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_len)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None):
  """theta^(-2i/K) for i < K/2, float32; with `scaling`, HF's 'llama3' rule: wavelengths longer
  than original_max_len / low_freq_factor are divided by factor, shorter than
  original_max_len / high_freq_factor kept, and the band between interpolated smoothly."""
  inv_freq_k = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq_k
  factor, low, high, original = scaling
  wavelen_k = 2 * math.pi / inv_freq_k
  scaled_k = jnp.where(wavelen_k > original / low, inv_freq_k / factor, inv_freq_k)
  smooth_k = (original / wavelen_k - low) / (high - low)
  smoothed_k = (1 - smooth_k) * scaled_k / factor + smooth_k * scaled_k
  medium_k = (wavelen_k >= original / high) & (wavelen_k <= original / low)
  return jnp.where(medium_k, smoothed_k, scaled_k)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float,
               scaling: Optional[RopeScaling] = None) -> jax.Array:
  """Rotary position embedding, HF LlamaRotaryEmbedding convention ("rotate half").

  Dimension i of the first half pairs with dimension i + K/2 and rotates by
  positions * theta^(-2i/K) (see rope_inv_freq for `scaling`). Angles are computed in float32
  (bf16 positions lose integers past 256).
  """
  inv_freq_k = rope_inv_freq(x_BTHK.shape[-1], theta, scaling)  # k = K/2
  freqs_BTk = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_k[None, None, :]
  angles_BT1K = jnp.concatenate([freqs_BTk, freqs_BTk], axis=-1)[:, :, None, :]
  x32_BTHK = x_BTHK.astype(jnp.float32)
  out_BTHK = x32_BTHK * jnp.cos(angles_BT1K) + rotate_half(x32_BTHK) * jnp.sin(angles_BT1K)
  return out_BTHK.astype(x_BTHK.dtype)


def attention_implementation(cfg: ModelConfig) -> str:
  """'xla', 'cudnn' (jax.nn.dot_product_attention) or 'cudnn_packed' (model/packed_attention.py);
  'auto' takes 'cudnn' on GPU in 16 bits."""
  if cfg.attention_impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    half = compute_dtype(cfg) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and half else "xla"
  if cfg.attention_impl not in ("xla", "cudnn", "cudnn_packed"):
    raise ValueError(f"model.attention_impl={cfg.attention_impl!r} is not 'auto', 'xla', 'cudnn' "
                     "or 'cudnn_packed'")
  # Off GPU 'cudnn_packed' runs packed_attention.emulate, which has float32.
  needs_cudnn = cfg.attention_impl == "cudnn" or jax.default_backend() == "gpu"
  if needs_cudnn and compute_dtype(cfg) == jnp.dtype(jnp.float32):
    raise ValueError(f"model.attention_impl={cfg.attention_impl!r} needs model.compute_dtype="
                     "'bfloat16' (cuDNN flash attention has no float32 kernel); use 'xla' or "
                     "'auto'")
  return cfg.attention_impl


def cpu_upcasts_16bit_matmuls() -> bool:
  """True on XLA:CPU, where a 16-bit x 16-bit -> float32 dot (preferred_element_type) runs ~1.4x
  slower than the same dot on operands upcast to float32 (no bfloat16 FMA on AVX2; measured in
  benchmarks/results/matmul_precision_cpu.json). The results are the same: bfloat16 values embed
  exactly in float32 and both forms accumulate in float32. On GPU the 16-bit operands feed the
  tensor cores, so they stay 16-bit."""
  return jax.default_backend() == "cpu"


def float32_logits(x_BTD: jax.Array, w, dtype, *, vocab_axis: int) -> jax.Array:
  """Float32 logits [B, T, V] of x against the [D, V] (vocab_axis=1) or [V, D] (vocab_axis=0,
  the tied embedding) matrix: products of compute-dtype values accumulated in float32.

  One 2-D [B*T, D] matmul rather than a [B, T, D] einsum: its weight gradient is then a plain
  x^T @ dlogits, which XLA:CPU runs ~2x faster than the transposed [B, T]-contracting dot the
  einsum's backward produces (benchmarks/results/matmul_precision_cpu.json)."""
  if cpu_upcasts_16bit_matmuls():
    dtype = jnp.float32
  B, T, D = x_BTD.shape
  contract = ((1,), (1 - vocab_axis,))
  logits_NV = jax.lax.dot_general(x_BTD.reshape(B * T, D).astype(dtype), w.astype(dtype),
                                  (contract, ((), ())), preferred_element_type=jnp.float32)
  return logits_NV.reshape(B, T, logits_NV.shape[-1])


def dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, *, is_causal: bool,
                          implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention; the 'xla' path on CPU takes float32 operands (the logits are
  float32 either way, cpu_upcasts_16bit_matmuls) and the probabilities then multiply V in float32
  instead of being rounded to the compute dtype. Returns q's dtype."""
  qkv = (q_BTHK, k_BSGK, v_BSGK)
  if implementation == "xla" and cpu_upcasts_16bit_matmuls():
    qkv = tuple(a.astype(jnp.float32) for a in qkv)
  out_BTHK = jax.nn.dot_product_attention(*qkv, mask=mask_B1TS, is_causal=is_causal,
                                          implementation=implementation)
  return out_BTHK.astype(q_BTHK.dtype)


class KVCache(nnx.Module):
  """Keys, values and segment ids of every position decoded so far, for one attention layer.

  Slots [0, index) are filled. New tokens are written at slot `index` onwards, and a query in slot
  q attends to key slots s <= q of its own segment, so left-padded prompts (padding = segment 0)
  decode in lockstep: every row writes the same slot each step while its positions (RoPE) count
  from its own first real token. Arrays are sharded like activations ('batch','seq',...).
  """

  def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
    kv_shape = (batch, max_len, num_kv_heads, head_dim)
    self.k = nnx.Cache(shard_act(jnp.zeros(kv_shape, dtype), KV_AXES))
    self.v = nnx.Cache(shard_act(jnp.zeros(kv_shape, dtype), KV_AXES))
    self.segment_ids = nnx.Cache(shard_act(jnp.zeros((batch, max_len), jnp.int32),
                                           ("batch", "seq")))
    self.index = nnx.Cache(jnp.zeros((), jnp.int32))

  def rewind(self, length) -> None:
    """Keeps only slots [0, length) (an int or a traced int32 scalar): the next `attend` writes
    from slot `length` on. Later slots are not erased, and need not be: the queries of a write
    at slots [length, length + T) see key slots up to their own, which that write has just
    overwritten, and stale slots further on are always later than every query."""
    self.index[...] = jnp.full(self.index.shape, length, jnp.int32)

  def attend(self, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array,
             segment_ids_BT: jax.Array) -> jax.Array:
    """Appends the T new keys/values, then attends the T queries over the whole cache."""
    T, S = q_BTHK.shape[1], self.k.shape[1]
    start = self.index[...]
    k_BSGK = jax.lax.dynamic_update_slice(self.k[...], k_BTGK.astype(self.k.dtype),
                                          (0, start, 0, 0))
    v_BSGK = jax.lax.dynamic_update_slice(self.v[...], v_BTGK.astype(self.v.dtype),
                                          (0, start, 0, 0))
    seg_BS = jax.lax.dynamic_update_slice(self.segment_ids[...],
                                          segment_ids_BT.astype(jnp.int32), (0, start))
    self.k[...] = k_BSGK = shard_act(k_BSGK, KV_AXES)
    self.v[...] = v_BSGK = shard_act(v_BSGK, KV_AXES)
    self.segment_ids[...] = seg_BS
    self.index[...] = start + T
    query_slot_T = start + jnp.arange(T, dtype=jnp.int32)
    causal_TS = jnp.arange(S, dtype=jnp.int32)[None, :] <= query_slot_T[:, None]
    same_doc_BTS = seg_BS[:, None, :] == segment_ids_BT[:, :, None]
    mask_B1TS = (causal_TS[None, :, :] & same_doc_BTS)[:, None, :, :]
    out_BTHK = dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, is_causal=False,
                                     implementation="xla")
    return shard_act(out_BTHK, ("batch", "seq", "heads", "head_dim"))


KV_AXES = ("batch", "seq", "kv_heads", "head_dim")


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings and document (segment) masking.

  K/V keep num_kv_heads heads: jax.nn.dot_product_attention groups the query heads itself, so K/V
  are never repeated in memory.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"model.num_kv_heads={cfg.num_kv_heads} must divide "
                       f"model.num_heads={cfg.num_heads}")
    D, H, KV, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    p = cfg.param_dtype
    self.q_proj = create_param(rngs, init, (D, H, K), ("embed", "heads", "head_dim"), p)  # w_DHK
    self.k_proj = create_param(rngs, init, (D, KV, K), ("embed", "kv_heads", "head_dim"), p)
    self.v_proj = create_param(rngs, init, (D, KV, K), ("embed", "kv_heads", "head_dim"), p)
    self.o_proj = create_param(rngs, out_init, (H, K, D), ("heads", "head_dim", "embed"), p)
    self.rope_theta = cfg.rope_theta
    self.rope_scaling = rope_scaling(cfg)
    self.dtype = compute_dtype(cfg)
    self.implementation = attention_implementation(cfg)
    self.max_segments = cfg.attention_max_segments
    self.fp8 = cfg.fp8  # the projections' matmuls (model/fp8_matmul.py)
    self.cache: Optional[KVCache] = None  # set by Decoder.init_cache for incremental decoding

  def __call__(self, x_BTD: jax.Array, segment_ids_BT: Optional[jax.Array],
               positions_BT: jax.Array) -> jax.Array:
    dt, einsum = self.dtype, functools.partial(fp8_matmul.einsum, mode=self.fp8)
    x_BTD = x_BTD.astype(dt)
    q_BTHK = checkpoint_name(einsum("btd,dhk->bthk", x_BTD, self.q_proj[...].astype(dt)),
                             "q_proj")
    k_BTGK = checkpoint_name(einsum("btd,dgk->btgk", x_BTD, self.k_proj[...].astype(dt)),
                             "k_proj")  # G = kv heads
    v_BTGK = checkpoint_name(einsum("btd,dgk->btgk", x_BTD, self.v_proj[...].astype(dt)),
                             "v_proj")
    q_BTHK = shard_act(apply_rope(q_BTHK, positions_BT, self.rope_theta, self.rope_scaling),
                       ("batch", "seq", "heads", "head_dim"))
    k_BTGK = shard_act(apply_rope(k_BTGK, positions_BT, self.rope_theta, self.rope_scaling),
                       ("batch", "seq", "kv_heads", "head_dim"))
    v_BTGK = shard_act(v_BTGK, ("batch", "seq", "kv_heads", "head_dim"))

    if self.cache is not None:
      out_BTHK = self.cache.attend(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
      return einsum("bthk,hkd->btd", out_BTHK, self.o_proj[...].astype(dt))

    # Causal AND same document. The same call serves both implementations:
    # - xla: is_causal builds the triangular mask and ANDs it with `mask`.
    # - cudnn (jax 0.10): is_causal selects cuDNN's CAUSAL mask type (fully masked tiles above the
    #   diagonal are skipped), and the boolean document mask is turned by jax into an additive bias
    #   (0 / large negative) of shape [B,1,T,S] that the flash kernel adds to the logits. That is
    #   exact for any packing, at the cost of materializing a B*T*T bias per layer. We do not use
    #   query_seq_lengths/key_value_seq_lengths: they describe one valid prefix per row (padding),
    #   not several documents, so they would let packed documents attend to each other. cuDNN's
    #   packed-segment mode (q_offsets/kv_offsets) is reachable only through a private jax module:
    #   'cudnn_packed' (model/packed_attention.py) uses it.
    # Padding tokens (segment 0) attend among themselves, so no row is fully masked (no NaNs).
    if self.implementation == "cudnn_packed" and segment_ids_BT is not None:
      out_BTHK = packed_attention.packed_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT,
                                                   max_segments=self.max_segments)
    else:
      mask_B1TS = None
      if segment_ids_BT is not None:
        mask_B1TS = (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
      implementation = "cudnn" if self.implementation == "cudnn_packed" else self.implementation
      out_BTHK = dot_product_attention(q_BTHK, k_BTGK, v_BTGK, mask_B1TS, is_causal=True,
                                       implementation=implementation)
    out_BTHK = shard_act(out_BTHK, ("batch", "seq", "heads", "head_dim"))
    return checkpoint_name(einsum("bthk,hkd->btd", out_BTHK, self.o_proj[...].astype(dt)),
                           "o_proj")


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.d_ff
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    p = cfg.param_dtype
    self.gate_proj = create_param(rngs, init, (D, F), ("embed", "mlp"), p)  # w_DF
    self.up_proj = create_param(rngs, init, (D, F), ("embed", "mlp"), p)  # w_DF
    self.down_proj = create_param(rngs, out_init, (F, D), ("mlp", "embed"), p)  # w_FD
    self.dtype = compute_dtype(cfg)
    self.fp8 = cfg.fp8  # the projections' matmuls (model/fp8_matmul.py)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt, einsum = self.dtype, functools.partial(fp8_matmul.einsum, mode=self.fp8)
    x_BTD = x_BTD.astype(dt)
    gate_BTF = checkpoint_name(
        einsum("btd,df->btf", x_BTD, self.gate_proj[...].astype(dt)), "mlp_gate")
    up_BTF = checkpoint_name(einsum("btd,df->btf", x_BTD, self.up_proj[...].astype(dt)),
                             "mlp_up")
    h_BTF = shard_act(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
    return checkpoint_name(einsum("btf,fd->btd", h_BTF, self.down_proj[...].astype(dt)),
                           "mlp_down")


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` reuses it as the output layer when tied."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = create_param(rngs, nnx.initializers.normal(cfg.init_std),
                                  (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  cfg.param_dtype)  # w_VD
    self.dtype = compute_dtype(cfg)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    """Float32 logits x @ embedding.T (see float32_logits)."""
    return float32_logits(x_BTD, self.embedding[...], self.dtype, vocab_axis=0)
