"""model.moe_overlap_halves: the MoE layer split into two halves of every device's rows computes
what the unsplit layer does (outputs, gradients, router statistics; the bounded dropless buffers
per half against the per-token reference), its compiled program keeps the halves' all-to-alls
independent of the other half's compute, and decoding a single row still works."""

import dataclasses

import hlo_graph
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_moe import make_moe, moe_cfg, moe_reference

from mai_jax import config as C, sample, sharding as S
from mai_jax.model import Decoder
from mai_jax.model import moe as moe_lib

MESH = C.MeshConfig(data=2, fsdp=1, expert=4, tensor=1)  # batch over 8 devices, experts over 4
ROWS, SEQ = 16, 4  # 2 rows per device: a half is one row (one capacity group) per device
CASES = {
    "capacity": (dict(router="softmax_topk", capacity_factor=1.0, num_shared_experts=1),
                 "ragged_dot"),
    "dropless": (dict(router="sigmoid_bias", num_shared_experts=1), "ragged_dot"),
}


def compiled_grad(cfg, state, x_BTD, mesh=MESH):
  """jit(value_and_grad) of sum(sin(y)) compiled under `mesh` -> (executable, its HLO text)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: moe_lib.MoE(cfg, rngs=nnx.Rngs(0))))

  def loss(state, x_BTD):
    y_BTD, aux = nnx.merge(graphdef, state)(x_BTD)
    return jnp.sum(jnp.sin(y_BTD)), (y_BTD, aux)

  with S.activate(S.make_mesh(mesh), mesh.rules):
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True, argnums=(0, 1))).lower(
        state, x_BTD).compile()
  return compiled, compiled.as_text()


# capacity in the fast suite, dropless (4 more compiles) in the slow one
@pytest.fixture(scope="module", params=["capacity",
                                        pytest.param("dropless", marks=pytest.mark.slow)])
def runs(request):
  """{False: (results, hlo), True: (results, hlo)} of one case, the halves off and on."""
  kw, impl = CASES[request.param]
  old, moe_lib.EXPERT_FFN_IMPL = moe_lib.EXPERT_FFN_IMPL, impl
  try:
    cfg = moe_cfg(**kw)
    state = nnx.state(make_moe(cfg))
    x_BTD = jax.random.normal(jax.random.key(3), (ROWS, SEQ, cfg.d_model))
    out = {}
    for on in (False, True):
      compiled, hlo = compiled_grad(dataclasses.replace(cfg, moe_overlap_halves=on), state, x_BTD)
      out[on] = (jax.device_get(compiled(state, x_BTD)), hlo)
  finally:
    moe_lib.EXPERT_FFN_IMPL = old
  return request.param, out


def _close(got, want, what):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want))),
                             err_msg=what)


def test_halves_equal_the_unsplit_layer(runs):
  case, out = runs
  ((_, (y0, aux0)), (g0, gx0)), ((_, (y1, aux1)), (g1, gx1)) = out[False][0], out[True][0]
  _close(y1, y0, "y")
  _close(gx1, gx0, "dx")
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    _close(b[...], a[...], str(path))
  assert set(aux1) == set(aux0)
  for key in aux0:
    _close(aux1[key], aux0[key], key)
  if case == "capacity":
    assert float(aux0["dropped_fraction"]) > 0  # capacity per row: splitting rows drops the same


def _all_to_alls(graph):
  return [(comp, ins) for comp, instrs in graph.items() for ins in instrs.values()
          if ins.opcode == "all-to-all"]


def _half(op_name: str) -> int:
  return int(op_name.split(moe_lib.HALF_SCOPE)[1][0])


def cross_half_dependencies(hlo: str) -> tuple[list, dict]:
  """-> (violations, the halves' all-to-all counts). A forward all-to-all of half h may depend
  on no all-to-all and no matrix product of the other half and on no unnamed product; a backward
  one (transpose in its op name: the whole forward precedes it) on no backward all-to-all and no
  backward product of the other half (its unnamed products, if XLA renamed any, depend on those
  all-to-alls)."""
  graph = hlo_graph.parse(hlo)
  violations, counts = [], {0: 0, 1: 0}
  for comp, a2a in _all_to_alls(graph):
    h = _half(a2a.op_name)
    counts[h] += 1
    backward = "transpose(" in a2a.op_name
    other = f"{moe_lib.HALF_SCOPE}{1 - h}"
    if backward:
      other = f"transpose(jvp({other}))"
    for name in hlo_graph.ancestors(graph[comp], a2a.name):
      ins = graph[comp][name]
      names = hlo_graph.dot_names(graph, ins)
      if ins.opcode == "all-to-all" and other in ins.op_name:
        names.append(ins.op_name)
      violations += [(a2a.op_name, "waits for", name, n)
                     for n in names if other in n or (not n and not backward)]
  return violations, counts


def test_each_halfs_all_to_alls_are_independent_of_the_other_halfs_compute(runs):
  _, out = runs
  unsplit = len(_all_to_alls(hlo_graph.parse(out[False][1])))
  violations, counts = cross_half_dependencies(out[True][1])
  assert unsplit > 0 and counts == {0: unsplit, 1: unsplit}  # each half its own dispatch/combine
  assert violations == []
  # The walker sees through fusions and loops: every all-to-all waits for its own half's products
  # (the router's for the first dispatch), and the shared expert's forward waits for none.
  graph = hlo_graph.parse(out[True][1])
  for comp, a2a in _all_to_alls(graph):
    own = f"{moe_lib.HALF_SCOPE}{_half(a2a.op_name)}"
    assert any(own in n for a in hlo_graph.ancestors(graph[comp], a2a.name)
               for n in hlo_graph.dot_names(graph, graph[comp][a]))
  shared = [(instrs, ins) for instrs in graph.values() for ins in instrs.values()
            if ins.opcode == "dot" and ins.op_name.startswith("jit(loss)/jvp(btd,df->btf)")]
  assert shared
  for instrs, ins in shared:
    assert all(instrs[a].opcode != "all-to-all" for a in hlo_graph.ancestors(instrs, ins.name))


def test_the_walker_flags_an_all_to_all_that_waits_for_the_other_halfs_product():
  """The check can fail: half 1's all-to-all here sends half 0's matmul output."""
  mesh = jax.make_mesh((8,), ("x",))

  def body(a_ND, w_DD):
    with jax.named_scope(f"{moe_lib.HALF_SCOPE}0"):
      y0 = jax.lax.all_to_all(a_ND @ w_DD, "x", 0, 0, tiled=True)
    with jax.named_scope(f"{moe_lib.HALF_SCOPE}1"):
      y1 = jax.lax.all_to_all(y0 @ w_DD, "x", 0, 0, tiled=True)
    return y0 + y1

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x")))
  a_ND = jax.device_put(jnp.ones((64, 8)), jax.NamedSharding(mesh, P("x")))
  hlo = fn.lower(a_ND, jnp.ones((8, 8))).compile().as_text()
  violations, counts = cross_half_dependencies(hlo)
  assert counts == {0: 1, 1: 1}
  assert violations and {_half(v[0]) for v in violations} == {1}  # only half 1 waits


def test_bounded_dropless_buffers_apply_per_half(monkeypatch):
  """expert_buffer_factor with halves: each half's buffer is ceil(factor x its assignments / ep)
  rows, i.e. the per-token reference with every device's rows counted as two chunks."""
  monkeypatch.setattr(moe_lib, "EXPERT_FFN_IMPL", "ragged_dot")
  cfg = moe_cfg(router="softmax_topk", expert_buffer_factor=1.0, moe_overlap_halves=True)
  layer = make_moe(cfg)
  x_BTD = jax.random.normal(jax.random.key(5), (ROWS, 6, cfg.d_model))
  want, want_dropped = moe_reference(layer, cfg, x_BTD, shards=2 * 8, ep=MESH.expert)
  assert want_dropped > 0  # the bound really binds
  with S.activate(S.make_mesh(MESH), MESH.rules):
    y_BTD, aux = jax.jit(lambda x: layer(x))(x_BTD)
  np.testing.assert_allclose(np.asarray(y_BTD), want, atol=2e-5, rtol=2e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(want_dropped)


def test_decoding_one_row_runs_unsplit_with_the_option_on():
  """A local batch of one row (decoding a prompt, or 8 rows on 8 batch devices) cannot be halved,
  so the layer runs unsplit (the unsplit layer's code) and a KV-cache decode step works."""
  assert moe_lib.overlap_shards(1) is None and moe_lib.overlap_shards(2) == 1  # no mesh
  with S.activate(S.make_mesh(MESH), MESH.rules):
    assert moe_lib.overlap_shards(ROWS) == 8 and moe_lib.overlap_shards(8) is None
  cfg = moe_cfg(num_shared_experts=1, moe_overlap_halves=True)
  model = nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))()  # one compile, not one per init op
  # a one-token prompt: its prefill is a [1, 1] decode step on the KV cache (one compile)
  new = sample.generate(model, [[3]], sample.SamplingConfig(1, temperature=0), eos_id=None)
  assert len(new[0]) == 1 and 0 <= new[0][0] < cfg.vocab_size
