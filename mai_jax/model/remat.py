"""Rematerialization policies, named by what a block keeps for its backward pass.

Every policy saves outputs by their `checkpoint_name` tags (layers.PROJECTIONS), never by shape:
under the pipeline's vmap over stages every dot gains a batch dimension, and a shape-based policy
would then save nothing. The names follow MaxText's remat_policy values where one exists
('dots' = its 'minimal', 'attn_proj' = 'save_dot_except_mlp', 'qkv_proj' = 'save_qkv_proj').
A tag on an output the backward does not need saves nothing (mlp_down: the block's output is the
next block's checkpointed input). mai_jax/plan.py reads SAVED_NAMES to count each policy's saved
bytes and recomputed FLOPs.
"""

from typing import Callable, Optional

import jax

from mai_jax.model.layers import PROJECTIONS

# model.remat -> the tagged outputs it saves (None: no checkpoint at all, everything is kept).
SAVED_NAMES: dict[str, Optional[tuple[str, ...]]] = {
    "none": None,
    "full": (),  # only the block's input: the backward recomputes the whole block
    "dots": PROJECTIONS,  # every projection output: only the attention core is recomputed
    # Attention's four projections: the whole MLP is recomputed.
    "attn_proj": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # q, k and v only: the output projection and the MLP are recomputed.
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
}


def policy(remat: str) -> Callable:
  """The jax.checkpoint policy of model.remat (not for 'none', which has no checkpoint)."""
  if remat not in SAVED_NAMES or SAVED_NAMES[remat] is None:
    raise ValueError(f"model.remat={remat!r} is not one of {', '.join(repr(r) for r in SAVED_NAMES)}")
  names = SAVED_NAMES[remat]
  if not names:
    return jax.checkpoint_policies.nothing_saveable
  return jax.checkpoint_policies.save_only_these_names(*names)
