"""Big experiment configs: published parameter counts exact from the shapes, layouts that validate
on their target GPU count and, scaled down, on the 8 test devices."""

import math
import os

import jax
import pytest

from mai_jax import config as C
from mai_jax import plan as P
from mai_jax.model.transformer import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(REPO, "experiments")

# Published totals (8B: Llama 3 model card; 70B: Llama 2 release) and, for 405B and MAI-1, the
# count the published / documented shape gives, computed by hand below.
PUBLISHED = {
    "llama3_8b.py": 8_030_261_248,
    "llama2_70b.py": 68_976_648_192,
    "llama3_405b.py": 405_853_388_800,
    "mai1_500b.py": 498_589_747_200,
}


def hand_count(L, D, H, KV, K, F, V):
  """Llama decoder, untied: per layer q,o (D x H K) + k,v (D x KV K) + SwiGLU 3 D F + 2 norms;
  embedding and unembedding V x D each; final norm D."""
  return L * (2 * D * H * K + 2 * D * KV * K + 3 * D * F + 2 * D) + 2 * V * D + D


def test_hand_counts_match_the_published_numbers():
  assert hand_count(32, 4096, 32, 8, 128, 14336, 128256) == 8_030_261_248
  assert hand_count(80, 8192, 64, 8, 128, 28672, 32000) == 68_976_648_192
  assert hand_count(126, 16384, 128, 8, 128, 53248, 128256) == 405_853_388_800
  assert hand_count(120, 18432, 144, 8, 128, 61440, 131072) == 498_589_747_200


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_are_exact(name):
  cfg = C.load_experiment(os.path.join(EXP, name))
  assert count_params(cfg.model) == PUBLISHED[name]
  assert P.param_counts(cfg.model) == (PUBLISHED[name], PUBLISHED[name])


def test_planner_counts_equal_the_abstract_model():
  """The planner's shard accounting walks the model's own abstract parameters: their sizes must
  add up to the exact count (no allocation: eval_shape of the 500B model)."""
  cfg = C.load_experiment(os.path.join(EXP, "mai1_500b.py"))
  sizes = sum(math.prod(shape) for shape, _, _ in P._abstract_params(cfg.model))
  assert sizes == PUBLISHED["mai1_500b.py"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_default_layout_validates_on_its_target(name):
  cfg = C.load_experiment(os.path.join(EXP, name))
  assert cfg.mesh.target_num_gpus > 0 and cfg.mesh.target_gpu == "h100"
  C.validate(cfg, cfg.mesh.target_num_gpus)
  assert cfg.mesh.tensor <= 8, "tensor parallelism must stay inside one 8-GPU node"
  assert cfg.train.token_budget > 0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_ci_variant_keeps_the_pattern_on_8_devices(name):
  full = C.load_experiment(os.path.join(EXP, name))
  ci = C.load_experiment(os.path.join(EXP, name) + ":ci")
  C.validate(ci, 8)
  assert ci.model == full.model
  full_sizes = C.mesh_shape(full.mesh, full.mesh.target_num_gpus)
  ci_sizes = C.mesh_shape(ci.mesh, 8)
  active = {a for a, s in full_sizes.items() if s > 1}
  if len(active) > 3:  # 8 devices hold three axes of 2: the outermost (data, replicas) goes
    active.discard("data")
  assert {a for a, s in ci_sizes.items() if s > 1} == active
  # per-device rows per microbatch are those of the full layout
  full_layout, ci_layout = P.layout_of(full, full.mesh.target_num_gpus), P.layout_of(ci, 8)
  assert P.rows_per_device(ci, ci_layout) == P.rows_per_device(full, full_layout)


def test_scaled_mesh_doubles_from_the_inside_out():
  mesh = C.MeshConfig(data=-1, fsdp=64, tensor=8)
  full = C.mesh_shape(mesh, 15360)
  assert C.mesh_shape(C.scaled_mesh(mesh, full, 8), 8) == {"data": 2, "stage": 1, "fsdp": 2,
                                                           "expert": 1, "tensor": 2}
  only_fsdp = C.MeshConfig(data=1, fsdp=-1)
  assert C.mesh_shape(C.scaled_mesh(only_fsdp, C.mesh_shape(only_fsdp, 512), 8), 8)["fsdp"] == 8
  tp2 = C.MeshConfig(data=1, fsdp=-1, tensor=2)
  assert C.mesh_shape(C.scaled_mesh(tp2, C.mesh_shape(tp2, 64), 8), 8) == {
      "data": 1, "stage": 1, "fsdp": 4, "expert": 1, "tensor": 2}


def test_ci_variant_builds_its_sharded_state_abstractly():
  """The 8B model's trainer on 8 devices: shapes and shardings only, nothing allocated."""
  from mai_jax import sharding
  from mai_jax.train.trainer import build_trainer
  cfg = C.load_experiment(os.path.join(EXP, "llama3_8b.py") + ":ci")
  trainer = build_trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
  state = trainer.abstract_state()
  q = state.params["blocks"]["attn"]["q_proj"]
  assert q.shape == (32, 4096, 32, 128)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_moe_variant_is_about_500b_total():
  cfg = C.load_experiment(os.path.join(EXP, "mai1_500b.py") + ":moe")
  C.validate(cfg, cfg.mesh.target_num_gpus)
  total, active = P.param_counts(cfg.model)
  assert 450e9 < total < 560e9 and active < total / 5
