"""Hierarchical expert-parallel exchange (model.expert_devices_per_node; DeepSeek-V3).

The flat dispatch (model/moe.py) sends one row per (token, expert) assignment straight to the
expert's device, so a token whose top-k experts sit on three devices of one remote node crosses the
inter-node link three times. Here the 'expert' mesh axis (ep positions) is viewed as ep / n nodes
x n devices per node, position = node x n + local (the mesh's axis order keeps consecutive
'expert' positions on one node: sharding.make_mesh), and the exchange runs in two fixed-capacity
all-to-alls:

  inter: device (i, l) sends each token ONCE to every node j holding one of its kept experts, to
         device (j, l) (same local index; replica groups {(0, l), (1, l), ...}), with a small
         table of where its assignments go inside node j (and their routing weights);
  intra: device (j, l) fans the rows out over the node to the devices (j, l') holding the
         experts (replica groups {(j, 0), ..., (j, n - 1)}).

What arrives is exactly the buffer the flat all-to-all delivers ([ep sources, rows, D], the same
(source, position) layout), so the expert computation, the capacity slots and the drop decisions
are the flat path's, made at the source before anything moves. The combine is the reverse: the
intra all-to-all brings each assignment's expert output back to (j, l), which sums the weighted
outputs of each token's experts on node j (a partial combine), and the inter all-to-all returns one
partial sum per (token, node), summed at the source (float32 accumulation; the partial sums travel
in the compute dtype, like the flat combine's rows).

Buffer sizes (static, so nothing kept can overflow: the drops are the flat path's exactly): the
inter buffer has R = min(N, n x rows) rows per destination node for N local tokens and `rows` per
(source, destination device) in the flat layout (a token goes to a node at most once, and at most
n x rows kept assignments of this device go to one node), i.e. ep / n x R rows against the flat
ep x rows; the intra buffer is [n, ep / n, rows], the flat buffer's size, over the fast links.
Fixed-capacity `all_to_all`, not `ragged_all_to_all` (slow on GPU today, openxla/xla#33386); the
groups are `axis_index_groups` of the expert axes, so one shard_map over the model's mesh serves
both stages.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mai_jax.model import fp8_dispatch


@dataclasses.dataclass(frozen=True)
class NodeSplit:
  """The expert axes (ep positions) as `nodes` x `per_node` devices, position = node x per_node +
  local."""
  axes: tuple
  nodes: int
  per_node: int

  @property
  def inter_groups(self) -> list:
    """One group per local index: the devices with that index on every node."""
    return [[j * self.per_node + l for j in range(self.nodes)] for l in range(self.per_node)]

  @property
  def intra_groups(self) -> list:
    """One group per node: its devices."""
    return [[j * self.per_node + l for l in range(self.per_node)] for j in range(self.nodes)]

  def inter(self, x):
    return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True, axis_index_groups=self.inter_groups)

  def intra(self, x):
    return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True, axis_index_groups=self.intra_groups)


def node_split(expert_axes: tuple, ep: int, per_node: int) -> Optional[NodeSplit]:
  """model.expert_devices_per_node over an expert axis of ep devices: None (flat) for 0 or when the
  experts are not sharded; a NodeSplit when 1 < per_node < ep divides ep (config-checked, so
  anything else is a mesh the config did not see, e.g. a model built for another run)."""
  if not per_node or ep <= 1:
    return None
  if not 1 < per_node < ep or ep % per_node:
    raise ValueError(f"model.expert_devices_per_node={per_node} must be 0 or in (1, {ep}) and "
                     f"divide the {ep} expert-parallel devices of this mesh")
  return NodeSplit(axes=tuple(expert_axes), nodes=ep // per_node, per_node=per_node)


def exchange(split: NodeSplit, x_ND: jax.Array, dest_A: jax.Array, pos_A: jax.Array,
             keep_A: jax.Array, weights_NK: jax.Array, rows: int, experts: Callable,
             payload_A: Optional[jax.Array] = None, payload_fill: int = 0,
             dispatch_dtype: str = "compute") -> jax.Array:
  """Hierarchical dispatch -> experts -> combine of one device's N tokens; returns y_ND.

  Assignment a = token a // K, k = a % K goes to expert-axis device dest_A[a] at position
  pos_A[a] of that device's `rows`-row buffer for this source (the flat layout), if keep_A[a].
  experts(recv_PRD [ep, rows, D], recv_payload [ep, rows] or None) -> outputs [ep, rows, D], the
  flat path's local expert computation; payload_A (int, e.g. the local expert of a dropless
  assignment) arrives beside its row, payload_fill in empty positions. y_ND = sum_k kept
  weights_NK x expert output, as the flat combine."""
  N, D = x_ND.shape
  K = weights_NK.shape[-1]
  J, L = split.nodes, split.per_node
  R = min(N, L * rows)
  keep_NK = keep_A.reshape(N, K)
  node_NK = jnp.where(keep_NK, dest_A.reshape(N, K) // L, J)  # J: not sent
  # Slot q of (token, node) in the inter buffer: the token's rank among this device's tokens bound
  # for that node, in token order.
  hit_NJ = jnp.any(node_NK[:, :, None] == jnp.arange(J)[None, None, :], axis=1)
  q_NJ = jnp.cumsum(hit_NJ, axis=0, dtype=jnp.int32) - 1
  token_N = jnp.arange(N, dtype=jnp.int32)
  node_J = jnp.arange(J, dtype=jnp.int32)
  tok_JR = jnp.full((J, R), N, jnp.int32).at[
      jnp.broadcast_to(node_J, (N, J)), jnp.where(hit_NJ, q_NJ, R)].set(
          jnp.broadcast_to(token_N[:, None], (N, J)), mode="drop")
  # Per (node, slot, k): where assignment k of that slot's token goes inside the node
  # (local device x rows + position; -1: elsewhere or dropped), its payload and weight.
  q_NK = jnp.take_along_axis(q_NJ, jnp.minimum(node_NK, J - 1), axis=1)
  at = (node_NK, jnp.where(keep_NK, q_NK, R), jnp.broadcast_to(jnp.arange(K), (N, K)))
  code_NK = (dest_A.reshape(N, K) % L) * rows + pos_A.reshape(N, K)
  code_JRK = jnp.full((J, R, K), -1, jnp.int32).at[at].set(code_NK, mode="drop")
  weight_JRK = jnp.zeros((J, R, K), weights_NK.dtype).at[at].set(weights_NK, mode="drop")
  if payload_A is not None:
    payload_JRK = jnp.zeros((J, R, K), jnp.int32).at[at].set(payload_A.reshape(N, K), mode="drop")
    code_JRK = jnp.stack([code_JRK, payload_JRK], axis=-1)
  code_IRK = split.inter(code_JRK)  # from now on on device (j, l): index i = source node
  weight_IRK = split.inter(weight_JRK)
  if payload_A is not None:
    code_IRK, payload_IRK = code_IRK[..., 0], code_IRK[..., 1]

  # Intra buffer [L destinations, I sources, rows]: which received inter row fills each position.
  valid_IRK = code_IRK >= 0
  local_IRK = jnp.where(valid_IRK, code_IRK // rows, L)  # L: not sent
  pos_IRK = code_IRK % rows
  src_I = jnp.arange(J, dtype=jnp.int32)[:, None, None]
  slot_IRK = jnp.broadcast_to(src_I * R + jnp.arange(R, dtype=jnp.int32)[None, :, None],
                              code_IRK.shape)
  at = (local_IRK, jnp.broadcast_to(src_I, code_IRK.shape), pos_IRK)
  from_LIr = jnp.full((L, J, rows), J * R, jnp.int32).at[at].set(slot_IRK, mode="drop")
  to_flat = lambda y: y.transpose((1, 0) + tuple(range(2, y.ndim))).reshape((J * L,) + y.shape[2:])

  def move(rows_NP, tok_JR, from_LIr):
    inter_JRP = split.inter(jnp.take(rows_NP, tok_JR, axis=0, mode="fill", fill_value=0))
    send_LIrP = jnp.take(inter_JRP.reshape(J * R, -1), from_LIr, axis=0, mode="fill",
                         fill_value=0)
    return to_flat(split.intra(send_LIrP))  # [l source local, i, rows] -> [i x L + l, rows]

  recv_x = fp8_dispatch.dispatch(move, x_ND, tok_JR, from_LIr, dtype=dispatch_dtype)
  recv_payload = None
  if payload_A is not None:
    send_p = jnp.full((L, J, rows), payload_fill, jnp.int32).at[at].set(payload_IRK, mode="drop")
    recv_payload = to_flat(split.intra(send_p))
  out_SrD = experts(recv_x, recv_payload)

  # Combine: outputs back to (j, l) in the intra send layout, weighted partial sums per
  # (source node, slot), back over the inter link, summed per token.
  back_LIrD = split.intra(out_SrD.reshape(J, L, rows, D).transpose(1, 0, 2, 3))
  w_LIr = jnp.zeros((L, J, rows), jnp.float32).at[at].set(weight_IRK.astype(jnp.float32),
                                                          mode="drop")
  partial_IRD = jnp.zeros((J * R, D), jnp.float32).at[from_LIr.reshape(-1)].add(
      (back_LIrD.astype(jnp.float32) * w_LIr[..., None]).reshape(-1, D), mode="drop")
  home_JRD = split.inter(partial_IRD.astype(x_ND.dtype).reshape(J, R, D))
  y_ND = jnp.zeros((N, D), jnp.float32).at[tok_JR.reshape(-1)].add(
      home_JRD.reshape(-1, D).astype(jnp.float32), mode="drop")
  return y_ND.astype(x_ND.dtype)
