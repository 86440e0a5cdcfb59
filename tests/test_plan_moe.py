"""The planner's MoE terms (mai_jax/plan_moe.py): expected nodes per token against an enumeration
of every routing, the plan's flat bytes unchanged by node-limited routing (the flat all-to-all's
buffers are fixed-size), the flat and hierarchical all-to-all's inter- and intra-node bytes and
times by hand, and MoE blocks under pipeline stages."""

import dataclasses
import itertools
import os

import pytest

from mai_jax import config as C
from mai_jax import hardware
from mai_jax import plan as P
from mai_jax import plan_calibration, plan_moe, plan_search

MAI1_MOE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "mai1_500b.py") + ":moe"
# MAI-1 MoE's layout before pipeline stages (expert 64 over 8 nodes, no switches): the figures
# below (0.939 s, 3.66 nodes) are this layout's.
OLD_LAYOUT = {"mesh.stage": "1", "mesh.expert": "64", "mesh.fsdp": "8", "mesh.data": "-1",
              "model.remat": "full", "model.first_dense_layers": "2",
              "model.pipeline_repeats": "1", "model.pipeline_microbatches": "0",
              "model.pipeline_stage_remat": "True", "model.moe_dispatch_dtype": "compute",
              "model.moe_overlap_halves": "False"}


def old_mai1_moe(**over):
  return C.apply_overrides(C.load_experiment(MAI1_MOE), {**OLD_LAYOUT, **over})


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
  cfg = old_mai1_moe()
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
  cfg = old_mai1_moe(**{"mesh.expert": "8", "mesh.fsdp": "8"})
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
  cfg = old_mai1_moe()
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
  assert "up to 0.930 s under one half's expert GEMMs" in plan_search.format_plan(on_plan)
  # expert parallelism inside a node (NVLink): the GEMMs outlast the all-to-all, nothing exposed
  small = C.apply_overrides(on, {"mesh.expert": "8", "mesh.fsdp": "64"})
  expert = P.plan(small, "h100", 15360).communication["expert"]
  assert expert["link"] == "nvlink" and expert["overlappable_s"] > expert["all_to_all_s"] > 0
  assert expert["time_s"] == 0


LINKS = {"nvlink": 360e9, "internode": 40e9}
HOPS = {"nvlink": 3e-6, "internode": 10e-6}


def test_flat_and_hierarchical_all_to_all_by_hand():
  """16 expert devices, 8 a node (2 nodes); a buffer of 100 rows for 80 assignments of 10 tokens
  (k 8, padding 1.25), 1,000 bytes a row over the step, 6 calls. Flat: 8/16 of the rows leave the
  node, 7/16 stay on it (NVLink), both at once. Hierarchical with 1.5 nodes per token: 10 x 1.5 x
  1/2 x 1.25 rows cross once, then 7/8 of the 100 rows fan out inside the node, one after the
  other."""
  flat = plan_moe.all_to_all(1000, 100, 80, 10, 6, 16, 8, False, 1.5,
                             ("internode", "nvlink"), LINKS, HOPS)
  assert flat["internode_bytes"] == 50_000 and flat["intranode_bytes"] == 43_750
  assert flat["time_s"] == pytest.approx(50_000 / 40e9 + 6 * 4 * 10e-6)
  hier = plan_moe.all_to_all(1000, 100, 80, 10, 6, 16, 8, True, 1.5,
                             ("internode", "nvlink"), LINKS, HOPS)
  assert hier["internode_bytes"] == pytest.approx(9_375) and hier["intranode_bytes"] == 87_500
  assert hier["time_s"] == pytest.approx(9_375 / 40e9 + 87_500 / 360e9 + 6 * (10e-6 + 3 * 3e-6))
  assert hier["hierarchical"] and not flat["hierarchical"]
  # one node: nothing to split; the flat all-to-all over NVLink either way
  one = plan_moe.all_to_all(1000, 100, 80, 10, 6, 8, 8, True, 1.0, ("nvlink", "nvlink"),
                            LINKS, HOPS)
  assert one["internode_bytes"] == 0 and one["intranode_bytes"] == 87_500
  assert not one["hierarchical"]


def test_mai1_moe_hierarchical_bytes_follow_nodes_per_token():
  """The old layout (1 row of 4,096 tokens per GPU, expert 64 = 8 nodes, remat full): a buffer
  row moves 62 layers x (2 dispatches + 2 combines + 2 backward) x 2 D bytes a step; flat, 56/64
  of the 128 x 320 rows cross nodes; with expert_devices_per_node=8 and node-limited routing
  (4 of 8 groups) 4,096 x nodes_per_token x 7/8 x 1.25 rows do."""
  cfg = old_mai1_moe(**{"model.router_groups": "8", "model.router_topk_groups": "4"})
  hier_cfg = C.apply_overrides(cfg, {"model.expert_devices_per_node": "8"})
  gpu = hardware.GPUS["h100"]
  flat, hier = (P.communication(c, P.layout_of(c, 15360), gpu)["expert"] for c in (cfg, hier_cfg))
  row = 62 * 6 * 2 * 8192
  assert flat["internode_bytes"] == pytest.approx(128 * 320 * 56 / 64 * row)
  assert flat["intranode_bytes"] == pytest.approx(128 * 320 * 7 / 64 * row)
  nodes = plan_moe.expected_nodes_per_token(128, 8, 8, 8, 4)
  assert hier["nodes_per_token"] == pytest.approx(nodes)
  assert hier["internode_bytes"] == pytest.approx(4096 * nodes * 7 / 8 * 1.25 * row)
  assert hier["intranode_bytes"] == pytest.approx(128 * 320 * 7 / 8 * row)
  assert hier["time_s"] < flat["time_s"]
  # --search offers both views of an expert axis that spans nodes
  choices = {l.expert_devices_per_node for l in plan_search._with_hierarchical_dispatch(
      cfg, P.layout_of(cfg, 15360), gpu)}
  assert choices == {0, 8}


def test_moe_blocks_under_pipeline_stages_by_hand():
  """MAI-1 MoE's layout (stage 8 x fsdp 16 x expert 8 x data 15, R 8, M_p 8, remat dots, no
  stage checkpoint): each GPU runs 8 of the 64 MoE blocks on its 8 rows, 1 per pipeline
  microbatch; 'dots' runs the routed experts' forward again (dispatch and combine too), so per
  block and microbatch 2 fp8 dispatches, 2 combines and 2 backward all-to-alls, 8 x 8 times.
  With 2 dense layers in front (66 layers, R 4), every stage runs those on all its rows, outside
  the schedule: their GEMMs are not stretched by the bubble."""
  cfg = C.load_experiment(MAI1_MOE)
  layout = P.layout_of(cfg, 15360)
  assert P.stage_layers(cfg.model, layout) == (0, 8)
  nbytes, calls, _ = P.moe_communication(cfg, layout)
  D, rows = 8192, 128 * 8 * 320
  assert calls == 6 * 8 * 8
  assert nbytes == pytest.approx(8 * rows * (2 * (D + 4 * D // 128) + 4 * 2 * D) * 7 / 8)
  p = P.plan(cfg, "h100", 15360)
  assert p.fits and p.mfu >= 0.35 and p.communication["expert"]["link"] == "nvlink"
  dense = C.apply_overrides(cfg, {"model.num_layers": "66", "model.first_dense_layers": "2",
                                  "model.pipeline_repeats": "4"})
  staged = P.layout_of(dense, 15360)
  assert P.stage_layers(dense.model, staged) == (2, 8)
  m, gpu = dense.model, hardware.GPUS["h100"]
  times = P.compute_times(dense, staged, gpu)
  without = P.compute_times(dense, dataclasses.replace(staged, repeats=4), gpu)
  pre_params = 2 * (2 * D * 64 * 128 + 2 * D * 8 * 128 + 3 * D * 28672)
  rate = gpu.peak_bf16_flops * P.GEMM_EFFICIENCY * 2560 / (2560 + P.GEMM_HALF_DIM)
  tokens = 8 * 4096
  stretch = times["pipeline_stretch"]
  pipelined = times["gemm"] + times["attention"] + times["elementwise"]
  # 'dots' recomputes the attention core (6 + 2), not the dense GEMMs (6)
  pre_attention = tokens * 8 * 2 * 4096 * 64 * 128 / (gpu.peak_bf16_flops
                                                      * P.ATTENTION_EFFICIENCY)
  pre_elementwise = tokens * 2 * 2 * (10 * D + 2 * 72 * 128 + 3 * P.ffn_width(m)) * 4 / (
      gpu.hbm_bandwidth * P.HBM_EFFICIENCY)
  pre = tokens * 6 * pre_params / rate + pre_attention + pre_elementwise
  assert times["bubble"] == pytest.approx((stretch - 1) * (pipelined - pre), rel=1e-9)
  assert without == times


@pytest.mark.parametrize("run", plan_calibration.published_moe_runs(), ids=lambda r: r.name)
def test_moe_calibration_rows_are_below_the_published_runs(run):
  """docs/planner.md "MoE calibration": the planner under-predicts the published MoE runs (no fp8
  GEMMs, the overlap of only half the expert GEMMs where DualPipe hides the all-to-all under the
  other chunk's whole compute); held to that band, not to CALIBRATION_TOLERANCE. Without the
  exposed expert all-to-all the DeepSeek-V3 row is within the tolerance."""
  p = plan_calibration.predict(run)
  assert run.published_mfu - 0.2 < p.mfu < run.published_mfu
  hidden = p.step_time_s - p.communication["expert"]["time_s"] * p.compute_times[
      "pipeline_stretch"]
  if run.gpu == "h800":
    assert abs(p.mfu * p.step_time_s / hidden - run.published_mfu) <= (
        plan_calibration.CALIBRATION_TOLERANCE)
