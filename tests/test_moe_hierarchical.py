"""model.expert_devices_per_node: the hierarchical (inter-node, then intra-node) expert dispatch
computes what the flat all-to-all does (outputs, gradients, router statistics, drop counts) on an
8-device expert axis split 2 x 4 and 4 x 2, in capacity and bounded-dropless mode, and its compiled
program holds the two stages' all-to-alls over the expected replica groups."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_moe import make_moe, moe_cfg
from test_moe_overlap import _close, compiled_grad

from mai_jax import config as C
from mai_jax.compiled_collectives import all_to_alls
from mai_jax.model import moe as moe_lib

MESH = C.MeshConfig(data=1, fsdp=1, expert=8, tensor=1)  # expert position = device id
ROWS, SEQ = 8, 8  # one row (8 tokens, 32 assignments) per device
SPLITS = (4, 2)  # devices per node: 2 nodes x 4, 4 nodes x 2
# 16 experts (2 per device), top-4: tokens often hit several devices of one node. Both cases drop
# (capacity 2 per expert per row; dropless buffers of ceil(1.0 x 32 / 8) = 4 rows), so the drop
# accounting is compared too; "capacity_nodrop" (capacity = seq_len) drops nothing.
# Splits per case: the fast suite compiles five programs (each split costs one more), the slow one
# the rest, also with the fp8 dispatch (whose rows are bytes through both stages).
CASES = {
    "capacity": (dict(capacity_factor=1.0), SPLITS),
    "dropless_bounded": (dict(expert_buffer_factor=1.0, router="sigmoid_bias"), (2,)),
    "dropless_bounded_2x4": (dict(expert_buffer_factor=1.0, router="sigmoid_bias"), (4,)),
    "capacity_nodrop": (dict(capacity_factor=4.0, moe_dispatch_dtype="float8_e4m3fn"), SPLITS),
}


def _run(cfg, state, x_BTD):
  """value_and_grad of sum(sin(y)) compiled under MESH -> (results, HLO text)."""
  compiled, hlo = compiled_grad(cfg, state, x_BTD, MESH)
  return jax.device_get(compiled(state, x_BTD)), hlo


@pytest.fixture(scope="module", params=[
    "capacity", "dropless_bounded", pytest.param("dropless_bounded_2x4", marks=pytest.mark.slow),
    pytest.param("capacity_nodrop", marks=pytest.mark.slow)])
def runs(request):
  """(case, {devices per node (0: flat): (results, hlo)}) of one case."""
  kw, splits = CASES[request.param]
  cfg = moe_cfg(num_experts=16, experts_per_token=4, init_std=0.3, **kw)
  state = nnx.state(make_moe(cfg))
  x_BTD = jax.random.normal(jax.random.key(5), (ROWS, SEQ, cfg.d_model))
  # ragged_dot: the CPU tiled path's scan compiles several times slower at this size
  old, moe_lib.EXPERT_FFN_IMPL = moe_lib.EXPERT_FFN_IMPL, "ragged_dot"
  try:
    return request.param, {n: _run(dataclasses.replace(cfg, expert_devices_per_node=n), state,
                                   x_BTD) for n in (0,) + splits}
  finally:
    moe_lib.EXPERT_FFN_IMPL = old


def test_hierarchical_equals_flat(runs):
  case, out = runs
  for per_node in CASES[case][1]:
    _check_equal(case, out[0][0], out[per_node][0])


def _check_equal(case, flat, hierarchical):
  ((_, (y0, aux0)), (g0, gx0)) = flat
  ((_, (y1, aux1)), (g1, gx1)) = hierarchical
  assert np.max(np.abs(y0)) > 0.5  # the experts contribute
  _close(y1, y0, "y")
  _close(gx1, gx0, "dx")
  flat0, flat1 = nnx.to_flat_state(g0), nnx.to_flat_state(g1)
  assert [p for p, _ in flat0] == [p for p, _ in flat1]
  for (path, a), (_, b) in zip(flat0, flat1):
    _close(b[...], a[...], str(path))
  assert set(aux1) == set(aux0)
  for key in aux0:  # router statistics and drop fraction: the same numbers
    np.testing.assert_array_equal(aux1[key], aux0[key], err_msg=key)
  dropped = float(aux0["dropped_fraction"])
  assert (dropped == 0) if case == "capacity_nodrop" else (0 < dropped < 0.5), dropped


def test_compiled_program_has_inter_and_intra_all_to_alls(runs):
  """Flat: every all-to-all over all 8 devices. Hierarchical: the token rows cross between nodes
  over {l, n + l, 2n + l, ...} groups of `nodes` devices (one row per token and node) and fan out
  over each node's n devices; no all-to-all spans all 8."""
  case, out = runs
  assert {g for _, _, g in all_to_alls(out[0][1])} == {(tuple(range(8)),)}
  for per_node in CASES[case][1]:
    _check_groups(out[per_node][1], per_node, out[0][1])


def _check_groups(hlo, per_node, flat_hlo):
  nodes = 8 // per_node
  inter = tuple(tuple(j * per_node + l for j in range(nodes)) for l in range(per_node))
  intra = tuple(tuple(j * per_node + l for l in range(per_node)) for j in range(nodes))
  ops = all_to_alls(hlo)
  assert {g for _, _, g in ops} == {inter, intra}
  # The widest intra all-to-all is the flat one's buffer ([8 sources, rows, D] float32, the
  # backward's rows); the widest inter one holds each of the device's 8 tokens once per node
  # (R = min(tokens, per_node x rows) = 8 here, as rows >= 4 in every case), rows of D = 16.
  widest = lambda g: max(b for _, b, gg in ops if gg == g)
  assert widest(intra) == max(b for _, b, _ in all_to_alls(flat_hlo))
  assert widest(inter) == nodes * SEQ * 16 * 4


def test_bad_expert_devices_per_node_is_refused():
  """n must be 0 or split the expert devices into nodes of 1 < n < ep devices, on an MoE model
  without pipeline stages."""
  def check(model, mesh):
    cfg = C.Config(model=C.ModelConfig(**model), mesh=C.MeshConfig(**mesh))
    C.validate(cfg, num_devices=8)

  moe = dict(num_experts=8, experts_per_token=2)
  check(dict(moe, expert_devices_per_node=4), dict(expert=8, fsdp=1))  # fine
  for model, mesh in ((dict(moe, expert_devices_per_node=3), dict(expert=8, fsdp=1)),
                      (dict(moe, expert_devices_per_node=8), dict(expert=8, fsdp=1)),
                      (dict(moe, expert_devices_per_node=1), dict(expert=8, fsdp=1)),
                      (dict(moe, expert_devices_per_node=2), dict(expert=1, fsdp=8)),
                      (dict(expert_devices_per_node=2), dict(expert=8, fsdp=1)),
                      (dict(moe, expert_devices_per_node=2), dict(expert=4, stage=2, fsdp=1))):
    with pytest.raises(C.ConfigError,
                       match=r"model\.expert_devices_per_node=\d.*(mesh\.|num_experts)"):
      check(model, mesh)
