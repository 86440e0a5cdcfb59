"""Logit distillation (train/distill_loss.py, train/distill.py, the top-K teacher cache): the loss
against NumPy for each divergence, temperature and alpha; chunking changes nothing; the top-K loss
with K = V is the full loss; the cache round-trips exactly; teacher errors are one line; and a
student distilled from a tiny teacher beats the same student trained from scratch."""

import numpy as np
import pytest

from mai_jax.train import distill_loss as dl

V = 48


def _sums(cfgs, *args, **kw):
  """distill_sums for each config, all in one jitted function per (configs, argument kinds):
  compiles cost seconds, calls milliseconds."""
  import jax
  key = (cfgs, tuple(sorted(kw)))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda a, k: [dl.distill_sums(c, *a, **k) for c in cfgs])
  return _JITTED[key](args, kw)


KINDS = tuple(dl.DistillLossConfig(kind) for kind in dl.DIVERGENCES)


_JITTED = {}


def _np_logsoftmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(t_logp, s_logp, kind):
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
  if kind == "forward_kl":
    return kl(t_logp, s_logp)
  if kind == "reverse_kl":
    return kl(s_logp, t_logp)
  m = np.log(0.5 * (np.exp(t_logp) + np.exp(s_logp)))
  return 0.5 * kl(t_logp, m) + 0.5 * kl(s_logp, m)


def _np_loss(student, teacher, targets, weights, alpha, temperature, kind):
  """Float64 reference: sum over tokens of weight * (alpha T^2 D(t_T, s_T) + (1 - alpha) CE)."""
  s, t = student.astype(np.float64), teacher.astype(np.float64)
  ce = -np.take_along_axis(_np_logsoftmax(s), targets[..., None], -1)[..., 0]
  T = temperature[:, None]
  div = _np_divergence(_np_logsoftmax(t / T[..., None]), _np_logsoftmax(s / T[..., None]), kind)
  a = alpha[:, None]
  return ((a * T ** 2 * div + (1 - a) * ce) * weights).sum(), (ce * weights).sum(), \
      (div * weights).sum()


def _inputs(seed=0, b=3, t=10):
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 2, (b, t, V)).astype(np.float32)
  teacher = rng.normal(0, 3, (b, t, V)).astype(np.float32)
  targets = rng.integers(0, V, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.25).astype(np.float32)  # some tokens are padding
  return student, teacher, targets, weights


def test_the_loss_matches_numpy():
  student, teacher, targets, weights = _inputs()
  for alpha, temperature in [(1.0, 1.0), (0.5, 2.0), (0.25, 0.7), (0.0, 3.0)]:
    alpha_B = np.full(3, alpha, np.float32)
    temperature_B = np.array([temperature, temperature, 1.3], np.float32)  # rows may differ
    for cfg, sums in zip(KINDS, _sums(KINDS, student, targets, weights, alpha_B, temperature_B,
                                      teacher_logits_BTV=teacher)):
      _check_against_numpy(sums, student, teacher, targets, weights, alpha_B, temperature_B,
                           cfg.divergence)


def _check_against_numpy(sums, student, teacher, targets, weights, alpha_B, temperature_B, kind):
  loss, ce, kd = _np_loss(student, teacher, targets, weights, alpha_B, temperature_B, kind)
  np.testing.assert_allclose(float(sums["loss"]), loss, rtol=2e-5)
  np.testing.assert_allclose(float(sums["ce"]), ce, rtol=2e-5)
  np.testing.assert_allclose(float(sums["kd"]), kd, rtol=2e-4, atol=1e-5)
  assert float(sums["tokens"]) == weights.sum()


def test_chunked_equals_unchunked_in_value_and_gradient():
  import jax
  kind = "jsd"  # its terms include both KL directions
  student, teacher, targets, weights = _inputs(1)
  alpha_B, temperature_B = np.full(3, 0.6, np.float32), np.full(3, 1.5, np.float32)
  def loss(s, chunk):
    return dl.distill_sums(dl.DistillLossConfig(kind, chunk_tokens=chunk), s, targets, weights,
                           alpha_B, temperature_B, teacher_logits_BTV=teacher)["loss"]
  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  whole, grad_whole = grad_fn(student, 0)
  for chunk in (7,):  # 30 tokens: four chunks, the last ragged (padded with weight-0 tokens)
    value, grad = grad_fn(student, chunk)
    np.testing.assert_allclose(float(value), float(whole), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_whole), rtol=1e-5, atol=1e-7)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss():
  import jax
  student, teacher, targets, weights = _inputs(2)
  logp = np.asarray(jax.nn.log_softmax(teacher, -1))
  order = np.argsort(-logp, -1).astype(np.int32)  # sorted like lax.top_k: any order is fine
  alpha_B, temperature_B = np.full(3, 0.5, np.float32), np.array([1.0, 2.0, 0.5], np.float32)
  cfgs = tuple(dl.DistillLossConfig(kind, chunk_tokens=8) for kind in dl.DIVERGENCES)
  fulls = _sums(cfgs, student, targets, weights, alpha_B, temperature_B,
                teacher_logits_BTV=teacher)
  tops = _sums(cfgs, student, targets, weights, alpha_B, temperature_B, teacher_ids_BTK=order,
               teacher_logps_BTK=np.take_along_axis(logp, order, -1))
  for full, top in zip(fulls, tops):
    for key in ("loss", "kd", "ce"):
      np.testing.assert_allclose(float(top[key]), float(full[key]), rtol=1e-5, atol=1e-6)


def test_top_k_below_the_vocabulary_adds_a_tail_bin():
  """K < V: the divergence over the K tokens and one bin for the rest, vs NumPy (T = 1)."""
  import jax
  student, teacher, targets, weights = _inputs(3)
  k = 5
  logp = np.asarray(jax.nn.log_softmax(teacher, -1), np.float64)
  ids = np.argsort(-logp, -1)[..., :k].astype(np.int32)
  t_top = np.take_along_axis(logp, ids, -1)
  s_logp = _np_logsoftmax(student.astype(np.float64))
  s_top = np.take_along_axis(s_logp, ids, -1)
  with np.errstate(divide="ignore"):
    t_bins = np.concatenate([t_top, np.log1p(-np.exp(t_top).sum(-1, keepdims=True))], -1)
    s_bins = np.concatenate([s_top, np.log1p(-np.exp(s_top).sum(-1, keepdims=True))], -1)
  got = _sums(KINDS, student, targets, weights, np.ones(3, np.float32), np.ones(3, np.float32),
              teacher_ids_BTK=ids, teacher_logps_BTK=t_top.astype(np.float32))
  for cfg, sums in zip(KINDS, got):
    want = (_np_divergence(t_bins, s_bins, cfg.divergence) * weights).sum()
    np.testing.assert_allclose(float(sums["kd"]), want, rtol=1e-4)
