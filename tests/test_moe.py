"""Mixture-of-Experts: the layer against a per-token NumPy loop, expert parallelism against one
device, aux losses against their formulas, shardings, parameter counts, the train step's bias update
and a CLI run."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import cli_env
from flax import nnx
from jax.sharding import PartitionSpec as P

from mai_jax import config as C, sharding as S
from mai_jax.model import Decoder, count_active_params, count_params
from mai_jax.model import moe as moe_lib
from mai_jax.train import state as state_lib
from mai_jax.train.trainer import build_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moe_cfg(**kw):
  base = dict(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, d_ff=24,
              vocab_size=64, compute_dtype="float32", remat="none", num_experts=8,
              experts_per_token=2)
  base.update(kw)
  return C.ModelConfig(**base)


def make_moe(cfg, seed=0, bias_scale=0.3):
  layer = moe_lib.MoE(cfg, rngs=nnx.Rngs(seed))
  # Larger router weights than init so routing is decisive; a nonzero bias so it matters.
  layer.router[...] = jax.random.normal(jax.random.key(seed + 1), layer.router.shape)
  if cfg.router == "sigmoid_bias":
    layer.router_bias[...] = bias_scale * jax.random.normal(jax.random.key(seed + 2),
                                                           (cfg.num_experts,))
  return layer


# ------------------------------------------------------------------------------------------------
# Independent reference: loop over tokens and their top-k experts


def swiglu(x, w_gate, w_up, w_down):
  g = x @ w_gate
  return ((g / (1 + np.exp(-g))) * (x @ w_up)) @ w_down


def reference_route(logits, k, router, bias=None, groups=0, topk_groups=0):
  """One token's routing, written out: (chosen experts best first, their weights, the kept groups'
  scores sorted). Ties go to the lower index (stable argsort), groups and experts alike.

  Node-limited (groups > 1, DeepSeek-V2/V3): a group is `groups` contiguous experts; its score is
  its best selection score (softmax) or the sum of its best two (sigmoid_bias: scores + bias); the
  best `topk_groups` groups are kept and the top-k is taken among their experts only."""
  E = logits.shape[0]
  if router == "softmax_topk":
    gate = np.exp(logits - logits.max())
    gate /= gate.sum()
    select, best = gate, 1
  else:
    gate = 1 / (1 + np.exp(-logits))
    select, best = gate + (0.0 if bias is None else bias), 2
  allowed = np.ones(E, bool)
  group_scores = np.zeros(0)
  if groups > 1:
    size = E // groups
    group_scores = np.array([sum(sorted(select[g * size:(g + 1) * size], reverse=True)[:best])
                             for g in range(groups)])
    allowed[:] = False
    for g in np.argsort(-group_scores, kind="stable")[:topk_groups]:
      allowed[g * size:(g + 1) * size] = True
  chosen = np.array([e for e in np.argsort(-select, kind="stable") if allowed[e]][:k])
  top = gate[chosen]
  return chosen, top / top.sum(), np.sort(group_scores)[::-1]


def moe_reference(layer, cfg, x_BTD, shards=1, ep=1):
  """Per-token loop. Dropless with cfg.expert_buffer_factor: the batch is `shards` contiguous row
  chunks (one per device), and each chunk sends at most ceil(factor x its assignments / ep) of its
  assignments (in token order) to each of the `ep` expert devices (experts split evenly)."""
  x = np.asarray(x_BTD, np.float64).reshape(-1, cfg.d_model)
  router = np.asarray(layer.router[...], np.float64)
  wg, wu, wd = (np.asarray(layer.gate_proj[...], np.float64),
                np.asarray(layer.up_proj[...], np.float64),
                np.asarray(layer.down_proj[...], np.float64))
  N, E, K = x.shape[0], cfg.num_experts, cfg.experts_per_token
  T = x_BTD.shape[1]
  # Capacity per expert per sequence (row), filled in token order.
  cap = (None if cfg.capacity_factor is None
         else min(T, int(np.ceil(cfg.capacity_factor * T * K / E))))
  out = np.zeros_like(x)
  dropped = 0
  chunk = N // shards
  bound = None
  if cfg.expert_buffer_factor is not None:
    bound = min(chunk * K, int(np.ceil(cfg.expert_buffer_factor * chunk * K / ep)))
  for n in range(N):
    if n % T == 0:
      used = np.zeros(E, int)
    if n % chunk == 0:
      sent = np.zeros(ep, int)
    bias = np.asarray(layer.router_bias[...]) if cfg.router == "sigmoid_bias" else None
    chosen, weights, _ = reference_route(x[n] @ router, K, cfg.router, bias, cfg.router_groups,
                                         cfg.router_topk_groups)
    for e, w in zip(chosen, weights):
      if cap is not None and used[e] >= cap:
        dropped += 1
        continue
      dest = e // (E // ep)
      if bound is not None and sent[dest] >= bound:
        dropped += 1
        continue
      used[e] += 1
      sent[dest] += 1
      out[n] += w * swiglu(x[n], wg[e], wu[e], wd[e])
  if cfg.num_shared_experts:
    out += swiglu(x, np.asarray(layer.shared.gate_proj[...]), np.asarray(layer.shared.up_proj[...]),
                  np.asarray(layer.shared.down_proj[...]))
  return out.reshape(x_BTD.shape), dropped / (N * K)


CASES = [
    dict(router="softmax_topk"),
    dict(router="softmax_topk", capacity_factor=1.0),
    dict(router="sigmoid_bias"),
    dict(router="sigmoid_bias", capacity_factor=0.5, num_shared_experts=1, d_ff_expert=12),
    dict(router="softmax_topk", experts_per_token=3, num_shared_experts=2),
    # node-limited routing: the capacity drops still counted exactly
    dict(router="sigmoid_bias", router_groups=4, router_topk_groups=2, capacity_factor=0.5),
]


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_layer_matches_per_token_reference(kw, impl, monkeypatch):
  monkeypatch.setattr(moe_lib, "EXPERT_FFN_IMPL", impl)
  cfg = moe_cfg(**kw)
  layer = make_moe(cfg)
  x_BTD = jax.random.normal(jax.random.key(7), (4, 6, cfg.d_model))
  y_BTD, aux = layer(x_BTD)
  want, want_dropped = moe_reference(layer, cfg, x_BTD)
  np.testing.assert_allclose(np.asarray(y_BTD), want, atol=2e-5, rtol=2e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(want_dropped)
  if cfg.capacity_factor is not None:
    assert want_dropped > 0  # the case really exercises dropping
  assert float(jnp.sum(aux["load"])) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Expert parallelism equals one device


MESHES = [
    (C.MeshConfig(data=1, fsdp=1, expert=8, tensor=1), dict(router="softmax_topk"), "ragged_dot"),
    (C.MeshConfig(data=1, fsdp=1, expert=8, tensor=1),
     dict(router="sigmoid_bias", capacity_factor=1.0), "tiled"),
    (C.MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
     dict(router="softmax_topk", num_shared_experts=1), "ragged_dot"),
    (C.MeshConfig(data=2, fsdp=1, expert=2, tensor=2),
     dict(router="sigmoid_bias", capacity_factor=0.5), "tiled"),
    # node-limited routing, one group of 2 experts per expert device
    (C.MeshConfig(data=2, fsdp=1, expert=4, tensor=1),
     dict(router="softmax_topk", router_groups=4, router_topk_groups=1, capacity_factor=1.0),
     "tiled"),
]


@pytest.mark.parametrize("mesh_cfg,kw,impl", MESHES, ids=[
    "x".join(str(getattr(m, a)) for a in C.MESH_AXES) + "-" + "-".join(map(str, kw.values()))
    + "-" + impl for m, kw, impl in MESHES])
def test_expert_parallel_equals_single_device(mesh_cfg, kw, impl, monkeypatch):
  monkeypatch.setattr(moe_lib, "EXPERT_FFN_IMPL", impl)
  cfg = moe_cfg(**kw)
  layer = make_moe(cfg)
  graphdef, state = nnx.split(layer)
  x_BTD = jax.random.normal(jax.random.key(3), (8, 4, cfg.d_model))

  def loss(state, x_BTD):
    y_BTD, aux = nnx.merge(graphdef, state)(x_BTD)
    return jnp.sum(jnp.sin(y_BTD)), (y_BTD, aux["dropped_fraction"])

  grad_fn = jax.value_and_grad(loss, has_aux=True, argnums=(0, 1))
  (_, (y0, drop0)), (g0, gx0) = jax.jit(grad_fn)(state, x_BTD)  # one device, no mesh

  used = []
  original = moe_lib.moe_expert_parallel
  monkeypatch.setattr(moe_lib, "moe_expert_parallel",
                      lambda *a, **k: used.append(a[0].ep) or original(*a, **k))
  mesh = S.make_mesh(mesh_cfg)
  with S.activate(mesh, mesh_cfg.rules):
    (_, (y1, drop1)), (g1, gx1) = jax.jit(grad_fn)(state, x_BTD)
  assert used == [mesh_cfg.expert]  # the all-to-all path really ran
  if cfg.capacity_factor is not None:
    assert float(drop0) > 0  # the case really exercises dropping
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-5, rtol=1e-5)
  assert float(drop1) == float(drop0)
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), atol=1e-5, rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=1e-5, rtol=1e-4,
                               err_msg=str(path))


@pytest.mark.parametrize("mesh_cfg,factor", [
    (C.MeshConfig(data=1, fsdp=1, expert=8, tensor=1), 2.0),
    (C.MeshConfig(data=2, fsdp=1, expert=2, tensor=2), 0.6),
], ids=["ep8-factor2", "ep2-factor0.6"])
def test_expert_buffer_factor_drops_overflow_like_the_reference(mesh_cfg, factor, monkeypatch):
  """Dropless EP with bounded buffers: each device sends at most ceil(factor x its assignments /
  ep) rows to each expert device; the overflow (in token order) is dropped and counted."""
  monkeypatch.setattr(moe_lib, "EXPERT_FFN_IMPL", "tiled")
  cfg = moe_cfg(router="softmax_topk", expert_buffer_factor=factor)
  layer = make_moe(cfg)
  x_BTD = jax.random.normal(jax.random.key(5), (8, 6, cfg.d_model))
  shards = math.prod(getattr(mesh_cfg, a) for a in ("data", "fsdp", "expert"))
  want, want_dropped = moe_reference(layer, cfg, x_BTD, shards=shards, ep=mesh_cfg.expert)
  assert want_dropped > 0  # the bound really binds
  mesh = S.make_mesh(mesh_cfg)
  with S.activate(mesh, mesh_cfg.rules):
    y_BTD, aux = jax.jit(lambda x: layer(x))(x_BTD)
  np.testing.assert_allclose(np.asarray(y_BTD), want, atol=2e-5, rtol=2e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(want_dropped)


def _all_to_all_shapes(jaxpr) -> list:
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "all_to_all":
      shapes.append(eqn.invars[0].aval.shape)
    for value in eqn.params.values():  # shard_map / pjit / checkpoint bodies
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += _all_to_all_shapes(inner)
  return shapes


@pytest.mark.parametrize("ep", [2, 8])
def test_capacity_send_buffer_is_capacity_factor_times_local_assignments(ep):
  """The all-to-all moves each device's [E, rows, C] slots: E rows C = ~capacity_factor x its
  tokens x k rows whatever ep is (not ep x them, as worst-case buffers would be)."""
  cfg = moe_cfg(capacity_factor=1.25, num_experts=8, experts_per_token=2)
  layer = make_moe(cfg)
  B, T = 8, 16
  mesh_cfg = C.MeshConfig(data=8 // ep, fsdp=1, expert=ep, tensor=1)
  with S.activate(S.make_mesh(mesh_cfg), mesh_cfg.rules):
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(jnp.zeros((B, T, cfg.d_model)))
  shapes = set(_all_to_all_shapes(jaxpr.jaxpr))
  cap = moe_lib.capacity(cfg, T)
  assert cap == 5  # ceil(1.25 x 16 x 2 / 8)
  rows_per_device = B // 8
  assert shapes == {(ep, cfg.num_experts // ep * rows_per_device * cap, cfg.d_model)}
  assert ep * cfg.num_experts // ep * rows_per_device * cap == 40  # 1.25 x 16 tokens x 2


# ------------------------------------------------------------------------------------------------
# Router and aux losses on hand-made logits


LOGITS = np.array([[2.0, 1.0, 0.0, -1.0],
                   [0.0, 3.0, 1.0, 0.5],
                   [1.0, 1.5, 5.0, 0.0],
                   [0.2, 0.1, 0.0, 4.0],
                   [3.0, -2.0, 2.5, 0.0]], np.float32)


def test_softmax_topk_routing_and_losses_match_formulas():
  experts, weights, probs = moe_lib.route(jnp.asarray(LOGITS), 2, "softmax_topk")
  p = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(experts), [[0, 1], [1, 2], [2, 1], [3, 0], [0, 2]])
  top = np.take_along_axis(p, np.asarray(experts), -1)
  np.testing.assert_allclose(np.asarray(weights), top / top.sum(-1, keepdims=True), rtol=1e-6)
  # HF MixtralSparseMoeBlock load_balancing_loss_func for one layer: one-hot per slot.
  one_hot = np.eye(4)[np.asarray(experts)]  # [N, K, E]
  hf = 4 * np.sum(one_hot.mean(0) * p.mean(0)[None, :])
  counts = moe_lib.expert_counts(experts, 4)
  np.testing.assert_array_equal(np.asarray(counts), [3, 3, 3, 1])
  assert float(moe_lib.load_balance_loss(probs, counts)) == pytest.approx(hf, rel=1e-6)
  z = np.log(np.exp(LOGITS).sum(-1))
  assert float(moe_lib.router_z_loss(jnp.asarray(LOGITS))) == pytest.approx(np.mean(z ** 2),
                                                                           rel=1e-6)


def test_balance_loss_is_k_when_balanced():
  # Each token puts equal probability on its two experts; the pairs cover every expert equally.
  logits = np.full((4, 4), -30.0, np.float32)
  for n, pair in enumerate([(0, 1), (2, 3), (0, 2), (1, 3)]):
    logits[n, list(pair)] = 0.0
  experts, _, probs = moe_lib.route(jnp.asarray(logits), 2, "softmax_topk")
  loss = moe_lib.load_balance_loss(probs, moe_lib.expert_counts(experts, 4))
  assert float(loss) == pytest.approx(2.0, rel=1e-5)


def test_sigmoid_bias_selects_with_bias_but_weights_without():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  bias = jnp.asarray([5.0, 4.0, 0.0, 0.0])
  experts, weights, _ = moe_lib.route(logits, 2, "sigmoid_bias", bias)
  np.testing.assert_array_equal(np.asarray(experts), [[0, 1]])
  s = 1 / (1 + np.exp(-np.array([0.0, 1.0])))
  np.testing.assert_allclose(np.asarray(weights), [s / s.sum()], rtol=1e-6)
  new = moe_lib.update_router_bias(bias, jnp.asarray([0.5, 0.3, 0.1, 0.1]), 0.01)
  np.testing.assert_allclose(np.asarray(new), [4.99, 3.99, 0.01, 0.01], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Node-limited (group-limited) routing against reference_route

# Logits drawn from a few values (no pair x, -x: sigmoid(x) + sigmoid(-x) = 1 would tie two
# different pairs only up to rounding) give exact ties between experts and between groups.
TIE_VALUES = np.array([-1.1, -0.4, 0.0, 0.3, 0.7, 1.5, 2.2])


def tied_and_random_logits(n, num_experts, seed):
  rng = np.random.default_rng(seed)
  tied = TIE_VALUES[rng.integers(0, len(TIE_VALUES), (n, num_experts))]
  return np.concatenate([tied, 2 * rng.normal(size=(n, num_experts))]).astype(np.float32)


@pytest.mark.parametrize("router,E,G,M,k", [
    ("softmax_topk", 16, 4, 2, 3), ("softmax_topk", 12, 3, 1, 4),
    ("sigmoid_bias", 16, 4, 2, 4), ("sigmoid_bias", 16, 8, 3, 6),
])
def test_group_limited_routing_matches_the_numpy_reference(router, E, G, M, k):
  logits = tied_and_random_logits(48, E, seed=E + G + k)
  bias = None
  if router == "sigmoid_bias":  # the same pattern in every group, so that groups can still tie
    bias = np.tile(np.random.default_rng(1).choice([-0.25, 0.0, 0.25], E // G), G)
    bias = bias.astype(np.float32)
  route = jax.jit(moe_lib.route, static_argnums=(1, 2, 4, 5))
  experts, weights, probs = route(jnp.asarray(logits), k, router,
                                  None if bias is None else jnp.asarray(bias), G, M)
  experts, weights = np.asarray(experts), np.asarray(weights)
  boundary_ties = changed = 0
  for n in range(logits.shape[0]):
    want, want_w, group_scores = reference_route(logits[n].astype(np.float64), k, router,
                                                 bias, G, M)
    np.testing.assert_array_equal(experts[n], want, err_msg=f"token {n}")
    np.testing.assert_allclose(weights[n], want_w, rtol=2e-6, err_msg=f"token {n}")
    assert len(set(experts[n] // (E // G))) <= M
    boundary_ties += group_scores[M - 1] == group_scores[M]  # the kept/dropped groups tie
    changed += set(reference_route(logits[n].astype(np.float64), k, router, bias)[0]) != set(want)
  assert boundary_ties > 0 and changed > 0  # ties are exercised and the group limit binds
  ungrouped = moe_lib.route(jnp.asarray(logits), k, router,
                            None if bias is None else jnp.asarray(bias))
  np.testing.assert_array_equal(np.asarray(probs), np.asarray(ungrouped[2]))


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_keeping_every_group_is_ungrouped_routing_exactly(router):
  logits = jnp.asarray(tied_and_random_logits(32, 8, seed=3))
  bias = jnp.linspace(-0.3, 0.3, 8) if router == "sigmoid_bias" else None
  want = moe_lib.route(logits, 3, router, bias)
  for groups, kept in ((4, 4), (8, 8), (1, 0)):
    got = moe_lib.route(logits, 3, router, bias, groups, kept)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# Decoder layout, shardings and parameter counts


def abstract_specs(cfg):
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  specs = {"/".join(map(str, p)): tuple(v.get_value())
           for p, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
  return model, state, specs


def test_expert_params_are_sharded_over_the_expert_axis():
  cfg = moe_cfg(router="sigmoid_bias", num_shared_experts=1)
  _, state, specs = abstract_specs(cfg)
  assert specs["blocks/moe/router"] == ("layers", "embed", "experts")
  assert specs["blocks/moe/gate_proj"] == ("layers", "experts", "embed", "mlp")
  assert specs["blocks/moe/up_proj"] == ("layers", "experts", "embed", "mlp")
  assert specs["blocks/moe/down_proj"] == ("layers", "experts", "mlp", "embed")
  assert specs["blocks/moe/router_bias"] == ("layers", "experts")
  assert specs["blocks/moe/shared/gate_proj"] == ("layers", "embed", "mlp")
  assert isinstance(state["blocks"]["moe"]["router_bias"], moe_lib.RouterBias)
  assert not isinstance(state["blocks"]["moe"]["router_bias"], nnx.Param)

  mesh_cfg = C.MeshConfig(data=1, fsdp=2, expert=2, tensor=2)
  mesh = S.make_mesh(mesh_cfg)
  _, abstract, logical = state_lib.abstract_model(lambda r: Decoder(cfg, rngs=r))
  shardings = state_lib.param_shardings(mesh, mesh_cfg.rules, abstract, logical)
  moe = shardings["blocks"]["moe"]
  assert moe["gate_proj"].spec == P(None, "expert", "fsdp", "tensor")
  assert moe["down_proj"].spec == P(None, "expert", "tensor", "fsdp")
  assert moe["router"].spec == P(None, "fsdp", "expert")
  assert moe["router_bias"].spec == P(None, "expert")


COUNT_CASES = [
    dict(), dict(scan_layers=False, router="sigmoid_bias"),
    dict(num_layers=5, first_dense_layers=1, moe_layer_interval=2, num_shared_experts=1,
         d_ff_expert=8),
    dict(num_layers=5, first_dense_layers=1, moe_layer_interval=2, scan_layers=False),
    dict(num_layers=3, first_dense_layers=1, tie_embeddings=True),
]


@pytest.mark.parametrize("kw", COUNT_CASES)
def test_count_params_matches_created(kw):
  cfg = moe_cfg(**kw)
  model, _, _ = abstract_specs(cfg)
  created = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count_params(cfg) == created
  dense = dataclasses.replace(cfg, num_experts=0)
  n_moe = moe_lib.num_moe_layers(cfg)
  D, F, Fe, E, K = cfg.d_model, cfg.d_ff, moe_lib.expert_d_ff(cfg), 8, cfg.experts_per_token
  per_moe_extra = D * E + (cfg.num_shared_experts + K) * 3 * D * Fe - 3 * D * F
  assert count_active_params(cfg) == count_params(dense) + n_moe * per_moe_extra


@pytest.mark.slow
@pytest.mark.parametrize("kw", COUNT_CASES[2:4])
def test_moe_layers_are_placed_and_reported(kw):
  cfg = moe_cfg(**kw)
  want_layers = [i for i in range(cfg.num_layers)
                 if i >= cfg.first_dense_layers
                 and (i - cfg.first_dense_layers + 1) % cfg.moe_layer_interval == 0]
  assert want_layers == [2, 4]
  assert [i for i in range(cfg.num_layers) if moe_lib.is_moe_layer(cfg, i)] == want_layers
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.ones((2, 4), jnp.int32)
  logits, aux = nnx.jit(lambda m, t: m.forward_with_aux(t))(model, tokens)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 4, cfg.vocab_size)
  assert aux["load"].shape == (len(want_layers), 8)
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)),
                                np.asarray(logits))


def test_mixtral_8x7b_counts():
  cfg = C.load_experiment(os.path.join(REPO, "experiments", "mixtral_8x7b.py"))
  C.validate(cfg)
  assert count_params(cfg.model) == 46_702_792_704
  assert count_active_params(cfg.model) == 12_879_925_248


@pytest.mark.parametrize("kw,match", [
    (dict(experts_per_token=9), r"experts_per_token=9 must be in \[1, model.num_experts=8\]"),
    (dict(num_layers=5, moe_layer_interval=2), r"positive multiple of model.moe_layer_interval"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be positive, or None"),
    (dict(router="topk"), r"model.router='topk' is not one of"),
    (dict(router_bias_update_rate=0.1), r"needs model.router='sigmoid_bias'"),
    (dict(expert_buffer_factor=0.0), r"model.expert_buffer_factor=0.0 must be positive"),
    (dict(expert_buffer_factor=1.5, capacity_factor=1.0),
     r"model.expert_buffer_factor=1.5 bounds dropless buffers only"),
    (dict(router_groups=3, router_topk_groups=1), r"router_groups=3 must divide .*num_experts=8"),
    (dict(router_groups=4, router_topk_groups=5), r"router_topk_groups=5 must be in \[1, "),
    (dict(router_groups=4), r"router_topk_groups=0 must be in \[1, model.router_groups=4\]"),
    (dict(router_groups=4, router_topk_groups=1, experts_per_token=3),
     r"experts_per_token=3 exceeds the 2 experts of model.router_topk_groups=1 groups of 2"),
    (dict(router_topk_groups=2), r"router_topk_groups=2 needs model.router_groups > 1"),
    (dict(router_groups=-1), r"router_groups=-1 and model.router_topk_groups=0 must be >= 0"),
    (dict(num_experts=0, router_groups=4, router_topk_groups=2),
     r"router_groups=4 needs an MoE model"),
])
def test_bad_moe_config_is_a_clear_error(kw, match):
  with pytest.raises(C.ConfigError, match=match):
    C.validate(C.Config(model=moe_cfg(**kw)))


def test_experts_must_split_over_the_expert_axis():
  cfg = C.Config(model=moe_cfg(num_experts=6), mesh=C.MeshConfig(fsdp=-1, expert=4),
                 train=C.TrainConfig(global_batch_size=8))
  with pytest.raises(C.ConfigError, match=r"num_experts=6 must be divisible by the 4 devices"):
    C.validate(cfg, 8)


# ------------------------------------------------------------------------------------------------
# Train step: aux losses, router bias update, metrics


def moe_trainer(model: C.ModelConfig, seq_len: int, expert: int, num_steps: int = 4):
  """A trainer of `model` on batches of 8 x seq_len, experts over `expert` devices, fsdp over the
  rest, constant LR 1e-2."""
  cfg = C.Config(model=model, data=C.DataConfig(seq_len=seq_len),
                 mesh=C.MeshConfig(data=1, fsdp=-1, expert=expert),
                 train=C.TrainConfig(global_batch_size=8),
                 optim=C.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
  C.validate(cfg, jax.device_count())
  return build_trainer(cfg, S.make_mesh(cfg.mesh), num_steps=num_steps)


@pytest.mark.slow
def test_train_step_updates_router_bias_from_load_and_reports_metrics():
  model = moe_cfg(router="sigmoid_bias", router_bias_update_rate=0.01, router_z_loss_weight=1e-3,
                  load_balance_loss_weight=1e-2, num_experts=4)
  trainer = moe_trainer(model, seq_len=8, expert=2)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (8, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((8, 8), np.int32),
           "positions": np.tile(np.arange(8, dtype=np.int32), (8, 1))}
  old_bias = np.asarray(state.params["blocks"]["moe"]["router_bias"])
  new_state, metrics = trainer.jit_train_step()(state, batch)
  new_bias = np.asarray(new_state.params["blocks"]["moe"]["router_bias"])
  for layer in range(2):
    load = np.array([metrics[f"moe/layer{layer}/load_{s}"] for s in ("min", "max")])
    assert load[0] <= 1.0 <= load[1]
    step = new_bias[layer] - old_bias[layer]
    assert set(np.round(step / 0.01, 5)) <= {-1.0, 0.0, 1.0}  # sign(mean - load), no decay
    assert float(metrics[f"moe/layer{layer}/router_bias_norm"]) == pytest.approx(
        np.linalg.norm(new_bias[layer]), rel=1e-5)
  assert np.any(new_bias != old_bias)
  for key in ("moe/balance_loss", "moe/z_loss", "moe/dropped_fraction", "moe/load_cv"):
    assert np.isfinite(float(metrics[key])), key
  # total_loss = cross-entropy + the weighted aux losses.
  want = (float(metrics["loss"]) + 1e-3 * float(metrics["moe/z_loss"])
          + 1e-2 * float(metrics["moe/balance_loss"]))
  assert float(metrics["total_loss"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_tiny_moe_trains_from_the_cli(tmp_path):
  workdir = tmp_path / "run"
  env = cli_env()
  proc = subprocess.run(
      [sys.executable, "-m", "mai_jax", "train", "--config",
       os.path.join(REPO, "experiments", "tiny.py") + ":moe_quick", "--workdir", str(workdir),
       "--config.mesh.expert=2", "--config.train.num_steps=12", "--config.train.eval_every=0",
       "--config.checkpoint.every_steps=0"],
      capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses
  last = [r for r in rows if "moe/layer0/load_max" in r][-1]
  for key in ("moe/layer0/load_min", "moe/layer1/load_cv", "moe/layer1/router_bias_norm",
              "moe/dropped_fraction", "moe/balance_loss"):
    assert key in last, sorted(last)


@pytest.mark.slow
def test_decoder_with_remat_and_expert_parallelism_equals_single_device():
  cfg = moe_cfg(num_layers=3, remat="full", num_experts=4, first_dense_layers=1,
                router="sigmoid_bias")
  graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, cfg.vocab_size)

  def loss(state):
    logits, _ = nnx.merge(graphdef, state).forward_with_aux(tokens)
    return jnp.sum(jnp.sin(logits)), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, logits0), grads0 = grad_fn(state)
  mesh_cfg = C.MeshConfig(data=1, fsdp=2, expert=4, tensor=1)
  with S.activate(S.make_mesh(mesh_cfg), mesh_cfg.rules):
    (_, logits1), grads1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits0), atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def test_softmax_topk_layer_matches_transformers_mixtral_block():
  torch = pytest.importorskip("torch")
  modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  from transformers import MixtralConfig
  cfg = moe_cfg()
  hf = modeling.MixtralSparseMoeBlock(MixtralConfig(
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_local_experts=cfg.num_experts,
      num_experts_per_tok=cfg.experts_per_token)).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0, 0.5)
  layer = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
  F = cfg.d_ff
  gate_up = hf.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
  layer.router[...] = jnp.asarray(hf.gate.weight.detach().numpy().T)
  layer.gate_proj[...] = jnp.asarray(np.swapaxes(gate_up[:, :F], 1, 2))
  layer.up_proj[...] = jnp.asarray(np.swapaxes(gate_up[:, F:], 1, 2))
  layer.down_proj[...] = jnp.asarray(np.swapaxes(hf.experts.down_proj.detach().numpy(), 1, 2))
  x = np.random.default_rng(0).normal(size=(2, 5, cfg.d_model)).astype(np.float32)
  with torch.no_grad():
    out = hf(torch.from_numpy(x))
  want = (out[0] if isinstance(out, tuple) else out).numpy()
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))[0]), want, atol=1e-4, rtol=1e-4)
