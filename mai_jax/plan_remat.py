"""What each remat policy keeps and recomputes of a block, for the planner.

model/remat.py is the code: a policy saves checkpoint_name-tagged outputs (SAVED_NAMES). What the
backward of a block needs is fixed by the block: the q/k/v and o projection outputs, the MLP's
gate and up outputs (silu's derivative and the product), and the attention core's statistics.
mlp_down's output is not needed (the block's output is the next block's checkpointed input), so
no policy saves it and no recompute runs it: jax's saved-residual report and XLA's FLOP count
agree (tests/test_model.py, tests/test_plan.py). The routed experts of an MoE layer carry no tag:
every policy but 'none' recomputes them, the dispatch that feeds them and all three projections
(the router weights' gradient needs the chosen experts' outputs, so their down projection is
rerun too).
"""

from __future__ import annotations

from typing import Optional

from mai_jax.model import remat as remat_lib

# Projection outputs a block's backward needs, in the order layer_activation_bytes lists them.
NEEDED = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up")
# Of those, the row-parallel matmul over 'tensor' whose output is all-reduced (Megatron's "g").
ROW_PARALLEL = ("o_proj",)
POLICIES = tuple(remat_lib.SAVED_NAMES)


def saved(remat: str) -> Optional[frozenset]:
  """The tagged outputs `remat` keeps; None for 'none' (no checkpoint: everything is kept)."""
  if remat not in remat_lib.SAVED_NAMES:
    raise ValueError(f"model.remat={remat!r} is not one of {', '.join(POLICIES)}")
  names = remat_lib.SAVED_NAMES[remat]
  return None if names is None else frozenset(names)


def recomputed(remat: str) -> tuple[str, ...]:
  """The needed projection outputs the backward of a block recomputes under `remat`."""
  keep = saved(remat)
  return () if keep is None else tuple(n for n in NEEDED if n not in keep)


def block_bytes(per: dict, remat: str) -> tuple[float, float]:
  """(saved, live) bytes of one block under `remat`, from layer_activation_bytes' `per`:
  saved is what the block keeps from its forward to its backward (its input, the carry, and the
  projection outputs the policy keeps); live what its backward rebuilds at once (the attention
  core and the recomputed projections; 'full': the whole block's activations)."""
  if remat == "none":
    return per["none"], 0.0
  if remat == "full":
    return per["carry"], per["none"]
  keep = saved(remat)
  kept = sum(b for name, b in per["proj"].items() if name in keep)
  rebuilt = sum(b for name, b in per["proj"].items() if name not in keep)
  return per["carry"] + kept, per["core"] + rebuilt


def saves_router(remat: str) -> bool:
  """Whether the policy keeps the MoE router logits (else the router runs again)."""
  keep = saved(remat)
  return keep is None or "router_logits" in keep


def projection_params(d_model: int, heads: int, kv_heads: int, head_dim: int,
                      d_ff: float) -> dict[str, float]:
  """Matmul parameters behind each needed projection output of one block."""
  return {"q_proj": d_model * heads * head_dim, "k_proj": d_model * kv_heads * head_dim,
          "v_proj": d_model * kv_heads * head_dim, "o_proj": heads * head_dim * d_model,
          "mlp_gate": d_model * d_ff, "mlp_up": d_model * d_ff}


def recomputed_params(params: dict[str, float], remat: str) -> float:
  """Matmul parameters whose forward GEMMs a block's backward runs again (2 FLOPs each per
  token), from projection_params."""
  return sum(params[name] for name in recomputed(remat))


def recomputed_all_reduces(remat: str) -> int:
  """Tensor-parallel all-reduces a block's backward runs again (its recomputed row-parallel
  outputs): 'full' and 'qkv_proj' recompute o_proj's."""
  return sum(1 for name in recomputed(remat) if name in ROW_PARALLEL)
