"""The Llama decoder: embed -> N pre-norm blocks (scanned, rematerialized) -> norm -> logits.

Layer stacking: with `scan_layers` the N blocks are created once under `nnx.vmap`, so every block
parameter carries a leading [N] axis named 'layers' in its partition metadata, and the forward pass
is one `jax.lax.scan` over that axis: compile time does not grow with depth. Without it the blocks
are a plain list run in a Python loop (same math; handy for debugging and per-layer surgery).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mai_jax.config import ModelConfig
from mai_jax.model.layers import (MLP, Attention, Embed, KVCache, RMSNorm, compute_dtype,
                                  create_param)
from mai_jax.sharding import shard_act

RESIDUAL = ("batch", "seq", "embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, segment_ids_BT: Optional[jax.Array],
               positions_BT: jax.Array) -> jax.Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT)
    x_BTD = shard_act(x_BTD, RESIDUAL)
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return shard_act(x_BTD, RESIDUAL)


def _block_fn(graphdef: nnx.GraphDef, remat: str, in_scan: bool):
  """Pure (x, block_state, segment_ids, positions) -> x, wrapped in jax.checkpoint per `remat`.

  A pure function of the block's state (instead of a Module method) lets the same body run under
  jax.lax.scan over stacked states and under jax.checkpoint without NNX transforms in between.
  """
  def apply(x_BTD, state, segment_ids_BT, positions_BT):
    return nnx.merge(graphdef, state)(x_BTD, segment_ids_BT, positions_BT)

  if remat == "none":
    return apply
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r} is not one of 'none', 'full', 'dots'")
  # Inside scan XLA cannot CSE the recomputation away, so the optimization barriers that
  # prevent_cse inserts would only cost time (see jax.checkpoint's docs).
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


class Decoder(nnx.Module):
  """Llama-family decoder LM.

  __call__(tokens_BT, segment_ids_BT=None, positions_BT=None) -> float32 logits_BTV.
  segment_ids_BT: int32; equal nonzero ids mark one packed document, 0 marks padding; None: one
  document per row. positions_BT: position within the document (drives RoPE); None: arange(T).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = create_param(rngs, nnx.initializers.normal(cfg.init_std),
                                  (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.param_dtype)  # w_DV

  def __call__(self, tokens_BT: jax.Array, segment_ids_BT: Optional[jax.Array] = None,
               positions_BT: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    x_BTD = shard_act(self.embed(tokens_BT), RESIDUAL)

    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      block_fn = _block_fn(graphdef, cfg.remat, in_scan=True)

      def body(carry_BTD, layer_state):
        return block_fn(carry_BTD, layer_state, segment_ids_BT, positions_BT), None

      x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
    else:
      for block in self.blocks:
        graphdef, state = nnx.split(block)
        x_BTD = _block_fn(graphdef, cfg.remat, in_scan=False)(x_BTD, state, segment_ids_BT,
                                                               positions_BT)

    return self._logits(x_BTD)

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BTD = self.final_norm(x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = self.embed.attend(x_BTD)
    else:
      dt = compute_dtype(cfg)
      logits_BTV = jnp.einsum("btd,dv->btv", x_BTD.astype(dt), self.unembed[...].astype(dt),
                              preferred_element_type=jnp.float32)
    return shard_act(logits_BTV, ("batch", "seq", "vocab"))


  # -- Incremental decoding (sampling) --------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> None:
    """Gives every attention layer an empty KVCache of `max_len` slots; then call `decode`.

    Each cache gets the same leading (stacking) axes as its layer's parameters, so it is sliced
    along with them however the blocks are stacked.
    """
    cfg = self.cfg
    graphdef, empty = nnx.split(KVCache(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim,
                                        compute_dtype(cfg)))
    for _, module in nnx.iter_graph(self):
      if isinstance(module, Attention):
        lead = module.q_proj.shape[:-3]
        state = jax.tree.map(lambda x, lead=lead: jnp.broadcast_to(x, lead + x.shape), empty)
        module.cache = nnx.data(nnx.merge(graphdef, state))

  def decode(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array,
             positions_BT: jax.Array) -> jax.Array:
    """Logits of T new tokens given everything already in the KV cache, which they are appended to.

    Prefill passes the (left-padded) prompts, then each step one token per row. segment_ids_BT: 1
    for real tokens, 0 for padding; positions_BT: each row's own positions (RoPE). Equals
    `__call__` on the whole sequence so far, restricted to the new tokens.
    """
    x_BTD = shard_act(self.embed(tokens_BT), RESIDUAL)
    if self.cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(carry_BTD, layer_state):
        block = nnx.merge(graphdef, layer_state)
        carry_BTD = block(carry_BTD, segment_ids_BT, positions_BT)
        return carry_BTD, nnx.state(block, nnx.Cache)  # only the cache changes; params stay put

      x_BTD, caches = jax.lax.scan(body, x_BTD, stacked)
      nnx.update(self.blocks, caches)
    else:
      for block in self.blocks:
        x_BTD = block(x_BTD, segment_ids_BT, positions_BT)
    return self._logits(x_BTD)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """num_layers Blocks as one Block whose params have a leading 'layers' axis (own keys each)."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(layer_rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=layer_rngs)

  return create(rngs)


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count from the shapes alone (no allocation; e.g. for the planner)."""
  D, H, KV, K, F, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                       cfg.vocab_size)
  attention = D * H * K + 2 * D * KV * K + H * K * D
  mlp = 3 * D * F
  norms = 2 * D
  per_layer = attention + mlp + norms
  embeddings = V * D * (1 if cfg.tie_embeddings else 2)
  return cfg.num_layers * per_layer + embeddings + D  # + final norm
