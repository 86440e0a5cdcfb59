"""The pure train step: loss against NumPy, padding carries no loss, microbatching is exact."""

import jax
import numpy as np
import pytest

from mai_jax import config as C, sharding as S
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer

MODEL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="none")


def _setup(**train):
  cfg = C.Config(model=MODEL, data=C.DataConfig(seq_len=16),
                 train=C.TrainConfig(global_batch_size=16, **train),
                 optim=C.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  return (cfg, mesh, trainer.layout, trainer.init_state(), trainer.batch_sharding,
          trainer.jit_train_step())


def _batch(rows=16, seq=16, pad_from=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, (rows, seq + 1)).astype(np.int32)
  seg = np.ones((rows, seq), np.int32)
  seg[:, pad_from:] = 0  # trailing padding
  seg[::2, 5:pad_from] = 2  # even rows pack a second document
  pos = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
  pos[::2, 5:] -= 5
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos}


def test_loss_is_mean_cross_entropy_over_non_padding_tokens():
  cfg, mesh, layout, state, bs, fn = _setup()
  host = _batch()
  model = layout.model_spec.merge(jax.device_get(state.params))
  logits = np.asarray(model(host["inputs"], host["segment_ids"], host["positions"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, host["targets"][..., None], -1)[..., 0]
  mask = host["segment_ids"] != 0
  want = ce[mask].mean()
  with S.activate(mesh, cfg.mesh.rules):
    _, metrics = fn(state, {k: jax.device_put(v, bs) for k, v in host.items()})
  assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
  assert float(metrics["tokens"]) == mask.sum()


def test_z_loss_adds_the_squared_log_normalizer():
  logits = np.random.default_rng(1).normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[0, 1, 2], [3, 4, 0]], np.int32)
  loss, ce = step_lib.token_losses(logits, targets, 1e-2)
  logz = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(np.asarray(loss - ce), 1e-2 * logz ** 2, rtol=1e-5)


def test_microbatches_give_the_same_update_as_one_batch():
  results = []
  for micro in (1, 2):
    cfg, mesh, _, state, bs, fn = _setup(microbatches=micro)
    batch = {k: jax.device_put(v, bs) for k, v in _batch().items()}
    with S.activate(mesh, cfg.mesh.rules):
      state, metrics = fn(state, batch)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = results
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_falls_when_training_on_one_batch():
  cfg, mesh, _, state, bs, fn = _setup()
  batch = {k: jax.device_put(v, bs) for k, v in _batch().items()}
  losses = []
  with S.activate(mesh, cfg.mesh.rules):
    for _ in range(20):
      state, metrics = fn(state, batch)
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 1.0
  assert int(state.step) == 20


def test_a_non_finite_gradient_skips_the_update_and_says_so():
  cfg, mesh, layout, state, bs, fn = _setup()
  host = _batch()
  # A NaN in one weight poisons the loss and every gradient.
  params = jax.device_get(state.params)
  poisoned = jax.tree.map(np.array, params)
  poisoned["final_norm"]["scale"][0] = np.nan
  state = state.replace(params=jax.device_put(poisoned, layout.shardings.params))
  before = jax.device_get((state.params, state.opt_state))
  with S.activate(mesh, cfg.mesh.rules):
    new_state, metrics = fn(state, {k: jax.device_put(v, bs) for k, v in host.items()})
  assert float(metrics["update_skipped"]) == 1.0
  assert not np.isfinite(float(metrics["loss"]))
  assert int(new_state.step) == 1  # the data position still advances
  after = jax.device_get((new_state.params, new_state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_a_finite_step_reports_no_skip():
  cfg, mesh, layout, state, bs, fn = _setup()
  with S.activate(mesh, cfg.mesh.rules):
    _, metrics = fn(state, {k: jax.device_put(v, bs) for k, v in _batch().items()})
  assert float(metrics["update_skipped"]) == 0.0
