"""Preference objectives through the one train step: the concatenated forward and the real-pair
average vs NumPy on separate forwards; DPO end to end through the CLI (slow)."""

import jax
import numpy as np
import pytest

from mai_jax import config as C, sharding as S
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer

MODEL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="none")


def _rows(rng, pairs=16, seq=16):
  tokens = rng.integers(1, 64, (pairs, seq + 1)).astype(np.int32)
  length = rng.integers(8, seq + 1, pairs)
  seg = (np.arange(seq)[None, :] < length[:, None]).astype(np.int32)
  weights = ((np.arange(seq)[None, :] >= 4) & (seg == 1)).astype(np.float32)  # prompt: 4 tokens
  pos = np.tile(np.arange(seq, dtype=np.int32), (pairs, 1))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_weights": weights}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  batch = _rows(rng)
  batch.update({"rejected_" + k: v for k, v in _rows(rng).items()})
  for prefix in ("", "rejected_"):  # the last pair is all padding (a filler pair)
    batch[prefix + "segment_ids"][-1] = 0
    batch[prefix + "loss_weights"][-1] = 0
  batch["ref_chosen_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
  batch["ref_rejected_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
  return batch


def _numpy_logps(model, batch, prefix):
  logits = np.asarray(model(batch[prefix + "inputs"], batch[prefix + "segment_ids"],
                            batch[prefix + "positions"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits, batch[prefix + "targets"][..., None], -1)[..., 0] - logz
  w = batch[prefix + "loss_weights"] * (batch[prefix + "segment_ids"] != 0)
  return (logp * w).sum(-1), w.sum(-1)


@pytest.mark.parametrize("objective", ["dpo"])  # simpo: same path, formula in test_preference_losses
def test_the_preference_step_matches_numpy_on_separate_forwards(objective):
  cfg = C.Config(model=MODEL, data=C.DataConfig(seq_len=16),
                 train=C.TrainConfig(global_batch_size=16, microbatches=2, objective=objective,
                                     preference_beta=0.5, simpo_gamma=0.3),
                 optim=C.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  state, host = trainer.init_state(), _batch()
  if objective != "dpo":
    host = {k: v for k, v in host.items() if not k.startswith("ref_")}
  model = trainer.layout.model_spec.merge(jax.device_get(state.params))
  (c, lc), (r, lr) = _numpy_logps(model, host, ""), _numpy_logps(model, host, "rejected_")
  if objective == "dpo":
    chosen, rejected = 0.5 * (c - host["ref_chosen_logps"]), 0.5 * (r - host["ref_rejected_logps"])
    z = chosen - rejected
  else:
    chosen, rejected = 0.5 * c / np.maximum(lc, 1), 0.5 * r / np.maximum(lr, 1)
    z = chosen - rejected - 0.3
  real = lc > 0
  assert real.sum() == 15
  loss = np.logaddexp(0.0, -z)  # -log sigmoid(z)
  fn = trainer.jit_train_step()
  with S.activate(mesh, cfg.mesh.rules):
    _, metrics = fn(state, step_lib.global_batch(host, trainer.batch_sharding, 16))
  assert float(metrics["loss"]) == pytest.approx(loss[real].mean(), rel=1e-4)
  assert float(metrics["tokens"]) == 15
  assert float(metrics["rewards/chosen"]) == pytest.approx(chosen[real].mean(), rel=1e-4)
  assert float(metrics["rewards/margins"]) == pytest.approx((chosen - rejected)[real].mean(),
                                                            rel=1e-4, abs=1e-6)
  assert float(metrics["rewards/accuracies"]) == pytest.approx((chosen > rejected)[real].mean())
