"""Parameters are born sharded as the rules say: pure FSDP and FSDP x tensor; activations too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mai_jax import config as C, sharding as S
from mai_jax.train.trainer import build_trainer

SMALL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=128, compute_dtype="float32", remat="none")


def _init(mesh_cfg):
  cfg = C.Config(model=SMALL, mesh=mesh_cfg)
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  return mesh, trainer.layout, trainer.init_state()


def _specs(tree):
  return jax.tree.map(lambda x: x.sharding.spec, tree)


def test_pure_fsdp_shards_the_embed_dimension_over_all_devices():
  mesh, _, state = _init(C.MeshConfig(fsdp=-1))
  assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 8, "expert": 1,
                               "tensor": 1}
  p = _specs(state.params)
  assert p["blocks"]["attn"]["q_proj"] == P(None, "fsdp", None, None)  # [L, D, H, K]
  assert p["blocks"]["attn"]["o_proj"] == P(None, None, None, "fsdp")  # [L, H, K, D]
  assert p["blocks"]["mlp"]["gate_proj"] == P(None, "fsdp", None)     # [L, D, F]
  assert p["blocks"]["mlp"]["down_proj"] == P(None, None, "fsdp")     # [L, F, D]
  assert p["embed"]["embedding"] == P(None, "fsdp")                   # [V, D]
  assert p["unembed"] == P("fsdp", None)                              # [D, V]
  assert p["final_norm"]["scale"] == P(None)
  # Each device holds 1/8 of a sharded parameter, never the whole thing.
  q = state.params["blocks"]["attn"]["q_proj"]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 4, 4, 8)}


def test_fsdp_by_tensor_shards_heads_mlp_and_vocab_over_tensor():
  _, _, state = _init(C.MeshConfig(fsdp=-1, tensor=2))
  p = _specs(state.params)
  assert p["blocks"]["attn"]["q_proj"] == P(None, "fsdp", "tensor", None)
  assert p["blocks"]["attn"]["k_proj"] == P(None, "fsdp", "tensor", None)
  assert p["blocks"]["attn"]["o_proj"] == P(None, "tensor", None, "fsdp")
  assert p["blocks"]["mlp"]["up_proj"] == P(None, "fsdp", "tensor")
  assert p["blocks"]["mlp"]["down_proj"] == P(None, "tensor", "fsdp")
  assert p["embed"]["embedding"] == P("tensor", "fsdp")
  assert p["unembed"] == P("fsdp", "tensor")


def test_optimizer_moments_are_sharded_like_their_parameters():
  _, _, state = _init(C.MeshConfig(fsdp=-1, tensor=2))
  adam = state.opt_state[1][0]
  assert _specs(adam.mu) == _specs(state.params)
  assert _specs(adam.nu) == _specs(state.params)
  assert adam.count.sharding.spec == P()


def test_custom_rules_move_sharding_without_model_changes():
  rules = tuple((name, ("data",) if name == "mlp" else axes) for name, axes in C.DEFAULT_RULES)
  rules = tuple((n, ("fsdp",) if n == "batch" else a) for n, a in rules)
  _, _, state = _init(C.MeshConfig(data=2, fsdp=4, rules=rules))
  assert _specs(state.params)["blocks"]["mlp"]["gate_proj"] == P(None, "fsdp", "data")


def test_activation_spec_gives_each_mesh_axis_to_the_first_dimension_that_asks():
  mesh = S.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = C.DEFAULT_RULES
  assert S.logical_to_spec(("batch", "seq", "embed"), rules, mesh, (8, 4, 16)) == \
      P(("data", "fsdp"), None, None)
  assert S.logical_to_spec(("embed", "mlp"), rules, mesh, (16, 32)) == P("fsdp", "tensor")
  # A dimension the mesh does not divide stays replicated (batch of 1 when sampling).
  assert S.logical_to_spec(("batch", "seq"), rules, mesh, (1, 4)) == P(None, None)
  with pytest.raises(KeyError, match="logical axis 'nope' has no rule"):
    S.logical_to_spec(("nope",), rules)


def test_shard_act_constrains_inside_jit_and_is_a_noop_without_mesh():
  x = jnp.ones((8, 4, 16))
  assert S.shard_act(x, ("batch", "seq", "mlp")) is x
  mesh = S.make_mesh(C.MeshConfig(fsdp=-1, tensor=2))
  with S.activate(mesh, C.DEFAULT_RULES):
    y = jax.jit(lambda a: S.shard_act(a * 2, ("batch", "seq", "mlp")))(x)
  assert y.sharding.spec == P("fsdp", None, "tensor")


def test_a_tensor_axis_spanning_processes_is_refused():
  from types import SimpleNamespace
  fake = lambda p: SimpleNamespace(process_index=p)  # noqa: E731
  inside = np.array([[[[fake(0), fake(0)]]], [[[fake(1), fake(1)]]]], dtype=object)
  S._check_tensor_within_process(SimpleNamespace(devices=inside, shape={"tensor": 2}))
  across = np.array([[[[fake(0), fake(1)]]], [[[fake(0), fake(1)]]]], dtype=object)
  with pytest.raises(C.ConfigError, match="mesh.tensor=2 spans several processes"):
    S._check_tensor_within_process(SimpleNamespace(devices=across, shape={"tensor": 2}))
