"""Planner terms for MoE routing: how many nodes a token's expert rows reach (docs/planner.md,
"Node-limited routing").

Why a separate count: with node-limited routing (model.router_groups, model/moe.py group_limit)
a token's k experts lie in at most router_topk_groups groups, so at most that many nodes when a
group is a node's experts. What that saves depends on the dispatch. The code's dispatch is a flat
all-to-all of fixed-size buffers (model/moe.py moe_expert_parallel): each device sends every
device its capacity (or dropless) buffer, one row per (token, chosen expert) slot, whatever the
routing, so the bytes (plan.moe_communication) do not change with the limit; only the number of
nodes a token's rows go to does. A hierarchical dispatch (not built) would send a token once per
destination node over InfiniBand and fan it out over NVLink: its inter-node rows per token would
be the remote share of `nodes_per_token` (x (N - 1) / N under uniform routing) instead of the
flat all-to-all's ~capacity_factor x k x (N - 1) / N; that is the term this count is for.
"""

from __future__ import annotations

import math
from typing import Optional

from mai_jax import hardware
from mai_jax.config import Config


def expected_nodes_per_token(num_experts: int, nodes: int, k: int, groups: int = 0,
                             topk_groups: int = 0) -> float:
  """Expected distinct nodes a token's k experts lie on, under uniform routing.

  E experts split contiguously over `nodes` nodes (E / N each, how the `expert` mesh axis places
  them). Ungrouped: the k experts are a uniform k-subset of E, a node is missed with probability
  C(E - E/N, k) / C(E, k), so N (1 - C(E - E/N, k) / C(E, k)) nodes are hit (groups = nodes: the
  issue's G (1 - C(E - E/G, k) / C(E, k))). Node-limited (groups G > 1, topk_groups M): the M
  kept groups are a uniform M-subset of the G groups and the k experts a uniform k-subset of
  their P = M E / G experts. A node meets g = max(1, G / N) groups in o = E / max(G, N) experts
  each; if j of its groups are kept (hypergeometric: C(g, j) C(G - g, M - j) / C(G, M)) it is
  missed with probability C(P - j o, k) / C(P, k). The result is at most min(M, N) when groups
  are nodes (G = N), and the unlimited value when M = G. Groups that neither nest in nodes nor
  contain whole nodes (G and N not dividing one another) bound nothing: the unlimited value.
  """
  E, N = num_experts, max(1, nodes)
  if groups <= 1 or (groups % N and N % groups):
    groups, topk_groups = 1, 1
  G, M = groups, topk_groups
  g, o, pool = max(1, G // N), E // max(G, N), M * E // G
  missed = sum(math.comb(g, j) * math.comb(G - g, M - j) / math.comb(G, M)
               * math.comb(pool - j * o, k) / math.comb(pool, k) for j in range(min(g, M) + 1))
  return N * (1 - missed)


def expert_nodes(layout, gpu: hardware.GpuSpec) -> int:
  """Nodes the `expert` mesh axis spans: the hybrid mesh fills a node from the innermost axis
  (tensor, then expert: plan.AXES_INNER_FIRST), so a node holds gpus_per_node / tensor expert
  positions once tensor x expert exceeds it."""
  e, t = layout.size("expert"), layout.size("tensor")
  if e * t <= gpu.gpus_per_node:
    return 1
  return math.ceil(e / max(1, gpu.gpus_per_node // t))


def routing(cfg: Config, layout, gpu: hardware.GpuSpec) -> dict[str, Optional[float]]:
  """The expert axis' routing term: {'expert_nodes', 'nodes_per_token' (expected, uniform
  routing), 'nodes_per_token_limit' (router_topk_groups when groups are nodes or nest in them,
  else None)}. Informational: the flat all-to-all's bytes and time do not depend on them (module
  docstring)."""
  m = cfg.model
  N = expert_nodes(layout, gpu)
  G, M = m.router_groups, m.router_topk_groups
  grouped = G > 1 and not (G % N and N % G)
  limit = None
  if grouped:
    limit = min(N, M * max(1, N // G))  # a kept group spans N / G nodes when groups hold nodes
  return {"expert_nodes": N,
          "nodes_per_token": expected_nodes_per_token(m.num_experts, N, m.experts_per_token,
                                                      G if grouped else 0, M if grouped else 0),
          "nodes_per_token_limit": limit}


def expert_gemm_share(model, block_params: int) -> float:
  """Fraction of the blocks' matmul FLOPs (block_params per token and pass, as plan.compute_times
  counts them: the k routed experts, not their capacity padding) that the MoE layers' routed and
  shared experts compute: L_moe x 3 D (k + shared) F_e / block_params."""
  from mai_jax.model.moe import expert_d_ff, num_moe_layers
  width = (model.experts_per_token + model.num_shared_experts) * expert_d_ff(model)
  return num_moe_layers(model) * 3 * model.d_model * width / block_params


def overlap(all_to_all_s: float, expert_gemm_s: float) -> dict[str, float]:
  """The expert all-to-all with model.moe_overlap_halves (docs/planner.md "Overlap"):
  exposed = max(0, all_to_all - overlappable), overlappable = one half's expert and shared-expert
  GEMM time (half of the step's expert_gemm_s, every pass and recompute included). Each half's
  dispatch and combine can run under the other half's experts and the shared experts, but the
  first dispatch and the last combine of a layer have only one half's compute beside them, so one
  half's, not both halves', is counted. A scheduling opportunity: whether XLA's GPU scheduler
  realizes it is unmeasured (the GPU suite should measure it).
  -> {'time_s' (exposed), 'all_to_all_s', 'overlappable_s'}."""
  overlappable = expert_gemm_s / 2
  return {"time_s": max(0.0, all_to_all_s - overlappable), "all_to_all_s": all_to_all_s,
          "overlappable_s": overlappable}
