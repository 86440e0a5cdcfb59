"""Pipeline parallelism: a stack of blocks run as S stages over the 'stage' mesh axis.

One SPMD program, no per-stage programs: every stacked-block weight [L, ...] is viewed as
[R, S, Lc, ...] (R repeats, S stages, Lc = L / (R S) layers per virtual stage) with the S axis on
the 'stage' mesh axis, so device row s holds the layers of virtual stages s, S + s, 2S + s, ...
(R = 1 is GPipe; R > 1 the circular / interleaved schedule). A batch is cut into M pipeline
microbatches; one `lax.scan` runs N = R M + S - 1 iterations, and in each iteration every stage
applies its Lc layers (vmapped over the stage axis, sharded on 'stage') to its current input, then
the outputs move one stage on: a roll of the stage-sharded buffer, which XLA lowers to one
collective-permute. Stage s at iteration t works on item i = t - s (repeat i // M, microbatch
i % M); the (S - 1) iterations where it has none are the bubble, (S-1)/(R M + S - 1) of the time.

The outputs of the last stage arrive at stage 0 through the same roll and wait in `inbox`
[S, M, ...] (only row 0 is used; it starts as the embedded microbatches) until that microbatch's
next repeat, M - S + 1 iterations later; after the last repeat it holds the stack's output.

Parameters keep their canonical [L, ...] layout (checkpoints do not depend on S or R): with
R = 1 the view is a free reshape of the contiguous 'stage' shards; with R > 1 a device's layers
are not contiguous in [L], so XLA moves the weights into the [R, S, Lc] view once per step (an
all-to-all over 'stage', and its transpose for the gradients).

With remat on, each iteration's stage computation is checkpointed: the scan saves only the stage
inputs [S, Bm, T, D] per iteration, and the backward pass recomputes the stage (whose layers use
the model's own remat policy inside).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mai_jax.sharding import shard_act

# Logical axes of the pipeline buffers: 'layers' maps to the 'stage' mesh axis in the rules.
STAGE_ACT = ("layers", "batch", "seq", "embed")

LayerFn = Callable  # (x_BTD, layer_state, segment_ids_BT, positions_BT) -> x_BTD


def active_stages() -> int:
  """Size of the 'stage' axis of the mesh being traced under (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "stage" not in mesh.axis_names:
    return 1
  return mesh.shape["stage"]


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


def stage_view(w_L, logical: PartitionSpec, stages: int, repeats: int):
  """Canonical [L, ...] weight -> [R, S, Lc, ...] with S on 'stage', other dims as their rules."""
  L = w_L.shape[0]
  w = w_L.reshape(repeats, stages, L // (stages * repeats), *w_L.shape[1:])
  rest = tuple(logical)[1:] + (None,) * (w_L.ndim - len(tuple(logical)))
  return shard_act(w, (None, "layers", None) + rest)


def run(layer_fn: LayerFn, stacked_state, logical_specs, x_BTD: jax.Array,
        segment_ids_BT: Optional[jax.Array], positions_BT: jax.Array, *, stages: int,
        repeats: int, num_micro: int, remat: bool) -> jax.Array:
  """Applies the L stacked layers to x_BTD as an S-stage pipeline; equals a plain scan over them.

  stacked_state: the stack's nnx.State (leaves [L, ...]); logical_specs: its logical
  PartitionSpecs (nnx.get_partition_spec), leaf for leaf.
  """
  S, R, M = stages, repeats, num_micro
  B, T, D = x_BTD.shape
  if B % M:
    raise ValueError(f"pipeline: batch {B} rows do not split into {M} pipeline microbatches")
  leaves, treedef = jax.tree.flatten(stacked_state)
  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  weights_RS = [stage_view(w, spec, S, R) for w, spec in zip(leaves, specs)]

  x_MbTD = shard_act(split_microbatches(x_BTD, M), (None,) + STAGE_ACT[1:])
  seg_MbT = None if segment_ids_BT is None else split_microbatches(segment_ids_BT, M)
  pos_MbT = split_microbatches(positions_BT, M)

  def one_stage(w_Lc, x_bTD, seg_bT, pos_bT):
    def body(carry_bTD, layer_leaves):
      return layer_fn(carry_bTD, jax.tree.unflatten(treedef, layer_leaves), seg_bT, pos_bT), None
    return jax.lax.scan(body, x_bTD, w_Lc)[0]

  all_stages = jax.vmap(one_stage, spmd_axis_name="stage")
  if remat:
    all_stages = jax.checkpoint(all_stages, policy=jax.checkpoint_policies.nothing_saveable,
                                prevent_cse=False)
  stage_S = jnp.arange(S)

  def iteration(carry, t):
    x_SbTD, inbox_SMbTD = carry
    item_S = t - stage_S
    micro_S = jnp.mod(item_S, M)
    # Stage 0 takes its microbatch from the inbox (embedded input, or the last stage's output of
    # the previous repeat); the others take what the previous stage just passed on.
    first_SbTD = jax.lax.dynamic_index_in_dim(inbox_SMbTD, jnp.mod(t, M), axis=1, keepdims=False)
    x_SbTD = jnp.where((stage_S == 0)[:, None, None, None], first_SbTD, x_SbTD)
    if R == 1:
      w_S = [w[0] for w in weights_RS]
    else:
      repeat_S = jnp.clip(item_S // M, 0, R - 1)
      w_S = [jax.vmap(lambda w_R, r: w_R[r], in_axes=(1, 0))(w, repeat_S) for w in weights_RS]
    seg_SbT = None if seg_MbT is None else shard_act(seg_MbT[micro_S], STAGE_ACT[:3])
    pos_SbT = shard_act(pos_MbT[micro_S], STAGE_ACT[:3])
    y_SbTD = all_stages(w_S, x_SbTD, seg_SbT, pos_SbT)
    # Pass every stage's output to the next stage (collective-permute over 'stage').
    x_SbTD = shard_act(jnp.roll(y_SbTD, 1, axis=0), STAGE_ACT)
    # Row 0 now holds the last stage's output for item t - S + 1: keep it for the next repeat.
    done = t - (S - 1)
    keep = (done >= 0) & (done < R * M)
    slot = jnp.mod(done, M)
    old_SbTD = jax.lax.dynamic_index_in_dim(inbox_SMbTD, slot, axis=1, keepdims=False)
    new_SbTD = jnp.where(keep & (stage_S == 0)[:, None, None, None], x_SbTD, old_SbTD)
    inbox_SMbTD = jax.lax.dynamic_update_index_in_dim(inbox_SMbTD, new_SbTD, slot, axis=1)
    return (x_SbTD, shard_act(inbox_SMbTD, STAGE_ACT[:1] + (None,) + STAGE_ACT[1:])), None

  x0_SbTD = shard_act(jnp.zeros((S,) + x_MbTD.shape[1:], x_BTD.dtype), STAGE_ACT)
  inbox0 = shard_act(jnp.broadcast_to(x_MbTD[None], (S,) + x_MbTD.shape),
                     STAGE_ACT[:1] + (None,) + STAGE_ACT[1:])
  (_, inbox_SMbTD), _ = jax.lax.scan(iteration, (x0_SbTD, inbox0),
                                     jnp.arange(R * M + S - 1, dtype=jnp.int32))
  return shard_act(merge_microbatches(inbox_SMbTD[0]), STAGE_ACT[1:])
