"""Pipeline parallelism: the pipelined loss and every gradient equal the plain (stage=1) step's.

The reference is the same model and parameters run without pipeline stages on the same 8 devices
(fsdp x tensor); the pipelined runs put 2 or 4 stages on the 'stage' axis with fsdp/tensor on the
rest, GPipe (repeats 1) and circular (repeats 2), with M = S and 2S pipeline microbatches, on
packed documents (segment ids) with padding, and z-loss on.
"""

import dataclasses

import jax
import numpy as np
import pytest

from mai_jax import config as C, sharding as S
from mai_jax.model import pipeline
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer

MODEL = C.ModelConfig(num_layers=8, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="full")
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


def _loss_and_grads(cfg: C.Config, host_params=None):
  """(loss, grads) of summed_loss on cfg's mesh, starting from host_params (or a fresh init)."""
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  params = (trainer.init_state().params if host_params is None else
            jax.device_put(host_params, trainer.layout.shardings.params))
  batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in _batch().items()}
  grad_fn = jax.value_and_grad(step_lib.summed_loss, has_aux=True)
  fn = jax.jit(lambda p, b: grad_fn(p, b, trainer.layout.model_spec, cfg.train.z_loss_weight))
  with S.activate(mesh, cfg.mesh.rules):
    (loss, _), grads = fn(params, batch)
  return jax.device_get(params), float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
  return _loss_and_grads(_cfg(C.MeshConfig(fsdp=4, tensor=2)))


def _assert_close(got, want):
  loss, grads = got
  want_loss, want_grads = want
  assert loss == pytest.approx(want_loss, rel=1e-5)
  flat_got = jax.tree_util.tree_leaves_with_path(grads)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  for path, g in flat_got:
    w = flat_want[path]
    err = np.linalg.norm(np.asarray(g, np.float64) - w) / max(np.linalg.norm(w), 1e-30)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("stage,repeats,micro,mesh", [
    (2, 1, 2, dict(fsdp=2, tensor=2)),
    (2, 2, 4, dict(fsdp=2, tensor=2)),
    (4, 1, 8, dict(fsdp=2)),
    (4, 2, 4, dict(tensor=2, fsdp=1)),
])
def test_pipelined_loss_and_grads_equal_the_plain_step(reference, stage, repeats, micro, mesh):
  params, want_loss, want_grads = reference
  cfg = _cfg(C.MeshConfig(stage=stage, **mesh), pipeline_repeats=repeats,
             pipeline_microbatches=micro)
  C.validate(cfg, 8)
  _, loss, grads = _loss_and_grads(cfg, params)
  _assert_close((loss, grads), (want_loss, want_grads))


def test_bubble_fraction():
  assert pipeline.bubble_fraction(4, 1, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)
