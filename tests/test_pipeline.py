"""Pipeline parallelism: the pipelined loss and every gradient equal the plain (stage=1) step's.

The reference is the same model and parameters run without pipeline stages on the same 8 devices
(fsdp x tensor); the pipelined runs put 2 or 4 stages on the 'stage' axis with fsdp/tensor on the
rest, GPipe (repeats 1) and circular (repeats 2), with M = S and 2S pipeline microbatches, on
packed documents (segment ids) with padding, and z-loss on.
"""

import dataclasses
import re

import jax
import numpy as np
import optax
import pytest
import hlo_graph
from flax import nnx

from mai_jax import config as C, sharding as S
from mai_jax.model import Decoder, pipeline
from mai_jax.train import step as step_lib
from mai_jax.train import state as state_lib
from mai_jax.train.trainer import build_trainer

MODEL = C.ModelConfig(num_layers=8, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="full")
# MoE: every block routed (4 experts, top 2, dropless), router z-loss and balance loss on.
MOE = dict(num_experts=4, experts_per_token=2, d_ff_expert=32, router_z_loss_weight=1e-2,
           load_balance_loss_weight=1e-1)
ROWS, SEQ = 16, 16


def _cfg(mesh: C.MeshConfig, **model) -> C.Config:
  return C.Config(model=dataclasses.replace(MODEL, **model), mesh=mesh,
                  data=C.DataConfig(seq_len=SEQ),
                  train=C.TrainConfig(global_batch_size=ROWS, z_loss_weight=1e-3))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, (ROWS, SEQ + 1)).astype(np.int32)
  seg = np.ones((ROWS, SEQ), np.int32)
  seg[:, 13:] = 0  # trailing padding
  seg[::2, 6:13] = 2  # even rows pack a second document
  pos = np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1))
  pos[::2, 6:] -= 6
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos}


def _grad_fn(cfg: C.Config, model_spec):
  grad_fn = jax.value_and_grad(step_lib.summed_loss, has_aux=True)

  def loss_and_grads(params, batch):
    (loss, (_, _, moe, _)), grads = grad_fn(params, batch, model_spec, cfg.train.z_loss_weight)
    return loss, grads, moe
  return jax.jit(loss_and_grads)


_FLOPS = {}  # per-device FLOPs of each compiled step (XLA's cost analysis), by config


def _pipelined_loss_and_grads(cfg: C.Config, host_params):
  """(loss, grads, MoE statistics) of summed_loss on cfg's mesh, the params and batch in their
  shardings; and the compiled HLO text."""
  mesh = S.make_mesh(cfg.mesh)
  layout = state_lib.make_layout(cfg, mesh, lambda r: Decoder(cfg.model, rngs=r),
                                 optax.identity())
  params = jax.device_put(host_params, layout.shardings.params)
  batch_sharding = step_lib.batch_sharding(mesh, cfg)
  batch = {k: jax.device_put(v, batch_sharding) for k, v in _batch().items()}
  with S.activate(mesh, cfg.mesh.rules):
    compiled = _grad_fn(cfg, layout.model_spec).lower(params, batch).compile()
    loss, grads, moe = compiled(params, batch)
  cost = compiled.cost_analysis()
  _FLOPS[cfg] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  return (float(loss), jax.device_get(grads), jax.device_get(moe)), compiled.as_text()


def collectives_in_loops(hlo: str, op: str) -> tuple[int, int]:
  """(count inside while-loop bodies, count elsewhere) of collective `op` (e.g. 'all-gather') in
  compiled HLO: what runs per scan iteration vs once per step."""
  comps = hlo_graph.computations(hlo)
  todo = [b for lines in comps.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)]
  looped = set()
  while todo:
    name = todo.pop()
    if name in looped or name not in comps:
      continue
    looped.add(name)
    for line in comps[name]:
      todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
  def count(names):
    return sum(len(re.findall(rf"\s{op}(?:-start)?\(", line)) for n in names for line in comps[n])
  return count(looped), count(set(comps) - looped)


_REFERENCES = {}


def _reference(kind: str):
  """(params, loss, grads, MoE statistics) of the plain `kind` model ('dense' or 'moe') on one
  device (no mesh, no pipeline, no expert parallelism); computed once per module."""
  if kind not in _REFERENCES:
    cfg = _cfg(C.MeshConfig(), remat="none", **(MOE if kind == "moe" else {}))
    params = jax.device_get(jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(Decoder(cfg.model, rngs=nnx.Rngs(0)))))())
    spec = state_lib.abstract_model(lambda r: Decoder(cfg.model, rngs=r))[0]
    _REFERENCES[kind] = (params,) + jax.device_get(_grad_fn(cfg, spec)(params, _batch()))
  return _REFERENCES[kind]


@pytest.fixture(scope="module")
def reference():
  return _reference("dense")


def _assert_close(got, want):
  loss, grads, moe = got
  want_loss, want_grads, want_moe = want
  assert loss == pytest.approx(float(want_loss), rel=1e-5)
  flat_got = jax.tree_util.tree_leaves_with_path(grads)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  assert len(flat_got) == len(flat_want)
  for path, g in flat_got:
    w = flat_want[path]
    err = np.linalg.norm(np.asarray(g, np.float64) - w) / max(np.linalg.norm(w), 1e-30)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)
  assert set(moe) == set(want_moe)
  for key, value in want_moe.items():  # per-layer router statistics of the whole batch
    np.testing.assert_allclose(moe[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


# (model, stage, repeats, pipeline microbatches, remaining mesh, remat). Together the cases cover
# stage {2, 4} x repeats {1, 2} x microbatches {S, 2S}, dense and MoE (experts sharded over
# 'expert' inside a stage), fsdp and tensor beside the stages, remat none / full / dots; every
# case runs packed documents with padding and z-loss (MoE: router z-loss and balance loss too).
# Six cases, each a new compile of the pipelined step (the suite's time budget): the other
# pipeline tests add stage 2 x fsdp 4, the no-stage-checkpoint step and sequence parallelism.
CASES = [
    ("dense", 2, 2, 4, dict(fsdp=2, tensor=2), "full"),  # circular, M = 2S, fsdp x tensor
]
SLOW_CASES = [
    ("moe", 2, 1, 2, dict(fsdp=2, expert=2), "full"),  # GPipe, M = S, EP inside a stage
    ("dense", 4, 1, 4, dict(fsdp=2), "none"),  # GPipe, M = S
    ("dense", 4, 2, 8, dict(fsdp=2), "dots"),  # circular, stage 4, M = 2S
    ("moe", 2, 2, 4, dict(expert=2, tensor=2), "full"),  # circular MoE, EP x tensor
    ("moe", 4, 1, 8, dict(fsdp=1, tensor=2), "none"),  # MoE without EP, M = 2S
]


@pytest.mark.parametrize("kind,stage,repeats,micro,mesh,remat", CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_pipelined_loss_and_grads_equal_the_plain_step(kind, stage, repeats, micro, mesh, remat):
  ref = _reference(kind)
  cfg = _cfg(C.MeshConfig(stage=stage, **mesh), pipeline_repeats=repeats,
             pipeline_microbatches=micro, remat=remat, **(MOE if kind == "moe" else {}))
  C.validate(cfg, 8)
  got, hlo = _pipelined_loss_and_grads(cfg, ref[0])
  _assert_close(got, ref[1:])
  # Dense: the weights are gathered once per step, not in the iteration scan (MoE's dispatch
  # gathers routing indices per iteration, so its count would not isolate the weights).
  if kind == "dense" and mesh.get("fsdp", 1) > 1:
    inside, outside = collectives_in_loops(hlo, "all-gather")
    assert inside == 0 and outside > 0, (inside, outside)


FAST_CASE_CFG = dict(mesh=C.MeshConfig(stage=2, fsdp=2, tensor=2), pipeline_repeats=2,
                     pipeline_microbatches=4, remat="full")


def test_without_the_stage_checkpoint_the_step_is_equal_and_recomputes_less(reference):
  """model.pipeline_stage_remat=False with remat 'dots': the blocks' projections are saved, so
  the backward recomputes no GEMM (the stage checkpoint over 'full' blocks recomputes each twice);
  same loss and gradients. XLA's cost analysis (loop bodies counted once) gives 0.76 of the
  checkpointed step's FLOPs; 0.85 with a shape-based 'dots' policy, which saves nothing under the
  stages' vmap (every dot there has a batch dimension)."""
  plain = _cfg(**FAST_CASE_CFG)
  if plain not in _FLOPS:
    _pipelined_loss_and_grads(plain, reference[0])
  cfg = dataclasses.replace(plain, model=dataclasses.replace(
      plain.model, pipeline_stage_remat=False, remat="dots"))
  got, _ = _pipelined_loss_and_grads(cfg, reference[0])
  _assert_close(got, reference[1:])
  assert _FLOPS[cfg] < 0.8 * _FLOPS[plain], (_FLOPS[cfg], _FLOPS[plain])


def test_the_stages_split_the_rows_for_the_output_layer(reference):
  """After the schedule the logits are sharded over 'stage' too (each stage scores 1/S of the
  rows, not all of them); a batch the stages do not divide keeps the plain batch sharding."""
  cfg = _cfg(C.MeshConfig(stage=2, fsdp=4), pipeline_microbatches=2)
  mesh = S.make_mesh(cfg.mesh)
  with S.activate(mesh, cfg.mesh.rules):
    graphdef, state = nnx.split(Decoder(cfg.model, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    logits = forward(state, _batch()["inputs"])
    assert logits.sharding.spec[0] == ("fsdp", "stage"), logits.sharding.spec
    odd = forward(state, _batch()["inputs"][:4])  # 4 rows: fsdp x stage (8) do not divide them
    assert odd.sharding.spec[0] == "fsdp", odd.sharding.spec


@pytest.mark.slow
def test_without_gather_once_fsdp_gathers_the_weights_in_every_iteration(reference):
  """The counter's negative control: model.pipeline_gather_once=False leaves the FSDP
  all-gathers inside the iteration scan (same values)."""
  cfg = _cfg(C.MeshConfig(stage=2, fsdp=4), pipeline_microbatches=4, pipeline_gather_once=False)
  got, hlo = _pipelined_loss_and_grads(cfg, reference[0])
  _assert_close(got, reference[1:])
  assert collectives_in_loops(hlo, "all-gather")[0] > 0


def _error(cfg: C.Config) -> str:
  with pytest.raises(C.ConfigError) as info:
    C.validate(cfg, 8)
  return str(info.value)


@pytest.mark.parametrize("changes,message", [
    (dict(stage=4, fsdp=2, pipeline_repeats=4), "num_layers=8 must be divisible by mesh.stage=4 x "
                                                "model.pipeline_repeats=4"),
    (dict(stage=4, fsdp=2, pipeline_microbatches=2), "pipeline_microbatches=2 must be >= "
                                                     "mesh.stage=4"),
    (dict(stage=2, fsdp=4, pipeline_microbatches=8), "16 rows must split into "
                                                     "model.pipeline_microbatches=8"),
    (dict(stage=2, fsdp=4, scan_layers=False), "needs model.scan_layers=True"),
    (dict(stage=4, fsdp=2, num_experts=4, first_dense_layers=2, moe_layer_interval=2),
     "gives 3 MoE block groups (after first_dense_layers=2, moe_layer_interval=2), which must "
     "be divisible by mesh.stage=4"),
    (dict(stage=1, fsdp=8, pipeline_repeats=0), "model.pipeline_repeats=0 must be >= 1"),
])
def test_bad_pipeline_configs_are_one_line_errors(changes, message):
  mesh = {k: changes.pop(k) for k in ("stage", "fsdp")}
  message_got = _error(_cfg(C.MeshConfig(**mesh), **changes))
  assert message in message_got and "\n" not in message_got


def test_layers_must_map_to_stage_alone():
  rules = tuple((n, ("stage",) if n == "batch" else a) for n, a in C.DEFAULT_RULES)
  assert "map 'layers' (and nothing else) to 'stage'" in _error(
      _cfg(C.MeshConfig(stage=2, fsdp=4, rules=rules)))


def test_the_stage_axis_sits_outside_fsdp_and_shards_the_layers():
  cfg = _cfg(C.MeshConfig(data=1, stage=2, fsdp=2, tensor=2))
  mesh = S.make_mesh(cfg.mesh)
  assert mesh.axis_names == ("data", "stage", "fsdp", "expert", "tensor")
  abstract = build_trainer(cfg, mesh).layout.shardings.params
  assert abstract["blocks"]["mlp"]["gate_proj"].spec == jax.sharding.PartitionSpec(
      "stage", "fsdp", "tensor")
  assert abstract["embed"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_bubble_fraction():
  assert pipeline.bubble_fraction(4, 1, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)


def _trainer_and_state(mesh_cfg: C.MeshConfig, host_params, **model):
  cfg = dataclasses.replace(_cfg(mesh_cfg, **model), train=C.TrainConfig(
      global_batch_size=ROWS, microbatches=2, z_loss_weight=1e-3))
  cfg = dataclasses.replace(cfg, optim=C.OptimConfig(learning_rate=1e-3, warmup_steps=0,
                                                     schedule="constant"))
  C.validate(cfg, 8)
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  params = jax.device_put(host_params, trainer.layout.shardings.params)
  return cfg, mesh, trainer, trainer.init_state_from_params(params)


def _train(mesh_cfg, host_params, steps, **model):
  cfg, mesh, trainer, state = _trainer_and_state(mesh_cfg, host_params, **model)
  fn = trainer.jit_train_step()
  batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in _batch().items()}
  losses = []
  with S.activate(mesh, cfg.mesh.rules):
    for _ in range(steps):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["total_loss"]))
  return trainer, state, losses


def _leaves_named(tree, *parts):
  """Leaves whose key path contains every one of `parts`."""
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
          if all(p in jax.tree_util.keystr(path) for p in parts)]


def test_zero1_splits_the_moments_over_data_not_the_weights():
  """mesh.zero1: Adam's moments gain 'data' in their sharding, the weights do not (that the
  training is unchanged is checked in the slow pipelined accumulation test below)."""
  for zero1 in (False, True):
    cfg = _cfg(C.MeshConfig(data=2, stage=2, tensor=2, zero1=zero1))
    C.validate(cfg, 8)
    shardings = build_trainer(cfg, S.make_mesh(cfg.mesh)).layout.shardings
    mu, = _leaves_named(shardings.opt_state, ".mu", "down_proj")
    weight = shardings.params["blocks"]["mlp"]["down_proj"]
    assert "data" not in jax.tree.leaves(tuple(weight.spec))
    assert ("data" in jax.tree.leaves(tuple(mu.spec))) == zero1, mu.spec


def test_zero1_sharding_adds_data_to_the_first_dim_it_divides():
  mesh = S.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=2))
  P = jax.sharding.PartitionSpec
  def spec(shape, *entries):
    return tuple(state_lib.zero1_sharding(jax.sharding.NamedSharding(mesh, P(*entries)),
                                          shape).spec)
  assert spec((8, 6), "fsdp", "tensor") == (("data", "fsdp"), "tensor")
  assert spec((2, 6), "fsdp", None) == ("fsdp", "data")  # 2 rows do not split 4 ways
  assert spec((3, 5), None, None) == (None, None)  # nothing divides: unchanged
  assert spec((8,), "data") == ("data",)


@pytest.mark.slow
def test_pipelined_train_steps_with_accumulation_match_and_checkpoints_move_to_stage_1(
    reference, tmp_path):
  """Two optimizer steps (2 accumulation microbatches, each pipelined; ZeRO-1 moments over data)
  match the plain run; the stage=2 state, saved, restores on stage=1 (and on stage=2) with exactly the same values."""
  from mai_jax import checkpoint as checkpoint_lib
  params = reference[0]
  piped_trainer, piped, piped_losses = _train(C.MeshConfig(stage=2, data=2, tensor=2, zero1=True),
                                              params, 2,
                                              pipeline_repeats=2)
  _, plain, plain_losses = _train(C.MeshConfig(fsdp=4, tensor=2), params, 2)
  np.testing.assert_allclose(piped_losses, plain_losses, rtol=1e-5)
  # Adam moves a weight by ~lr x sign(g) where g is tiny, so float rounding in g may show at
  # the lr / 100 level on single elements; the gradients themselves match to 1e-5 (tests above).
  for a, b in zip(jax.tree.leaves(jax.device_get(piped.params)),
                  jax.tree.leaves(jax.device_get(plain.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), C.CheckpointConfig())
  ckpt.save(2, piped, {}, {}, {})
  ckpt.wait()
  want = jax.tree.leaves(jax.device_get(piped))
  for mesh_cfg in (C.MeshConfig(fsdp=8), C.MeshConfig(stage=2, fsdp=2, tensor=2)):
    _, _, trainer, _ = _trainer_and_state(mesh_cfg, params)
    restored, _, _ = ckpt.restore(2, trainer.abstract_state())
    assert restored.params["blocks"]["attn"]["q_proj"].sharding == (
        trainer.layout.shardings.params["blocks"]["attn"]["q_proj"])
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), want):
      np.testing.assert_array_equal(a, b)
  ckpt.close()


@pytest.mark.parametrize("stages,repeats", [(2, 2), (2, 3), (3, 2), (4, 2), (4, 5), (3, 7)])
def test_circular_regrouping_routes_every_layer_to_its_virtual_stage(stages, repeats):
  """NumPy replay of _regroup_for_repeats' all_to_all: device d ends with the layers of virtual
  stages d, S + d, ... in repeat order, taken from the contiguous canonical shards."""
  send_q, recv_src, recv_slot = pipeline._regroup_tables(stages, repeats)
  lc = 2
  layers = np.arange(stages * repeats * lc)
  shards = layers.reshape(stages, repeats, lc)  # device s: its canonical block, as R groups
  sent = shards[np.arange(stages)[:, None, None], send_q]  # [from, to, slot, Lc]
  got = np.stack([sent[recv_src[d], d, recv_slot[d]] for d in range(stages)], axis=1)
  np.testing.assert_array_equal(got, layers.reshape(repeats, stages, lc))


def test_hosts_of_one_data_parallel_group_load_the_same_rows():
  """Stages across hosts hold the same batch rows (the batch is replicated over 'stage'), so
  those hosts load the same rows; data-parallel groups still split them."""
  from mai_jax.data import streams
  def rows(mesh, processes):
    cfg = C.Config(mesh=mesh, train=C.TrainConfig(global_batch_size=8))
    return [streams._rows_by_mesh(cfg, p, processes, 8) for p in range(processes)]
  assert rows(C.MeshConfig(stage=2, fsdp=4), 2) == [(0, 8), (0, 8)]
  assert rows(C.MeshConfig(data=2, stage=2, fsdp=2), 4) == [(0, 4), (0, 4), (4, 8), (4, 8)]
  assert rows(C.MeshConfig(fsdp=8), 2) == [(0, 4), (4, 8)]  # as the equal split
