"""Mixture-of-Experts feed-forward: routers, dropless/capacity grouped experts, expert parallelism.

Computation (no per-expert loop, no one-hot einsum over all experts): every token's top-k
(token, expert) assignments are sorted by expert, the gathered rows go through the expert SwiGLU as
grouped matmuls (`jax.lax.ragged_dot`, one group per expert; on CPU, where jax lowers ragged_dot to
a dense matmul against every expert, a scan over expert-padded row tiles instead), and the outputs
are unsorted and summed with the routing weights. Capacity mode (`capacity_factor`) keeps at most
C = ceil(capacity_factor * tokens * k / E) assignments per expert, in global token order (token n's
slots before token n+1's), so drops are deterministic and identical with or without expert
parallelism; dropped assignments contribute nothing (the residual carries the token).

Expert parallelism: when the 'experts' logical axis maps to mesh axes of size > 1, the dispatch runs
inside `shard_map`: each device sorts its own tokens' assignments by destination device into a
fixed-size buffer per destination, one all-to-all delivers them to the devices that hold the
experts, the grouped matmuls run on the local experts, and a second all-to-all brings the results
back. Weight shards along 'embed' (fsdp) are all-gathered inside and 'mlp' (tensor) shards give
partial sums that are psum'ed, so EP composes with data/fsdp/tensor. The buffer per destination is
sized for the worst case (every local assignment to one device: tokens * k rows, or E_local * C in
capacity mode), which is exact but costs ep x the activation memory of the dispatch;
`ragged_all_to_all` would remove that and is the next step for large runs.

Routing math is float32. Aux outputs per layer: expert load (fraction of assignments per expert),
dropped fraction, router z-loss (ST-MoE) and load-balancing loss (Switch / HF Mixtral).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mai_jax import sharding as sharding_lib
from mai_jax.config import ModelConfig
from mai_jax.model.layers import MLP, compute_dtype, create_param

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map


class RouterBias(nnx.Variable):
  """The sigmoid_bias router's selection bias: model state, not a trainable parameter.

  It lives in the TrainState's params dict (so it is sharded and checkpointed with them), the model
  reads it through stop_gradient (its gradient is exactly zero), and the train step overwrites it
  after the optimizer update with `bias + rate * sign(mean load - load)` (DeepSeek-V3).
  """


def expert_d_ff(cfg: ModelConfig) -> int:
  return cfg.d_ff_expert or cfg.d_ff


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
  """Layer `layer` (0-based) is MoE: past the first dense layers, every moe_layer_interval-th."""
  if not cfg.num_experts or layer < cfg.first_dense_layers:
    return False
  return (layer - cfg.first_dense_layers + 1) % cfg.moe_layer_interval == 0


def num_moe_layers(cfg: ModelConfig) -> int:
  return sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))


def capacity(cfg: ModelConfig, num_tokens: int) -> Optional[int]:
  """Per-expert capacity for `num_tokens` routed together (None: dropless)."""
  if cfg.capacity_factor is None:
    return None
  return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.experts_per_token
                          / cfg.num_experts))


# ----------------------------------------------------------------------------------------------
# Routing


def route(logits_NE: jax.Array, k: int, router: str, bias_E: Optional[jax.Array] = None):
  """float32 router logits -> (experts_NK int32, weights_NK, probs_NE for the balance loss).

  softmax_topk (HF MixtralSparseMoeBlock): softmax over all experts, top-k, weights renormalized
  over the chosen k. sigmoid_bias (DeepSeek-V3): sigmoid scores; top-k of scores + bias (the bias
  only selects), weights are the chosen scores renormalized; probs are scores normalized over E.
  """
  if router == "softmax_topk":
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    top_NK, experts_NK = jax.lax.top_k(probs_NE, k)
  elif router == "sigmoid_bias":
    scores_NE = jax.nn.sigmoid(logits_NE)
    select_NE = scores_NE if bias_E is None else scores_NE + bias_E[None, :]
    _, experts_NK = jax.lax.top_k(select_NE, k)
    top_NK = jnp.take_along_axis(scores_NE, experts_NK, axis=-1)
    probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
  else:
    raise ValueError(f"model.router={router!r} is not 'softmax_topk' or 'sigmoid_bias'")
  weights_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  return experts_NK.astype(jnp.int32), weights_NK, probs_NE


def expert_counts(experts_NK: jax.Array, num_experts: int) -> jax.Array:
  """Assignments per expert (float32 [E]) by scatter-add, not a one-hot."""
  return jnp.zeros((num_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
  """ST-MoE: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


def load_balance_loss(probs_NE: jax.Array, counts_E: jax.Array) -> jax.Array:
  """Switch / HF Mixtral: E * sum_e (tokens choosing e / tokens) * mean router prob of e.

  Equals k when routing is perfectly balanced (HF's load_balancing_loss_func for one layer).
  """
  num_tokens, num_experts = probs_NE.shape
  return num_experts * jnp.sum(counts_E / num_tokens * jnp.mean(probs_NE, axis=0))


# ----------------------------------------------------------------------------------------------
# Grouped expert computation


# 'auto', 'ragged_dot' or 'tiled' (see _expert_ffn); a module setting so tests and benchmarks can
# compare the two on one backend.
EXPERT_FFN_IMPL = "auto"


def _expert_ffn(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD,
                impl: Optional[str] = None):
  """SwiGLU per expert group on expert-sorted rows (rows past sum(group_sizes) come out zero).

  impl 'ragged_dot': jax.lax.ragged_dot grouped matmuls (native grouped GEMMs on GPU/TPU).
  impl 'tiled': groups padded to tiles of rows, one scan over tiles, each tile one expert's
  matmuls; used on CPU, where jax lowers ragged_dot to a dense matmul against every expert
  followed by a mask (E times the FLOPs). 'auto' picks by backend.
  """
  impl = impl or EXPERT_FFN_IMPL
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl == "tiled":
    return _expert_ffn_tiled(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD)
  gate_MF = jax.lax.ragged_dot(x_MD, w_gate_EDF, group_sizes_E)
  up_MF = jax.lax.ragged_dot(x_MD, w_up_EDF, group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate_MF) * up_MF, w_down_EFD, group_sizes_E)


def _expert_ffn_tiled(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, tile: int = 128):
  """Grouped SwiGLU by tiles: each group is padded to a multiple of `tile` rows (at most
  M + E * (tile - 1) rows in all, a static bound), and a scan runs one [tile, D] x [D, F] matmul
  chain per tile with that tile's expert weights (dynamic index, no weight gather)."""
  M, D = x_MD.shape
  E = w_gate_EDF.shape[0]
  tile = max(1, min(tile, M))
  num_tiles = -(-(M + E * (tile - 1)) // tile)
  padded_E = -(-group_sizes_E // tile) * tile
  pad_end_E = jnp.cumsum(padded_E)
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  row_M = jnp.arange(M, dtype=jnp.int32)
  group_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), row_M, side="right")  # E: past the end
  valid_M = group_M < E
  group_M = jnp.minimum(group_M, E - 1)
  dest_M = jnp.where(valid_M, pad_end_E[group_M] - padded_E[group_M] + row_M - starts_E[group_M],
                     num_tiles * tile)
  x_RD = jnp.zeros((num_tiles * tile, D), x_MD.dtype).at[dest_M].set(x_MD, mode="drop")
  tile_expert = jnp.minimum(
      jnp.searchsorted(pad_end_E, jnp.arange(num_tiles, dtype=jnp.int32) * tile, side="right"),
      E - 1)

  def one_tile(args):
    x_bD, e = args
    gate_bF = x_bD @ w_gate_EDF[e]
    up_bF = x_bD @ w_up_EDF[e]
    return (jax.nn.silu(gate_bF) * up_bF) @ w_down_EFD[e]

  y_RD = jax.lax.map(one_tile, (x_RD.reshape(num_tiles, tile, D), tile_expert)).reshape(-1, D)
  y_MD = jnp.take(y_RD, jnp.minimum(dest_M, num_tiles * tile - 1), axis=0)
  return jnp.where(valid_M[:, None], y_MD, jnp.zeros((), y_MD.dtype))


def _sort_by(key_A: jax.Array, num_groups: int):
  """Stable sort of assignment keys: (order_A, group_sizes [num_groups]); keys >= num_groups go last
  and are counted in no group."""
  order_A = jnp.argsort(key_A, stable=True)
  sizes = jnp.zeros((num_groups + 1,), jnp.int32).at[jnp.minimum(key_A, num_groups)].add(1)
  return order_A, sizes[:num_groups]


def _keep_within_capacity(experts_A, num_experts: int, cap: Optional[int], offset_E=None):
  """Bool [A]: the assignment is among the first `cap` of its expert in assignment order (plus
  `offset_E` assignments of each expert that come earlier on other devices)."""
  if cap is None:
    return jnp.ones(experts_A.shape, bool)
  order_A, sizes_E = _sort_by(experts_A, num_experts)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  sorted_experts = experts_A[order_A]
  rank_sorted = jnp.arange(experts_A.shape[0], dtype=jnp.int32) - starts_E[sorted_experts]
  if offset_E is not None:
    rank_sorted = rank_sorted + offset_E[sorted_experts]
  return jnp.zeros(experts_A.shape, bool).at[order_A].set(rank_sorted < cap)


def _combine(out_A_D, weights_NK, keep_NK, dtype):
  """Weighted sum of each token's k expert outputs (float32 accumulation)."""
  N, K = weights_NK.shape
  w_NK = jnp.where(keep_NK, weights_NK, 0.0)
  out_NKD = out_A_D.reshape(N, K, -1).astype(jnp.float32)
  return jnp.einsum("nkd,nk->nd", out_NKD, w_NK).astype(dtype)


def moe_local(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD,
              cap: Optional[int]):
  """Single-program dispatch: sort assignments by expert, grouped matmuls, unsort, combine.
  Returns (y_ND, dropped assignment count)."""
  N, K = experts_NK.shape
  E = w_gate_EDF.shape[0]
  experts_A = experts_NK.reshape(-1)
  keep_A = _keep_within_capacity(experts_A, E, cap)
  order_A, sizes_E = _sort_by(jnp.where(keep_A, experts_A, E), E)
  x_AD = x_ND[order_A // K]
  out_sorted_AD = _expert_ffn(x_AD, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
  y_ND = _combine(out_sorted_AD[inverse_A], weights_NK, keep_A.reshape(N, K), x_ND.dtype)
  return y_ND, jnp.sum(~keep_A).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _EPLayout:
  """Mesh axes the expert-parallel dispatch uses, read from the active rules."""
  mesh: object
  batch_axes: tuple  # axes the token batch is sharded over
  expert_axes: tuple  # axes the experts dimension is sharded over (all-to-all)
  embed_axes: tuple  # axes the weights' embed dim is sharded over (all-gathered)
  mlp_axes: tuple  # axes the weights' mlp dim is sharded over (psum of partial outputs)
  w_in_spec: PartitionSpec
  w_out_spec: PartitionSpec
  x_spec: PartitionSpec

  @property
  def ep(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.expert_axes)


def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def ep_layout(batch: int, w_gate_shape, w_down_shape) -> Optional[_EPLayout]:
  """The EP layout under the active mesh and rules, or None when experts are not sharded."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = sharding_lib.active_rules()
  if rules is None or mesh is None or mesh.empty:
    return None
  w_in = sharding_lib.logical_to_spec(("experts", "embed", "mlp"), rules, mesh, w_gate_shape)
  if not _axes(w_in[0]):
    return None
  w_out = sharding_lib.logical_to_spec(("experts", "mlp", "embed"), rules, mesh, w_down_shape)
  x_spec = sharding_lib.logical_to_spec(("batch", None, None), rules, mesh, (batch, 1, 1))
  return _EPLayout(mesh=mesh, batch_axes=_axes(x_spec[0]), expert_axes=_axes(w_in[0]),
                   embed_axes=_axes(w_in[1]), mlp_axes=_axes(w_in[2]), w_in_spec=w_in,
                   w_out_spec=w_out, x_spec=x_spec)


def moe_expert_parallel(layout: _EPLayout, x_BTD, experts_BTK, weights_BTK, w_gate_EDF, w_up_EDF,
                        w_down_EFD, cap: Optional[int]):
  """Expert-parallel dispatch (see the module docstring). Returns (y_BTD, dropped count)."""
  ep, K = layout.ep, experts_BTK.shape[-1]
  E = w_gate_EDF.shape[0]
  E_loc = E // ep
  batch_spec = PartitionSpec(layout.x_spec[0])

  def body(x_BTD, experts_BTK, weights_BTK, w_gate, w_up, w_down):
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    experts_A = experts_BTK.reshape(-1)
    A = experts_A.shape[0]
    if layout.embed_axes:  # fsdp: gather the weights' embed dim
      w_gate = jax.lax.all_gather(w_gate, layout.embed_axes, axis=1, tiled=True)
      w_up = jax.lax.all_gather(w_up, layout.embed_axes, axis=1, tiled=True)
      w_down = jax.lax.all_gather(w_down, layout.embed_axes, axis=2, tiled=True)

    offset_E = None
    if cap is not None and layout.batch_axes:
      # Assignments of each expert on earlier batch shards come first in global token order.
      counts_SE = jax.lax.all_gather(expert_counts(experts_A, E), layout.batch_axes, tiled=False)
      me = jax.lax.axis_index(layout.batch_axes)
      earlier_S = jnp.arange(counts_SE.shape[0]) < me
      offset_E = jnp.sum(jnp.where(earlier_S[:, None], counts_SE, 0.0), axis=0).astype(jnp.int32)
    keep_A = _keep_within_capacity(experts_A, E, cap, offset_E)

    # Send buffer: row r of destination d holds the r-th kept assignment bound for device d.
    M = A if cap is None else min(A, E_loc * cap)
    dest_A = jnp.where(keep_A, experts_A // E_loc, ep)
    order_A, dest_sizes = _sort_by(dest_A, ep)
    dest_sorted = dest_A[order_A]
    starts = jnp.cumsum(dest_sizes) - dest_sizes
    rank_sorted = jnp.arange(A, dtype=jnp.int32) - starts[jnp.minimum(dest_sorted, ep - 1)]
    send_x = jnp.zeros((ep, M, D), x_ND.dtype).at[dest_sorted, rank_sorted].set(
        x_ND[order_A // K], mode="drop")
    send_e = jnp.full((ep, M), E_loc, jnp.int32).at[dest_sorted, rank_sorted].set(
        experts_A[order_A] % E_loc, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, layout.expert_axes, 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, layout.expert_axes, 0, 0, tiled=True)

    # Local experts: sort received rows by local expert (empty slots last), grouped matmuls.
    recv_order, local_sizes = _sort_by(recv_e.reshape(-1), E_loc)
    out_sorted = _expert_ffn(recv_x.reshape(ep * M, D)[recv_order], local_sizes, w_gate, w_up,
                             w_down)
    if layout.mlp_axes:  # tensor: each shard holds a partial sum over its slice of d_ff
      out_sorted = jax.lax.psum(out_sorted, layout.mlp_axes)
    out = jnp.zeros_like(out_sorted).at[recv_order].set(out_sorted).reshape(ep, M, D)
    back = jax.lax.all_to_all(out, layout.expert_axes, 0, 0, tiled=True)

    out_sorted_AD = back[jnp.minimum(dest_sorted, ep - 1), jnp.minimum(rank_sorted, M - 1)]
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(A))
    y_ND = _combine(out_sorted_AD[inverse_A], weights_BTK.reshape(B * T, K),
                    keep_A.reshape(B * T, K), x_ND.dtype)
    dropped = jnp.sum(~keep_A).astype(jnp.float32)[None]
    return y_ND.reshape(B, T, D), dropped

  fn = _shard_map(body, mesh=layout.mesh,
                  in_specs=(layout.x_spec, layout.x_spec, layout.x_spec, layout.w_in_spec,
                            layout.w_in_spec, layout.w_out_spec),
                  out_specs=(layout.x_spec, batch_spec))
  y_BTD, dropped_S = fn(x_BTD, experts_BTK, weights_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
  return y_BTD, jnp.sum(dropped_S)


# ----------------------------------------------------------------------------------------------
# The layer


class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional shared experts); __call__ -> (y_BTD, aux dict of arrays).

  Params: router [embed, experts] (float32 math), gate_proj / up_proj [experts, embed, mlp],
  down_proj [experts, mlp, embed], optional `shared` (an MLP of d_ff = num_shared_experts *
  d_ff_expert) and, for the sigmoid_bias router, `router_bias` [experts] (a RouterBias, not a Param).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    E, D, F = cfg.num_experts, cfg.d_model, expert_d_ff(cfg)
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
    p = cfg.param_dtype
    self.router = create_param(rngs, init, (D, E), ("embed", "experts"), p)  # w_DE
    self.gate_proj = create_param(rngs, init, (E, D, F), ("experts", "embed", "mlp"), p)
    self.up_proj = create_param(rngs, init, (E, D, F), ("experts", "embed", "mlp"), p)
    self.down_proj = create_param(rngs, out_init, (E, F, D), ("experts", "mlp", "embed"), p)
    if cfg.num_shared_experts:
      self.shared = MLP(dataclasses.replace(cfg, d_ff=cfg.num_shared_experts * F), rngs=rngs)
    if cfg.router == "sigmoid_bias":
      zeros = nnx.with_partitioning(nnx.initializers.zeros, ("experts",), eager_sharding=False)
      self.router_bias = RouterBias(zeros(rngs.params(), (E,), jnp.float32))
    self.cfg = cfg
    self.dtype = compute_dtype(cfg)

  def __call__(self, x_BTD: jax.Array):
    cfg, dt = self.cfg, self.dtype
    B, T, D = x_BTD.shape
    E, K = cfg.num_experts, cfg.experts_per_token
    logits_NE = jnp.dot(x_BTD.reshape(B * T, D).astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    bias_E = None
    if cfg.router == "sigmoid_bias":
      bias_E = jax.lax.stop_gradient(self.router_bias[...])
    experts_NK, weights_NK, probs_NE = route(logits_NE, K, cfg.router, bias_E)
    cap = capacity(cfg, B * T)
    w_gate, w_up, w_down = (self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt),
                            self.down_proj[...].astype(dt))
    x_BTD = x_BTD.astype(dt)
    layout = ep_layout(B, w_gate.shape, w_down.shape)
    if layout is None:
      y_ND, dropped = moe_local(x_BTD.reshape(B * T, D), experts_NK, weights_NK, w_gate, w_up,
                                w_down, cap)
      y_BTD = y_ND.reshape(B, T, D)
    else:
      y_BTD, dropped = moe_expert_parallel(layout, x_BTD, experts_NK.reshape(B, T, K),
                                           weights_NK.reshape(B, T, K), w_gate, w_up, w_down,
                                           cap)
    if cfg.num_shared_experts:
      y_BTD = y_BTD + self.shared(x_BTD)
    counts_E = expert_counts(experts_NK, E)
    aux = {
        "load": counts_E / (B * T * K),
        "dropped_fraction": dropped / (B * T * K),
        "z_loss": router_z_loss(logits_NE),
        "balance_loss": load_balance_loss(probs_NE, counts_E),
    }
    return y_BTD, aux


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's aux-loss-free balancing: raise under-loaded experts' bias, lower over-loaded."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)
