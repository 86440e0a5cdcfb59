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
                                  create_param, float32_logits)
from mai_jax.model import pipeline
from mai_jax.model import remat as remat_lib
from mai_jax.model.moe import (MoE, expert_d_ff, is_moe_layer, mean_over_microbatches,
                               num_moe_layers)
from mai_jax.sharding import RESIDUAL_SEQ, sequence_parallelism, shard_act, use_rules

# The residual stream between sub-layers; its sequence axis is split over 'tensor' with
# model.sequence_parallel (sharding.residual_rules), inside attention and the MLP it is whole.
RESIDUAL = ("batch", RESIDUAL_SEQ, "embed")

class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

  The feed-forward is `mlp` (dense SwiGLU) or, with `moe=True`, `moe` (routed experts; see moe.py).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    if moe:
      self.moe = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, segment_ids_BT: Optional[jax.Array],
               positions_BT: jax.Array) -> jax.Array:
    return self.forward_with_aux(x_BTD, segment_ids_BT, positions_BT)[0]

  def forward_with_aux(self, x_BTD: jax.Array, segment_ids_BT: Optional[jax.Array],
                       positions_BT: jax.Array):
    """-> (x_BTD, aux): aux is the MoE layer's dict of router statistics, {} for a dense block."""
    # The norms' outputs are constrained like the residual, so with sequence parallelism they are
    # computed on the local part of the sequence and all-gathered only as the sub-layer's input.
    h_BTD = shard_act(self.attn_norm(x_BTD), RESIDUAL)
    x_BTD = shard_act(x_BTD + self.attn(h_BTD, segment_ids_BT, positions_BT), RESIDUAL)
    aux = {}
    h_BTD = shard_act(self.mlp_norm(x_BTD), RESIDUAL)
    if hasattr(self, "moe"):
      y_BTD, aux = self.moe(h_BTD)
    else:
      y_BTD = self.mlp(h_BTD)
    return shard_act(x_BTD + y_BTD, RESIDUAL), aux


class BlockGroup(nnx.Module):
  """The scan unit when moe_layer_interval = k > 1: k - 1 dense blocks (stacked) then one MoE block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dense = _stacked_blocks(cfg, rngs, count=cfg.moe_layer_interval - 1)
    self.moe = Block(cfg, rngs=rngs, moe=True)

  def forward_with_aux(self, x_BTD, segment_ids_BT, positions_BT):
    x_BTD, _ = _scan_blocks(self.dense, "none", x_BTD, segment_ids_BT, positions_BT)
    return self.moe.forward_with_aux(x_BTD, segment_ids_BT, positions_BT)


def _block_fn(graphdef: nnx.GraphDef, remat: str, in_scan: bool):
  """Pure (x, block_state, segment_ids, positions) -> (x, aux, kv caches), wrapped in
  jax.checkpoint per `remat`.

  A pure function of the block's state (instead of a Module method) lets the same body run under
  jax.lax.scan over stacked states and under jax.checkpoint without NNX transforms in between. The
  block's updated KV caches (when decoding; an empty state otherwise) are returned so the caller
  can write them back.
  """
  def apply(x_BTD, state, segment_ids_BT, positions_BT):
    block = nnx.merge(graphdef, state)
    x_BTD, aux = block.forward_with_aux(x_BTD, segment_ids_BT, positions_BT)
    return x_BTD, aux, nnx.state(block, nnx.Cache)

  if remat == "none":
    return apply
  # Inside scan XLA cannot CSE the recomputation away, so the optimization barriers that
  # prevent_cse inserts would only cost time (see jax.checkpoint's docs).
  return jax.checkpoint(apply, policy=remat_lib.policy(remat), prevent_cse=not in_scan)


class Decoder(nnx.Module):
  """Llama-family decoder LM.

  __call__(tokens_BT, segment_ids_BT=None, positions_BT=None) -> float32 logits_BTV.
  segment_ids_BT: int32; equal nonzero ids mark one packed document, 0 marks padding; None: one
  document per row. positions_BT: position within the document (drives RoPE); None: arange(T).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    if not cfg.scan_layers:
      self.blocks = nnx.List([Block(cfg, rngs=rngs, moe=is_moe_layer(cfg, i))
                              for i in range(cfg.num_layers)])
    elif not cfg.num_experts:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      # MoE: `dense_blocks` (first_dense_layers), then `blocks`, a stack of MoE Blocks
      # (moe_layer_interval 1) or of BlockGroups (k - 1 dense blocks and one MoE block).
      if cfg.first_dense_layers:
        self.dense_blocks = _stacked_blocks(cfg, rngs, count=cfg.first_dense_layers)
      units = (cfg.num_layers - cfg.first_dense_layers) // cfg.moe_layer_interval
      make = ((lambda r: Block(cfg, rngs=r, moe=True)) if cfg.moe_layer_interval == 1 else
              (lambda r: BlockGroup(cfg, rngs=r)))
      self.blocks = _stacked_blocks(cfg, rngs, count=units, make=make)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = create_param(rngs, nnx.initializers.normal(cfg.init_std),
                                  (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.param_dtype)  # w_DV

  def __call__(self, tokens_BT: jax.Array, segment_ids_BT: Optional[jax.Array] = None,
               positions_BT: Optional[jax.Array] = None) -> jax.Array:
    return self.forward_with_aux(tokens_BT, segment_ids_BT, positions_BT)[0]

  def forward_with_aux(self, tokens_BT: jax.Array, segment_ids_BT: Optional[jax.Array] = None,
                       positions_BT: Optional[jax.Array] = None):
    """-> (float32 logits_BTV, aux): aux maps router statistic names ('load' [L_moe, E],
    'dropped_fraction', 'z_loss', 'balance_loss' [L_moe]) to arrays over the MoE layers in depth
    order; {} for a dense model."""
    with sequence_parallelism(self.cfg.sequence_parallel):
      return self._forward(tokens_BT, segment_ids_BT, positions_BT)

  def _forward(self, tokens_BT, segment_ids_BT, positions_BT):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    with sequence_parallelism(False):
      # The lookup's rows first take the plain batch sharding, then (a local slice) the sequence
      # split: asked for the split directly, the SPMD partitioner replicates the whole lookup.
      x_BTD = shard_act(self.embed(tokens_BT), RESIDUAL)
    x_BTD = shard_act(x_BTD, RESIDUAL)

    if cfg.scan_layers:
      if hasattr(self, "dense_blocks"):
        x_BTD, _ = _scan_blocks(self.dense_blocks, cfg.remat, x_BTD, segment_ids_BT, positions_BT)
      # Pipelined when the mesh has stages, except when decoding (KV caches) or for a batch that
      # does not split into the pipeline microbatches (e.g. a short eval batch): there the plain
      # scan runs over the stage-sharded layers (same values, no schedule).
      stages = pipeline.active_stages()
      if (stages > 1 and not nnx.state(self.blocks, nnx.Cache)
          and B % (cfg.pipeline_microbatches or stages) == 0):
        x_BTD, aux = _pipeline_blocks(self.blocks, cfg, stages, x_BTD, segment_ids_BT,
                                      positions_BT)
        with use_rules(pipeline.head_rules()):  # the stages split the rows for the head
          return self._logits(x_BTD), aux
      else:
        x_BTD, aux = _scan_blocks(self.blocks, cfg.remat, x_BTD, segment_ids_BT, positions_BT)
    else:
      layer_aux = []
      for block in self.blocks:
        graphdef, state = nnx.split(block)
        x_BTD, block_aux, caches = _block_fn(graphdef, cfg.remat, in_scan=False)(
            x_BTD, state, segment_ids_BT, positions_BT)
        nnx.update(block, caches)
        if block_aux:
          layer_aux.append(block_aux)
      aux = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_aux) if layer_aux else {}
    return self._logits(x_BTD), aux

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BTD = self.final_norm(shard_act(x_BTD, RESIDUAL))
    if cfg.tie_embeddings:
      logits_BTV = self.embed.attend(x_BTD)
    else:
      logits_BTV = float32_logits(x_BTD, self.unembed[...], compute_dtype(cfg), vocab_axis=1)
    return shard_act(logits_BTV, ("batch", "seq", "vocab"))

  # -- Incremental decoding (sampling) --------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> None:
    """Gives every attention layer an empty KVCache of `max_len` slots; then call `decode`.

    Each cache gets the same leading (stacking) axes as its layer's parameters, so it is sliced
    along with them however the blocks are stacked (dense, MoE, groups of both).
    """
    cfg = self.cfg
    graphdef, empty = nnx.split(KVCache(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim,
                                        compute_dtype(cfg)))
    for _, module in nnx.iter_graph(self):
      if isinstance(module, Attention):
        lead = module.q_proj.shape[:-3]
        state = jax.tree.map(lambda x, lead=lead: jnp.broadcast_to(x, lead + x.shape), empty)
        module.cache = nnx.data(nnx.merge(graphdef, state))

  def rewind_cache(self, length) -> None:
    """Rolls every layer's KV cache back to its first `length` slots (see KVCache.rewind), e.g.
    to the prefix a chat's next turn shares with what the cache holds."""
    caches = [m for _, m in nnx.iter_graph(self) if isinstance(m, KVCache)]
    for cache in caches:
      cache.rewind(length)

  def decode(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array,
             positions_BT: jax.Array) -> jax.Array:
    """Logits of T new tokens given everything already in the KV cache, which they are appended to.

    Prefill passes the (left-padded) prompts, then each step one token per row. segment_ids_BT: 1
    for real tokens, 0 for padding; positions_BT: each row's own positions (RoPE). Equals
    `__call__` on the whole sequence so far, restricted to the new tokens: the same forward pass,
    whose attention layers read and extend their caches (see `_scan_blocks`).
    """
    return self.forward_with_aux(tokens_BT, segment_ids_BT, positions_BT)[0]


def _scan_blocks(stacked_blocks: nnx.Module, remat: str, x_BTD, segment_ids_BT, positions_BT):
  """Runs a stack of blocks (leading 'layers' axis) with one lax.scan; -> (x_BTD, stacked aux).
  KV caches the blocks extended (decoding) are written back into the stack."""
  graphdef, stacked = nnx.split(stacked_blocks)
  block_fn = _block_fn(graphdef, remat, in_scan=True)

  def body(carry_BTD, layer_state):
    carry_BTD, aux, caches = block_fn(carry_BTD, layer_state, segment_ids_BT, positions_BT)
    return carry_BTD, (aux, caches)

  x_BTD, (aux, caches) = jax.lax.scan(body, x_BTD, stacked)
  nnx.update(stacked_blocks, caches)
  return x_BTD, aux


def _pipeline_layer_fn(graphdef: nnx.GraphDef, remat: str):
  """pipeline.LayerFn of one block: (x, state_R, repeat, segment_ids, positions) -> (x, aux).

  The repeat's weights are selected inside the checkpoint, so the policy decides what a pipeline
  iteration keeps and the weights are never among it: 'none' saves everything except them, the
  others what remat.SAVED_NAMES lists."""
  def apply(x_BTD, state_R, repeat, segment_ids_BT, positions_BT):
    state = jax.tree.map(lambda w_R: pipeline.select_repeat(w_R, repeat), state_R)
    return nnx.merge(graphdef, state).forward_with_aux(x_BTD, segment_ids_BT, positions_BT)

  policy = (remat_lib.policy(remat) if remat != "none" else
            jax.checkpoint_policies.save_anything_except_these_names(pipeline.REPEAT_WEIGHTS))
  return jax.checkpoint(apply, policy=policy, prevent_cse=False)


def _pipeline_blocks(stacked_blocks: nnx.Module, cfg: ModelConfig, stages: int, x_BTD,
                     segment_ids_BT, positions_BT):
  """The block stack as an S-stage pipeline (model/pipeline.py); -> (x_BTD, stacked aux).

  MoE router statistics come back per pipeline microbatch and are merged into the whole batch's
  (moe.mean_over_microbatches), so the aux losses equal the plain scan's."""
  graphdef, stacked = nnx.split(stacked_blocks)
  num_micro = cfg.pipeline_microbatches or stages
  x_BTD, aux_LM = pipeline.run(_pipeline_layer_fn(graphdef, cfg.remat), stacked, nnx.get_partition_spec(stacked), x_BTD,
                               segment_ids_BT, positions_BT, stages=stages,
                               repeats=cfg.pipeline_repeats, num_micro=num_micro,
                               remat=cfg.remat != "none" and cfg.pipeline_stage_remat,
                               gather_once=cfg.pipeline_gather_once)
  return x_BTD, (mean_over_microbatches(aux_LM, cfg.experts_per_token) if aux_LM else {})


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, count: Optional[int] = None,
                    make=None) -> nnx.Module:
  """`count` (default num_layers) modules from `make(rngs)` (default a dense Block) as one module
  whose params have a leading 'layers' axis (own keys each)."""
  count = cfg.num_layers if count is None else count
  make = make or (lambda layer_rngs: Block(cfg, rngs=layer_rngs))

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make(layer_rngs)

  return create(rngs)


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count from the shapes alone (no allocation; e.g. for the planner).

  Counts nnx.Params; the sigmoid_bias router's selection bias (state, not trained) is not included.
  """
  return _count(cfg, active=False)


def count_active_params(cfg: ModelConfig) -> int:
  """Parameters one token's forward pass uses: each MoE layer contributes its router, its
  experts_per_token routed experts and the shared experts (equals count_params for dense models)."""
  return _count(cfg, active=True)


def _count(cfg: ModelConfig, active: bool) -> int:
  D, H, KV, K, F, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                       cfg.vocab_size)
  attention = D * H * K + 2 * D * KV * K + H * K * D
  norms = 2 * D
  Fe = expert_d_ff(cfg)
  experts_used = cfg.experts_per_token if active else cfg.num_experts
  moe = D * cfg.num_experts + experts_used * 3 * D * Fe + cfg.num_shared_experts * 3 * D * Fe
  n_moe = num_moe_layers(cfg)
  layers = cfg.num_layers * (attention + norms) + (cfg.num_layers - n_moe) * 3 * D * F + n_moe * moe
  embeddings = V * D * (1 if cfg.tie_embeddings else 2)
  return layers + embeddings + D  # + final norm


def _router_bias_paths(cfg: ModelConfig) -> list[tuple]:
  """Where the sigmoid_bias router's biases live in the params dict, in MoE-layer order (one
  stacked [L_moe, E] leaf with scan_layers, one [E] leaf per MoE layer without)."""
  if cfg.scan_layers:
    unit = ("blocks",) if cfg.moe_layer_interval == 1 else ("blocks", "moe")
    return [unit + ("moe", "router_bias")]
  return [("blocks", i, "moe", "router_bias") for i in range(cfg.num_layers)
          if is_moe_layer(cfg, i)]


def router_bias_LE(cfg: ModelConfig, params: dict) -> jax.Array:
  """The sigmoid_bias router's selection biases [L_moe, E] from a params dict."""
  leaves = []
  for path in _router_bias_paths(cfg):
    node = params
    for key in path:
      node = node[key]
    leaves.append(node if cfg.scan_layers else node[None])
  return jnp.concatenate(leaves, axis=0)


def replace_router_bias(cfg: ModelConfig, params: dict, bias_LE: jax.Array) -> dict:
  """A copy of `params` (dicts copied along the changed paths only) holding `bias_LE`."""
  def set_path(node, path, value):
    node = dict(node)
    node[path[0]] = value if len(path) == 1 else set_path(node[path[0]], path[1:], value)
    return node
  for i, path in enumerate(_router_bias_paths(cfg)):
    params = set_path(params, path, bias_LE if cfg.scan_layers else bias_LE[i])
  return params
