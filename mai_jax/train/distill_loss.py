"""Logit distillation loss: alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE, per token.

D is a divergence between the teacher's and the student's next-token distributions at temperature
T (softmax(logits / T)): 'forward_kl' KL(teacher || student) (Hinton et al. 2015, the default; mass
covering), 'reverse_kl' KL(student || teacher) (mode seeking, as in MiniLLM), or 'jsd' the
Jensen-Shannon divergence 0.5 KL(t || m) + 0.5 KL(s || m), m = (t + s) / 2. T^2 keeps the soft
term's gradient scale independent of T. CE is the student's cross-entropy on the data's targets
at temperature 1. alpha and T come per row ([B]) so schedules can set them from the step.

The teacher is given either as full logits [B, T, V] (an online teacher, bf16) or as its top-K
log-probs (at temperature 1) and token ids [B, T, K] (the offline cache, data/teacher_cache.py).
With top-K the divergence is over K + 1 bins: the K cached tokens and one tail bin holding the
rest of the vocabulary (teacher: 1 - sum of the K probabilities; student: its mass outside the K
ids). At temperature T the teacher's bins get logits logp / T, renormalized over the bins (the
tail bin as one token of log-prob log(tail)); for K = V (no tail) this is exactly the full loss at
every T, and for T = 1 it is the exact divergence of the binned distributions.

Memory: the student's float32 logits are the model's output; the teacher's stay bf16 (or [K]).
Every float32 intermediate of the loss (softmaxes, log-probs of both) exists for one chunk of
`chunk_tokens` tokens at a time: a `lax.scan` over token chunks whose body is rematerialized
(jax.checkpoint), so the backward pass recomputes a chunk's softmaxes instead of storing all.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# The floor of a tail bin's log-mass, log(1e-30): an empty tail (rounding) stays finite, so neither
# 0 * log 0 nor p * (log p - log 0) turns into NaN or infinity.
_LOG_TINY = -69.0776


@dataclasses.dataclass(frozen=True)
class DistillLossConfig:
  divergence: str = "forward_kl"
  chunk_tokens: int = 0  # tokens per scan chunk; 0: the whole batch in one chunk


def _kl(logp_a_NB: jax.Array, logp_b_NB: jax.Array) -> jax.Array:
  """KL(a || b) per row from log-probs; bins where a has no mass contribute 0."""
  p_a = jnp.exp(logp_a_NB)
  return jnp.sum(jnp.where(p_a > 0, p_a * (logp_a_NB - logp_b_NB), 0.0), axis=-1)


def binned_divergence(teacher_logp_NB: jax.Array, student_logp_NB: jax.Array,
                      kind: str) -> jax.Array:
  """D(teacher, student) [N] between two distributions over the same B bins (log-probs)."""
  if kind == "forward_kl":
    return _kl(teacher_logp_NB, student_logp_NB)
  if kind == "reverse_kl":
    return _kl(student_logp_NB, teacher_logp_NB)
  if kind == "jsd":
    logm_NB = jnp.logaddexp(teacher_logp_NB, student_logp_NB) - jnp.log(2.0)
    return 0.5 * _kl(teacher_logp_NB, logm_NB) + 0.5 * _kl(student_logp_NB, logm_NB)
  raise ValueError(f"divergence {kind!r} is not one of {DIVERGENCES}")


def _log1m_exp(x):
  """log(1 - exp(x)) for x <= 0, floored at _LOG_TINY (an empty tail)."""
  x = jnp.minimum(x, -1e-30)
  out = jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
  return jnp.maximum(out, _LOG_TINY)


def token_terms(student_logits_NV, targets_N, temperature_N, kind: str, teacher_logits_NV=None,
                teacher_ids_NK=None, teacher_logps_NK=None):
  """(divergence [N] at temperature T, student cross-entropy [N] at T = 1), float32."""
  s_NV = student_logits_NV.astype(jnp.float32)
  log_z_N = jax.nn.logsumexp(s_NV, axis=-1)
  ce_N = log_z_N - jnp.take_along_axis(s_NV, targets_N[:, None], axis=-1)[:, 0]
  inv_T_N1 = 1.0 / temperature_N[:, None]
  student_logp_NV = jax.nn.log_softmax(s_NV * inv_T_N1, axis=-1)
  if teacher_logits_NV is not None:
    teacher_logp_NV = jax.nn.log_softmax(teacher_logits_NV.astype(jnp.float32) * inv_T_N1, -1)
    return binned_divergence(teacher_logp_NV, student_logp_NV, kind), ce_N
  vocab, k = s_NV.shape[-1], teacher_ids_NK.shape[-1]
  student_NK = jnp.take_along_axis(student_logp_NV, teacher_ids_NK, axis=-1)
  teacher_NK = teacher_logps_NK.astype(jnp.float32)
  if k < vocab:  # a tail bin for the rest of the vocabulary
    tail_N1 = _log1m_exp(jax.nn.logsumexp(teacher_NK, axis=-1, keepdims=True))
    teacher_NK = jnp.concatenate([teacher_NK, tail_N1], axis=-1)
    student_tail_N1 = _log1m_exp(jax.nn.logsumexp(student_NK, axis=-1, keepdims=True))
    student_NK = jnp.concatenate([student_NK, student_tail_N1], axis=-1)
  teacher_logp_NK = jax.nn.log_softmax(teacher_NK * inv_T_N1, axis=-1)
  return binned_divergence(teacher_logp_NK, student_NK, kind), ce_N


def distill_sums(cfg: DistillLossConfig, student_logits_BTV: jax.Array, targets_BT: jax.Array,
                 weights_BT: jax.Array, alpha_B: jax.Array, temperature_B: jax.Array,
                 teacher_logits_BTV: Optional[jax.Array] = None,
                 teacher_ids_BTK: Optional[jax.Array] = None,
                 teacher_logps_BTK: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Weighted sums over tokens: 'loss' (alpha T^2 D + (1 - alpha) CE), 'ce', 'kd' (D alone) and
  'tokens' (sum of the weights). Weights are 0 on padding and untrained tokens."""
  if cfg.divergence not in DIVERGENCES:
    raise ValueError(f"divergence {cfg.divergence!r} is not one of {DIVERGENCES}")
  b, t, v = student_logits_BTV.shape
  n = b * t
  rows = lambda x_B: jnp.broadcast_to(x_B.astype(jnp.float32)[:, None], (b, t)).reshape(n)
  flat = {"s": student_logits_BTV.reshape(n, v), "y": targets_BT.reshape(n),
          "w": weights_BT.astype(jnp.float32).reshape(n), "a": rows(alpha_B),
          "T": rows(temperature_B)}
  if teacher_logits_BTV is not None:
    flat["t"] = teacher_logits_BTV.reshape(n, v)
  else:
    flat["ids"] = teacher_ids_BTK.reshape(n, -1)
    flat["lp"] = teacher_logps_BTK.reshape(n, -1)
  chunk = min(cfg.chunk_tokens or n, n)
  pad = -n % chunk
  if pad:  # zero-weight filler tokens (targets 0, T 1) so the chunks divide the tokens
    flat = {k: jnp.concatenate([x, (jnp.ones if k == "T" else jnp.zeros)((pad,) + x.shape[1:],
                                                                         x.dtype)])
            for k, x in flat.items()}
  chunks = jax.tree.map(lambda x: x.reshape((-1, chunk) + x.shape[1:]), flat)

  @jax.checkpoint
  def chunk_sums(c):
    kd_N, ce_N = token_terms(c["s"], c["y"], c["T"], cfg.divergence, c.get("t"), c.get("ids"),
                             c.get("lp"))
    w_N, a_N = c["w"], c["a"]
    loss_N = a_N * jnp.square(c["T"]) * kd_N + (1.0 - a_N) * ce_N
    return jnp.stack([jnp.sum(loss_N * w_N), jnp.sum(ce_N * w_N), jnp.sum(kd_N * w_N)])

  def body(total, c):
    return total + chunk_sums(c), None

  totals, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32), chunks)
  return {"loss": totals[0], "ce": totals[1], "kd": totals[2], "tokens": jnp.sum(flat["w"])}
