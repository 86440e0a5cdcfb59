"""Pipeline parallelism: a stack of blocks run as S stages over the 'stage' mesh axis.

One SPMD program, no per-stage programs: every stacked-block weight [L, ...] is viewed as
[S, Lc, R, ...] (R repeats, S stages, Lc = L / (R S) layers per virtual stage) with the S axis on
the 'stage' mesh axis, so device row s holds the layers of virtual stages s, S + s, 2S + s, ...
(R = 1 is GPipe; R > 1 the circular / interleaved schedule). A batch is cut into M pipeline
microbatches; one `lax.scan` runs N = R M + S - 1 iterations, and in each iteration every stage
applies its Lc layers (vmapped over the stage axis, sharded on 'stage') to its current input, then
the outputs move one stage on with one collective-permute (`shift_to_next_stage`). Stage s at
iteration t works on item i = t - s (repeat i // M, microbatch i % M); the (S - 1) iterations
where it has none are the bubble, (S-1)/(R M + S - 1) of the time.

The outputs of the last stage arrive at stage 0 through the same shift and wait in `inbox`
[S, M, ...] (only row 0 is used; it starts as the embedded microbatches) until that microbatch's
next repeat, M - S + 1 iterations later; after the last repeat it holds the stack's output.

Parameters keep their canonical [L, ...] layout (checkpoints do not depend on S or R): with
R = 1 the view is a free reshape of the contiguous 'stage' shards; with R > 1 a device's layers
are not contiguous in [L], so each step moves the weights into the [S, Lc, R] view with one
all_to_all over 'stage' (and the gradients back with its transpose; `_regroup_for_repeats`).
Each layer function gets its layer's weights of every repeat [R, ...] and selects the current
repeat's itself (`select_repeat`), inside its own checkpoint: so an iteration's residuals never
include a per-iteration copy of the weights.

Per-layer statistics (the MoE router's) are collected per (stage, repeat, microbatch) outside the
bubble and returned as [L, M, ...] for the caller to merge. FSDP inside a stage: with gather_once
(model.pipeline_gather_once) the [S, Lc, R] views are whole along the FSDP axes, so the weights are
gathered once per step instead of in every iteration (see `stage_view`).

With remat on (model.pipeline_stage_remat and a model remat policy), each iteration's stage
computation is checkpointed: the scan saves only the stage inputs [S, Bm, T, D] per iteration, and
the backward pass recomputes the stage (whose layers use the model's own remat policy inside).
Without it the layers' own policy decides what every iteration keeps (remat 'dots': the
projection outputs; 'none': everything): no second stage forward, at that memory per iteration.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from mai_jax.sharding import RESIDUAL_SEQ, active_rules, logical_to_spec, shard_act, use_rules

# Logical axes of the pipeline buffers: 'layers' maps to the 'stage' mesh axis in the rules. The
# activations are the residual stream (split over 'tensor' with model.sequence_parallel, so each
# tensor rank sends 1/t of them to the next stage, as Megatron-LM's scatter/gather of p2p sends);
# the segment ids and positions keep the sequence whole (attention reads all of it).
STAGE_ACT = ("layers", "batch", RESIDUAL_SEQ, "embed")
STAGE_IDS = ("layers", "batch", "seq")

# (x_BTD, layer_state_R, repeat, segment_ids_BT, positions_BT) -> (x_BTD, aux): layer_state_R's
# leaves are the layer's weights in every repeat [R, ...]; the function selects `repeat`'s with
# select_repeat inside its checkpoint (the weights tagged REPEAT_WEIGHTS are never saved).
LayerFn = Callable
# checkpoint_name of the repeat's weights picked by select_repeat: a remat policy that saves
# everything else still recomputes them (from the loop-invariant [R, ...] weights).
REPEAT_WEIGHTS = "pipeline_repeat_weights"


def active_stages() -> int:
  """Size of the 'stage' axis of the mesh being traced under (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "stage" not in mesh.axis_names:
    return 1
  return mesh.shape["stage"]


def head_rules() -> tuple:
  """The active rules with 'batch' also over 'stage': after the schedule the stages split the
  rows between them for the output layer and the loss (model/transformer.py), instead of each
  stage scoring the whole batch (S times the head's FLOPs and float32 logits). 'stage' comes last,
  so a batch the stages do not divide keeps the plain batch sharding."""
  return tuple((name, tuple(axes) + ("stage",) if name == "batch" else axes)
               for name, axes in active_rules())


def bubble_fraction(stages: int, repeats: int, microbatches: int) -> float:
  """Fraction of the iterations a stage idles: (S - 1) / (R M + S - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def split_microbatches(x_B: jax.Array, num_micro: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], rows i M + m into microbatch m (each microbatch stays spread over
  the devices the batch is sharded on, as in train/step.py's gradient accumulation)."""
  x = x_B.reshape(x_B.shape[0] // num_micro, num_micro, *x_B.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def merge_microbatches(x_M: jax.Array) -> jax.Array:
  """Inverse of split_microbatches: [M, B/M, ...] -> [B, ...]."""
  x = jnp.swapaxes(x_M, 0, 1)
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def stage_view(w_L, logical: PartitionSpec, stages: int, repeats: int,
               gather_once: bool = False):
  """Canonical [L, ...] weight -> [S, Lc, R, ...] with S on 'stage', other dims as their rules.

  gather_once: the view is also whole along the FSDP axes (those the 'embed' rule maps to), so
  the weights are all-gathered once per step, before the iteration scan, instead of inside every
  iteration (once per microbatch); their gradients are then summed over the iterations locally
  and reduce-scattered once. Costs the stage's weights unsharded over fsdp in memory.
  """
  rest = tuple(logical)[1:] + (None,) * (w_L.ndim - len(tuple(logical)))
  if repeats > 1:
    w = _regroup_for_repeats(w_L, ("layers",) + rest, stages, repeats)
  else:
    w = w_L.reshape(stages, w_L.shape[0] // stages, 1, *w_L.shape[1:])
  view = ("layers", None, None) + rest
  if not gather_once:
    return shard_act(w, view)
  return jax.lax.with_sharding_constraint(
      w, logical_to_spec(view, _gathered_rules(), jax.sharding.get_abstract_mesh(), w.shape))


def _gathered_rules() -> tuple:
  """The active rules with 'embed' (the FSDP dimension of the weights) mapped to no axis: what
  the layers see inside a gather_once pipeline, so e.g. the MoE dispatch takes its expert
  weights whole along embed instead of re-gathering them per iteration."""
  return tuple((name, () if name == "embed" else axes) for name, axes in active_rules())


def _regroup_tables(stages: int, repeats: int):
  """Static routing of layer groups for `_regroup_for_repeats`.

  Groups of Lc layers: g = s R + q is device s's q-th group in the canonical layout and belongs
  to virtual stage g (repeat g // S) on device g % S. Device s sends its groups for device d in
  slots c = 0, 1, ... of block d (at most C = ceil(R / S) each; the rest is padding), and device
  d takes repeat r's group (g = r S + d, from device g // R, slot of q = g % R) from the
  received blocks. -> send_q [S, S, C] (group index per (source, destination, slot)),
  recv_src [S, R], recv_slot [S, R] (per destination and repeat).
  """
  C = -(-repeats // stages)
  send_q = np.zeros((stages, stages, C), np.int32)
  slot_of = {}
  for s in range(stages):
    fill = [0] * stages
    for q in range(repeats):
      d = (s * repeats + q) % stages
      send_q[s, d, fill[d]] = q
      slot_of[s, q] = fill[d]
      fill[d] += 1
  recv_src = np.zeros((stages, repeats), np.int32)
  recv_slot = np.zeros((stages, repeats), np.int32)
  for d in range(stages):
    for r in range(repeats):
      g = r * stages + d
      recv_src[d, r], recv_slot[d, r] = g // repeats, slot_of[g // repeats, g % repeats]
  return send_q, recv_src, recv_slot


def _pick(onehot_KN: jax.Array, x_N: jax.Array) -> jax.Array:
  """[K, N] one-hot, [N, ...] -> [K, ...]: row k is x_N[n] where onehot_KN[k, n].

  Selects and exact adds of zeros, not a gather: a gather with a per-device index makes the
  partitioner replicate the weights over the automatic axes (fsdp, tensor) first.
  """
  shape = onehot_KN.shape[:1] + (1,) * (x_N.ndim - 1)
  out = jnp.zeros(onehot_KN.shape[:1] + x_N.shape[1:], x_N.dtype)
  for n in range(x_N.shape[0]):
    out = out + jnp.where(onehot_KN[:, n].reshape(shape), x_N[n][None], 0)
  return out


def _regroup_for_repeats(w_L: jax.Array, logical: tuple, stages: int, repeats: int):
  """[L, ...] (contiguous 'stage' shards) -> [S, Lc, R, ...] with S on 'stage'.

  With R > 1 a device's canonical shard holds other devices' virtual stages; left to the SPMD
  partitioner, the reshape all-gathers every weight over 'stage' (each device would briefly
  hold all stages' weights). One all_to_all of each device's own R groups instead moves
  (S - 1) / S of them, the least this layout change needs. The shard_map is manual over every
  axis, so the fsdp/tensor shards move as they are (nothing is gathered).
  """
  send_q, recv_src, recv_slot = _regroup_tables(stages, repeats)
  C = send_q.shape[-1]
  # One-hot routing per device: send_SKR[s, d C + c, q] and recv_SRK[s, r, src C + c].
  send_SKR = jnp.asarray(send_q.reshape(stages, -1)[..., None] == np.arange(repeats))
  recv_SRK = jnp.asarray((recv_src * C + recv_slot)[..., None] == np.arange(stages * C))
  mesh = jax.sharding.get_abstract_mesh()
  spec = logical_to_spec(logical, active_rules(), mesh, w_L.shape)
  if spec[0] != "stage":
    raise ValueError(f"pipeline: stacked weight {w_L.shape} is not sharded over 'stage' "
                     f"({spec}); mesh.rules must map 'layers' to 'stage'")

  def body(w_local):  # [R Lc, ...]: this device's canonical layers
    s = jax.lax.axis_index("stage")
    groups = w_local.reshape(repeats, -1, *w_local.shape[1:])  # [R, Lc, ...]
    send = _pick(send_SKR[s], groups)  # [S C, Lc, ...], block d for device d
    recv = jax.lax.all_to_all(send, "stage", 0, 0, tiled=True)  # [S C (from, slot), Lc, ...]
    mine = _pick(recv_SRK[s], recv)  # [R, Lc, ...]: my virtual stages, by repeat
    return jnp.swapaxes(mine, 0, 1)[None]  # [1, Lc, R, ...]

  return jax.shard_map(body, mesh=mesh, in_specs=spec,
                       out_specs=PartitionSpec("stage", None, None, *tuple(spec)[1:]))(w_L)


def select_repeat(w_R: jax.Array, repeat: jax.Array) -> jax.Array:
  """[R, ...] -> [...]: the weights of repeat `repeat` (a traced scalar), tagged REPEAT_WEIGHTS.

  By selects, not a gather: a gather indexed per stage makes the partitioner all-gather the
  weights over fsdp and tensor first."""
  out = w_R[0]
  for r in range(1, w_R.shape[0]):
    out = jnp.where(repeat == r, w_R[r], out)
  return checkpoint_name(out, REPEAT_WEIGHTS)


def shift_to_next_stage(y_S: jax.Array) -> jax.Array:
  """[S, ...] stage-sharded -> row s moved to row s + 1 (the last to row 0): one
  collective-permute, as jax.lax.ppermute in a shard_map that is manual over 'stage' only (the
  other axes stay automatic, so fsdp/tensor sharding inside a stage is untouched).

  A jnp.roll of the stage-sharded buffer gives the same numbers and also lowers to
  collective-permutes; on 8 CPU devices it compiled ~6% slower and emitted one more
  collective-permute, so the explicit ppermute is used.
  """
  mesh = jax.sharding.get_abstract_mesh()
  stages = mesh.shape["stage"]
  ring = [(s, (s + 1) % stages) for s in range(stages)]
  return jax.shard_map(lambda y: jax.lax.ppermute(y, "stage", ring), mesh=mesh,
                       in_specs=PartitionSpec("stage"), out_specs=PartitionSpec("stage"),
                       axis_names={"stage"})(y_S)


def run(layer_fn: LayerFn, stacked_state, logical_specs, x_BTD: jax.Array,
        segment_ids_BT: Optional[jax.Array], positions_BT: jax.Array, *, stages: int,
        repeats: int, num_micro: int, remat: bool, gather_once: bool = False):
  """Applies the L stacked layers to x_BTD as an S-stage pipeline; equals a plain scan over them.

  stacked_state: the stack's nnx.State (leaves [L, ...]); logical_specs: its logical
  PartitionSpecs (nnx.get_partition_spec), leaf for leaf. layer_fn returns (x_BTD, aux), aux a
  pytree of per-layer statistics ({} for dense blocks). -> (x_BTD, aux_LM): each aux leaf gains
  leading [L, M] axes (canonical layer order, pipeline microbatch), for the caller to merge.
  gather_once: see `stage_view`. remat: checkpoint each iteration's stage as a whole (see the
  module docstring).
  """
  S, R, M = stages, repeats, num_micro
  B, T, D = x_BTD.shape
  if B % M:
    raise ValueError(f"pipeline: batch {B} rows do not split into {M} pipeline microbatches")
  leaves, treedef = jax.tree.flatten(stacked_state)
  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  weights_SLR = [stage_view(w, spec, S, R, gather_once) for w, spec in zip(leaves, specs)]

  x_MbTD = shard_act(split_microbatches(x_BTD, M), (None,) + STAGE_ACT[1:])
  seg_MbT = None if segment_ids_BT is None else split_microbatches(segment_ids_BT, M)
  pos_MbT = split_microbatches(positions_BT, M)

  def one_stage(w_LcR, repeat, x_bTD, seg_bT, pos_bT):
    def body(carry_bTD, layer_leaves_R):
      return layer_fn(carry_bTD, jax.tree.unflatten(treedef, layer_leaves_R), repeat, seg_bT,
                      pos_bT)
    return jax.lax.scan(body, x_bTD, w_LcR)

  def all_stages(weights_SLR, repeat_S, x_SbTD, seg_SbT, pos_SbT):
    return jax.vmap(one_stage, spmd_axis_name="stage")(weights_SLR, repeat_S, x_SbTD, seg_SbT,
                                                       pos_SbT)

  if remat:
    all_stages = jax.checkpoint(all_stages, policy=jax.checkpoint_policies.nothing_saveable,
                                prevent_cse=False)
  lc = leaves[0].shape[0] // (S * R)
  with use_rules(_gathered_rules() if gather_once else active_rules()):
    return _schedule(one_stage, all_stages, weights_SLR, x_MbTD, seg_MbT, pos_MbT, lc, S, R, M)


def _schedule(one_stage, all_stages, weights_SLR, x_MbTD, seg_MbT, pos_MbT, lc, S, R, M):
  """The iteration scan of `run` (see the module docstring); -> (x_BTD, aux_LM)."""
  stage_S = jnp.arange(S)
  aux_shapes = jax.eval_shape(
      lambda w, x: one_stage(w, jnp.int32(0), x, None if seg_MbT is None else seg_MbT[0],
                             pos_MbT[0])[1],
      [jax.ShapeDtypeStruct(w.shape[1:], w.dtype) for w in weights_SLR],
      jax.ShapeDtypeStruct(x_MbTD.shape[1:], x_MbTD.dtype))
  # aux of stage s, repeat r, microbatch m in aux_SRM[s, r, m] ([S, R, M, Lc, ...], tiny).
  aux0 = jax.tree.map(lambda a: jnp.zeros((S, R, M) + a.shape, a.dtype), aux_shapes)

  def iteration(carry, t):
    x_SbTD, inbox_SMbTD, aux_SRM = carry
    item_S = t - stage_S
    micro_S = jnp.mod(item_S, M)
    # Stage 0 takes its microbatch from the inbox (embedded input, or the last stage's output of
    # the previous repeat); the others take what the previous stage just passed on.
    first_SbTD = jax.lax.dynamic_index_in_dim(inbox_SMbTD, jnp.mod(t, M), axis=1, keepdims=False)
    x_SbTD = jnp.where((stage_S == 0)[:, None, None, None], first_SbTD, x_SbTD)
    repeat_S = jnp.clip(item_S // M, 0, R - 1)
    seg_SbT = None if seg_MbT is None else shard_act(seg_MbT[micro_S], STAGE_IDS)
    pos_SbT = shard_act(pos_MbT[micro_S], STAGE_IDS)
    y_SbTD, aux_S = all_stages(weights_SLR, repeat_S, x_SbTD, seg_SbT, pos_SbT)
    # A stage's statistics count only when it worked on a real item (not in the bubble).
    slot_SRM = ((repeat_S[:, None, None] == jnp.arange(R)[None, :, None])
                & (micro_S[:, None, None] == jnp.arange(M)[None, None, :])
                & ((item_S >= 0) & (item_S < R * M))[:, None, None])
    aux_SRM = jax.tree.map(
        lambda acc, a: jnp.where(slot_SRM.reshape(slot_SRM.shape + (1,) * (a.ndim - 1)),
                                 a[:, None, None], acc), aux_SRM, aux_S)
    # Pass every stage's output to the next stage (collective-permute over 'stage').
    x_SbTD = shard_act(shift_to_next_stage(y_SbTD), STAGE_ACT)
    # Row 0 now holds the last stage's output for item t - S + 1: keep it for the next repeat.
    done = t - (S - 1)
    keep = (done >= 0) & (done < R * M)
    slot = jnp.mod(done, M)
    old_SbTD = jax.lax.dynamic_index_in_dim(inbox_SMbTD, slot, axis=1, keepdims=False)
    new_SbTD = jnp.where(keep & (stage_S == 0)[:, None, None, None], x_SbTD, old_SbTD)
    inbox_SMbTD = jax.lax.dynamic_update_index_in_dim(inbox_SMbTD, new_SbTD, slot, axis=1)
    return (x_SbTD, shard_act(inbox_SMbTD, STAGE_ACT[:1] + (None,) + STAGE_ACT[1:]),
            aux_SRM), None

  x0_SbTD = shard_act(jnp.zeros((S,) + x_MbTD.shape[1:], x_MbTD.dtype), STAGE_ACT)
  inbox0 = shard_act(jnp.broadcast_to(x_MbTD[None], (S,) + x_MbTD.shape),
                     STAGE_ACT[:1] + (None,) + STAGE_ACT[1:])
  (_, inbox_SMbTD, aux_SRM), _ = jax.lax.scan(iteration, (x0_SbTD, inbox0, aux0),
                                              jnp.arange(R * M + S - 1, dtype=jnp.int32))
  # [S, R, M, Lc, ...] -> [R, S, Lc, M, ...] -> [L, M, ...]: layer (r S + s) Lc + j.
  aux_LM = jax.tree.map(
      lambda a: jnp.moveaxis(jnp.swapaxes(a, 0, 1), 2, 3).reshape((R * S * lc, M) + a.shape[4:]),
      aux_SRM)
  return shard_act(merge_microbatches(inbox_SMbTD[0]), STAGE_ACT[1:]), aux_LM
