"""DPO / SimPO / ORPO losses and TRL-named metrics vs NumPy implementations of the papers'
formulas (float64), and sequence log-probs vs a NumPy log-softmax."""

import numpy as np
import pytest

from mai_jax.train import preference_losses as PL


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _pairs(seed=0, n=6):
  rng = np.random.default_rng(seed)
  lengths_c = rng.integers(3, 20, n).astype(np.float64)
  lengths_r = rng.integers(3, 20, n).astype(np.float64)
  logps_c = -rng.uniform(0.2, 3.0, n) * lengths_c  # summed log-probs, average in (-3, -0.2)
  logps_r = -rng.uniform(0.2, 3.0, n) * lengths_r
  ref_c = logps_c + rng.normal(0, 2, n)
  ref_r = logps_r + rng.normal(0, 2, n)
  return logps_c, logps_r, lengths_c, lengths_r, ref_c, ref_r


def _numpy_reference(kind, beta, gamma, eps, c, r, lc, lr, ref_c, ref_r):
  if kind == "dpo":
    chosen, rejected = beta * (c - ref_c), beta * (r - ref_r)
    z = beta * ((c - r) - (ref_c - ref_r))
    loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
  else:
    ac, ar = c / lc, r / lr
    chosen, rejected = beta * ac, beta * ar
    if kind == "simpo":
      loss = -_log_sigmoid(beta * (ac - ar) - gamma)
    else:  # ORPO: odds(y) = P / (1 - P) with P = exp(mean token log-prob)
      odds = lambda a: np.exp(a) / (1 - np.exp(a))  # noqa: E731
      loss = -ac - beta * _log_sigmoid(np.log(odds(ac)) - np.log(odds(ar)))
  return loss, {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).mean(),
                "rewards/margins": (chosen - rejected).mean(),
                "logps/chosen": c.mean(), "logps/rejected": r.mean()}


@pytest.mark.parametrize("kind,beta,gamma,eps", [("dpo", 0.1, 0.0, 0.0), ("dpo", 0.5, 0.0, 0.2),
                                                 ("simpo", 2.0, 0.5, 0.0),
                                                 ("orpo", 0.25, 0.0, 0.0)])
def test_losses_and_metrics_match_the_published_formulas(kind, beta, gamma, eps):
  c, r, lc, lr, ref_c, ref_r = _pairs()
  cfg = PL.PreferenceLossConfig(kind=kind, beta=beta, gamma=gamma, label_smoothing=eps)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  loss, metrics = PL.preference_loss(cfg, f32(c), f32(r), f32(lc), f32(lr), f32(ref_c), f32(ref_r))
  want_loss, want_metrics = _numpy_reference(kind, beta, gamma, eps, c, r, lc, lr, ref_c, ref_r)
  np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=2e-5, atol=1e-6)
  assert set(metrics) == set(want_metrics)
  for name, want in want_metrics.items():
    assert float(np.mean(metrics[name])) == pytest.approx(want, rel=2e-5, abs=1e-6), name
  assert 0 < float(np.mean(metrics["rewards/accuracies"])) < 1  # both outcomes occur


def test_dpo_needs_reference_log_probs_and_kinds_are_checked():
  c, r, lc, lr, _, _ = _pairs()
  with pytest.raises(ValueError, match="reference"):
    PL.preference_loss(PL.PreferenceLossConfig("dpo"), c, r, lc, lr)
  with pytest.raises(ValueError, match="not one of"):
    PL.preference_loss(PL.PreferenceLossConfig("ipo"), c, r, lc, lr, c, r)


def test_sequence_logps_sum_the_completion_tokens():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 7, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (4, 7)).astype(np.int32)
  weights = (rng.random((4, 7)) < 0.6).astype(np.float32)
  x = logits.astype(np.float64)
  logp = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1))[..., None]
  want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum(-1)
  total, count = PL.sequence_logps(logits, targets, weights)
  np.testing.assert_allclose(np.asarray(total), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(count), weights.sum(-1))
