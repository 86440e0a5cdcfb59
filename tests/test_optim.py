"""Optimizer: one step equals a hand-computed AdamW update; decay mask; schedule shapes."""

import jax
import numpy as np
import optax
import pytest

from mai_jax import optim
from mai_jax.config import OptimConfig


def _params():
  rng = np.random.default_rng(0)
  return {
      "embed": {"embedding": rng.normal(size=(8, 4)).astype(np.float32)},
      "layers": {"attn_norm": {"scale": np.ones((2, 4), np.float32)},
                 "mlp": {"w_DF": rng.normal(size=(2, 4, 6)).astype(np.float32)}},
      "final_norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
  }


def test_decay_mask_skips_norms_and_embeddings():
  mask = optim.decay_mask(_params(), decay_embeddings=False)
  assert mask == {"embed": {"embedding": False},
                  "layers": {"attn_norm": {"scale": False}, "mlp": {"w_DF": True}},
                  "final_norm": {"scale": False}}
  assert optim.decay_mask(_params(), decay_embeddings=True)["embed"]["embedding"] is True


def test_one_step_matches_hand_computed_adamw():
  cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", b1=0.9, b2=0.95,
                    eps=1e-8, weight_decay=0.1, grad_clip=0.5)
  tx = optim.make_optimizer(cfg, num_steps=10)
  params = _params()
  grads = jax.tree.map(lambda p: np.full_like(p, 0.3) * np.sign(p + 0.1), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  flat_g = jax.tree.leaves(grads)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in flat_g))
  scale = min(1.0, 0.5 / norm)
  mask = optim.decay_mask(params, decay_embeddings=False)

  def expected(p, g, decays):
    g = g * scale
    m_hat = (0.1 * g) / (1 - 0.9)        # one step of the first moment, bias-corrected
    v_hat = (0.05 * g * g) / (1 - 0.95)  # second moment
    step = m_hat / (np.sqrt(v_hat) + 1e-8) + (0.1 * p if decays else 0.0)
    return p - 0.1 * step

  want = jax.tree.map(expected, params, grads, mask)
  for got_leaf, want_leaf in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got_leaf), want_leaf, rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine_reaches_floor():
  cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
  s = optim.make_schedule(cfg, num_steps=110)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.55, abs=0.02)
  assert float(s(110)) == pytest.approx(0.1, abs=1e-6)
  values = [float(s(i)) for i in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_linearly():
  cfg = OptimConfig(learning_rate=2.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                    min_lr_ratio=0.0)
  s = optim.make_schedule(cfg, num_steps=110)
  assert float(s(10)) == pytest.approx(2.0)
  assert float(s(89)) == pytest.approx(2.0)
  assert float(s(100)) == pytest.approx(1.0, abs=0.05)
  assert float(s(110)) == pytest.approx(0.0, abs=1e-6)


def test_constant_schedule_without_warmup():
  s = optim.make_schedule(OptimConfig(learning_rate=0.5, warmup_steps=0, schedule="constant"), 5)
  assert [float(s(i)) for i in range(5)] == [0.5] * 5


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="optim.schedule='step'"):
    optim.make_schedule(OptimConfig(schedule="step"), 10)
