"""Planner terms for MoE routing: how many nodes a token's expert rows reach (docs/planner.md,
"Node-limited routing").

Why a separate count: with node-limited routing (model.router_groups, model/moe.py group_limit)
a token's k experts lie in at most router_topk_groups groups, so at most that many nodes when a
group is a node's experts. What that saves depends on the dispatch. The code's dispatch is a flat
all-to-all of fixed-size buffers (model/moe.py moe_expert_parallel): each device sends every
device its capacity (or dropless) buffer, one row per (token, chosen expert) slot, whatever the
routing, so the flat all-to-all's bytes (plan.moe_communication) do not change with the limit;
only the number of nodes a token's rows go to does. The hierarchical dispatch
(model.expert_devices_per_node: the expert axis viewed as nodes x devices per node) sends a token
once per remote destination node over InfiniBand and fans it out over NVLink inside the node:
its inter-node rows per token are the remote share of `nodes_per_token` (x (N - 1) / N under
uniform routing) instead of the flat all-to-all's ~capacity_factor x k x (N - 1) / N
(`all_to_all`, docs/planner.md "Hierarchical all-to-all").
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


def routing(cfg: Config, layout, gpu: hardware.GpuSpec,
            per_node: int = 0) -> dict[str, Optional[float]]:
  """The expert axis' routing term: {'expert_nodes', 'nodes_per_token' (expected, uniform
  routing), 'nodes_per_token_limit' (router_topk_groups when groups are nodes or nest in them,
  else None)}. The flat all-to-all's bytes do not depend on them; the hierarchical one's
  inter-node bytes do (all_to_all). per_node > 1: expert devices per node as
  model.expert_devices_per_node views the axis (expert / per_node nodes)."""
  m = cfg.model
  N = expert_nodes(layout, gpu) if per_node <= 1 else max(1, layout.size("expert") // per_node)
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


def all_to_all(row_bytes: float, rows: float, assignments: float, tokens: float, calls: int,
               expert: int, per_node: int, hierarchical: bool, nodes_per_token: float,
               links: tuple[str, str], bandwidth: dict, latency: dict) -> dict:
  """Bytes and time of one device's expert all-to-alls in a step (docs/planner.md,
  "Hierarchical all-to-all").

  rows: the rows of one layer's send buffer per microbatch (plan.moe_buffer_rows), carrying
  `assignments` = tokens x k (token, expert) pairs, so padding = rows / assignments (the capacity
  factor, or the dropless buffers'); row_bytes: what one buffer row moves over the whole step
  (every MoE layer's dispatches, combines and backward all-to-alls of every microbatch);
  per_node: expert devices in one node (the node the mesh fills, or model.expert_devices_per_node),
  N = expert / per_node nodes; links: (inter-node link, intra-node link) names.
    flat (one all-to-all over the axis): off-node (expert - per_node) / expert of the rows over the
      inter-node link and on-node (per_node - 1) / expert over the intra-node one, concurrently:
      time = the slower of the two;
    hierarchical: a token crosses to each remote destination node once, nodes_per_token (N - 1) / N
      rows per token (x the padding), then the node fans it out: every assignment not already on
      its expert's device, (per_node - 1) / per_node of the rows; the phases are two collectives
      one after the other: time = their sum.
  Latency: calls x ceil(log2(ranks)) hops of the phase's link. bandwidth / latency map a link
  name to its effective bytes/s and seconds per hop.
  -> {'internode_bytes', 'intranode_bytes', 'time_s', 'hierarchical'}."""
  e, n = expert, max(1, min(per_node, expert))
  nodes = e // n
  inter_link, intra_link = links
  hops = lambda ranks: math.ceil(math.log2(ranks)) if ranks > 1 else 0
  if hierarchical and nodes > 1:
    padding = rows / assignments if assignments else 0.0
    inter = tokens * nodes_per_token * (nodes - 1) / nodes * padding * row_bytes
    intra = rows * (n - 1) / n * row_bytes
    time = (inter / bandwidth[inter_link] + intra / bandwidth[intra_link]
            + calls * (hops(nodes) * latency[inter_link] + hops(n) * latency[intra_link]))
  else:
    inter = rows * (e - n) / e * row_bytes
    intra = rows * (n - 1) / e * row_bytes
    time = (max(inter / bandwidth[inter_link], intra / bandwidth[intra_link])
            + calls * hops(e) * latency[inter_link if nodes > 1 else intra_link])
  return {"internode_bytes": inter, "intranode_bytes": intra, "time_s": time,
          "hierarchical": bool(hierarchical and nodes > 1)}
