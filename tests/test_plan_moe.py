"""The planner's MoE routing term (mai_jax/plan_moe.py): expected nodes per token against an
enumeration of every routing, and the plan's bytes unchanged by node-limited routing (the flat
all-to-all's buffers are fixed-size)."""

import itertools
import os

import pytest

from mai_jax import config as C
from mai_jax import hardware
from mai_jax import plan as P
from mai_jax import plan_moe, plan_search

MAI1_MOE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "mai1_500b.py") + ":moe"


def enumerated_nodes_per_token(E, N, k, G=1, M=1):
  """Mean distinct nodes over every equally likely routing: each M-subset of the G groups, then
  each k-subset of its experts (contiguous groups of E / G, nodes of E / N)."""
  means = []
  for kept in itertools.combinations(range(G), M):
    experts = [e for g in kept for e in range(g * E // G, (g + 1) * E // G)]
    hits = [len({e // (E // N) for e in chosen}) for chosen in itertools.combinations(experts, k)]
    means.append(sum(hits) / len(hits))
  return sum(means) / len(means)


@pytest.mark.parametrize("E,N,k,G,M", [
    (8, 4, 2, 1, 1), (12, 3, 4, 1, 1),  # ungrouped
    (8, 4, 3, 4, 2), (12, 4, 4, 4, 3),  # a group per node
    (16, 2, 3, 8, 3),  # several groups per node
    (16, 8, 3, 2, 1), (16, 8, 5, 4, 2),  # several nodes per group
    (8, 4, 2, 4, 4),  # every group kept: ungrouped
])
def test_expected_nodes_per_token_matches_enumeration(E, N, k, G, M):
  got = plan_moe.expected_nodes_per_token(E, N, k, G, M)
  assert got == pytest.approx(enumerated_nodes_per_token(E, N, k, G, M), rel=1e-12)
  if G == N and M < G:
    assert got <= M


def test_issue_formula_for_mai1_moe():
  """128 experts on 8 nodes, k = 8: 8 (1 - C(112, 8) / C(128, 8)) nodes; kept to 4 of 8 groups,
  fewer than 4 (some tokens use fewer of their 4 nodes)."""
  ratio = 1.0
  for i in range(8):
    ratio *= (112 - i) / (128 - i)
  assert plan_moe.expected_nodes_per_token(128, 8, 8) == pytest.approx(8 * (1 - ratio))
  limited = plan_moe.expected_nodes_per_token(128, 8, 8, 8, 4)
  assert 3.5 < limited < 4 < 8 * (1 - ratio)


def test_node_limited_routing_reports_nodes_but_keeps_the_all_to_all_bytes():
  cfg = C.load_experiment(MAI1_MOE)
  grouped = C.apply_overrides(cfg, {"model.router_groups": "8", "model.router_topk_groups": "4"})
  gpu = hardware.GPUS["h100"]
  layout = P.layout_of(cfg, 15360)
  before, after = (P.communication(c, layout, gpu)["expert"] for c in (cfg, grouped))
  assert before["expert_nodes"] == after["expert_nodes"] == 8  # expert 64 x tensor 1, 8 a node
  assert before["nodes_per_token_limit"] is None and after["nodes_per_token_limit"] == 4
  assert after["nodes_per_token"] < 4 < before["nodes_per_token"]
  for key in ("bytes", "time_s", "link"):
    assert before[key] == after[key], key
  text = plan_search.format_plan(P.plan(grouped, "h100", 15360))
  assert "experts on 3.66 of 8 nodes per token (expected, at most 4)" in text
  # tensor 2: a node holds 4 expert positions, so expert 8 spans 2 nodes; 8 groups nest in them
  small = C.apply_overrides(grouped, {"mesh.expert": "8", "mesh.tensor": "2", "mesh.fsdp": "-1",
                                      "mesh.data": "1"})
  routing = plan_moe.routing(small, P.layout_of(small, 64), gpu)
  assert routing["expert_nodes"] == 2 and routing["nodes_per_token_limit"] == 2
  assert routing["nodes_per_token"] == pytest.approx(
      plan_moe.expected_nodes_per_token(128, 2, 8, 8, 4))


def test_h800_plans_nvlink_collectives_at_its_bandwidth():
  """H800 = H100 compute with NVLink 400 GB/s bidirectional: an all-to-all inside a node takes
  450 / 200 of the H100's time (less the per-hop latency, the same on both)."""
  cfg = C.apply_overrides(C.load_experiment(MAI1_MOE), {"mesh.expert": "8", "mesh.fsdp": "8"})
  layout = P.layout_of(cfg, 15360)
  h100, h800 = (P.communication(cfg, layout, hardware.GPUS[g])["expert"] for g in ("h100", "h800"))
  assert h100["link"] == h800["link"] == "nvlink" and h100["bytes"] == h800["bytes"]
  latency = h100["time_s"] - h100["bytes"] / (450e9 * P.COLLECTIVE_EFFICIENCY)
  assert h800["time_s"] - latency == pytest.approx((h100["time_s"] - latency) * 450 / 200)
  assert P.plan(cfg, "h800", 15360).compute_time_s == P.plan(cfg, "h100", 15360).compute_time_s


def test_overlap_halves_hide_the_all_to_all_under_one_halfs_expert_gemms():
  """model.moe_overlap_halves: exposed = max(0, all-to-all - one half's expert + shared-expert
  GEMM time), the GEMM time the blocks' share of it: MAI-1 MoE's 62 MoE layers x 3 D (8 routed + 1
  shared) d_ff_expert of the blocks' matmul parameters (active less embedding and unembedding)."""
  cfg = C.load_experiment(MAI1_MOE)
  on = C.apply_overrides(cfg, {"model.moe_overlap_halves": "True"})
  off_plan, on_plan = P.plan(cfg, "h100", 15360), P.plan(on, "h100", 15360)
  share = 62 * 3 * 8192 * (8 + 1) * 2560 / (off_plan.params_active - 2 * 131072 * 8192)
  hidden = share * off_plan.compute_times["gemm"] / 2
  off, got = off_plan.communication["expert"], on_plan.communication["expert"]
  assert got["bytes"] == off["bytes"] and got["all_to_all_s"] == off["time_s"]
  assert got["overlappable_s"] == pytest.approx(hidden, rel=1e-12)
  assert 0 < hidden < off["time_s"]  # inter-node: the all-to-all outlasts the expert GEMMs
  assert got["time_s"] == pytest.approx(off["time_s"] - hidden)
  assert on_plan.step_time_s == pytest.approx(off_plan.step_time_s - hidden)
  assert on_plan.step_time_no_overlap_s == pytest.approx(off_plan.step_time_no_overlap_s)
  assert "up to 0.939 s under one half's expert GEMMs" in plan_search.format_plan(on_plan)
  # expert parallelism inside a node (NVLink): the GEMMs outlast the all-to-all, nothing exposed
  small = C.apply_overrides(on, {"mesh.expert": "8", "mesh.fsdp": "64"})
  expert = P.plan(small, "h100", 15360).communication["expert"]
  assert expert["link"] == "nvlink" and expert["overlappable_s"] > expert["all_to_all_s"] > 0
  assert expert["time_s"] == 0
