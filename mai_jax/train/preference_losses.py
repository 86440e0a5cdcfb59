"""Preference-optimization losses (DPO, and the reference-free SimPO and ORPO) on sequence
log-probabilities, with the metric names TRL users know.

Inputs are per pair p (chosen and rejected completions of one prompt): the summed log-probability
of each completion's tokens under the policy (`*_logps_P`), the completion lengths in tokens
(`*_lengths_P`, for the length-normalized losses) and, for DPO, the same sums under the frozen
reference model (`ref_*_logps_P`, precomputed once over the data so no second model sits in
memory). `sequence_logps` gets the sums from one forward over chosen and rejected rows stacked
together. Formulas, with s = summed log-prob, a = s / length, sigma the logistic function:

  dpo    (Rafailov et al. 2023)  z = beta * ((s_c - ref_c) - (s_r - ref_r))
                                 loss = -(1 - eps) log sigma(z) - eps log sigma(-z)  (eps: label
                                 smoothing, the conservative cDPO); rewards = beta * (s - ref)
  simpo  (Meng et al. 2024)      loss = -log sigma(beta * (a_c - a_r) - gamma); rewards = beta * a
  orpo   (Hong et al. 2024)      log odds(y) = a - log(1 - exp(a));
                                 loss = -a_c - beta * log sigma(log odds(y_c) - log odds(y_r))
                                 (the chosen completion's NLL per token, plus beta times the odds
                                 ratio term; TRL's `beta` is the paper's lambda); rewards = beta * a
Metrics, per pair (the step averages them over its real pairs): rewards/chosen, rewards/rejected,
rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

KINDS = ("dpo", "simpo", "orpo")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
  kind: str = "dpo"
  beta: float = 0.1
  gamma: float = 0.5  # SimPO's target margin
  label_smoothing: float = 0.0  # DPO only


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum of log p(target) over weighted tokens, number of weighted tokens) per row, float32 [B].
  weights_BT is 1 on completion tokens (the prompt and padding 0)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  weights_BT = weights_BT.astype(jnp.float32)
  return jnp.sum(target_BT * weights_BT, axis=-1), jnp.sum(weights_BT, axis=-1)


def preference_loss(cfg: PreferenceLossConfig, chosen_logps_P, rejected_logps_P,
                    chosen_lengths_P, rejected_lengths_P,
                    ref_chosen_logps_P: Optional[jax.Array] = None,
                    ref_rejected_logps_P: Optional[jax.Array] = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss per pair [P], metrics per pair [P]) for cfg.kind; see the module docstring."""
  if cfg.kind not in KINDS:
    raise ValueError(f"preference loss kind={cfg.kind!r} is not one of {KINDS}")
  beta = cfg.beta
  if cfg.kind == "dpo":
    if ref_chosen_logps_P is None or ref_rejected_logps_P is None:
      raise ValueError("dpo needs the reference model's log-probs of both completions")
    chosen_P = beta * (chosen_logps_P - ref_chosen_logps_P)
    rejected_P = beta * (rejected_logps_P - ref_rejected_logps_P)
    z_P = chosen_P - rejected_P
    eps = cfg.label_smoothing
    loss_P = -(1 - eps) * jax.nn.log_sigmoid(z_P) - eps * jax.nn.log_sigmoid(-z_P)
  else:
    avg_chosen_P = chosen_logps_P / jnp.maximum(chosen_lengths_P, 1.0)
    avg_rejected_P = rejected_logps_P / jnp.maximum(rejected_lengths_P, 1.0)
    chosen_P, rejected_P = beta * avg_chosen_P, beta * avg_rejected_P
    if cfg.kind == "simpo":
      loss_P = -jax.nn.log_sigmoid(chosen_P - rejected_P - cfg.gamma)
    else:
      log_odds_P = ((avg_chosen_P - avg_rejected_P)
                    - (_log1m_exp(avg_chosen_P) - _log1m_exp(avg_rejected_P)))
      loss_P = -avg_chosen_P - beta * jax.nn.log_sigmoid(log_odds_P)
  metrics = {
      "rewards/chosen": chosen_P,
      "rewards/rejected": rejected_P,
      "rewards/accuracies": (chosen_P > rejected_P).astype(jnp.float32),
      "rewards/margins": chosen_P - rejected_P,
      "logps/chosen": chosen_logps_P,
      "logps/rejected": rejected_logps_P,
  }
  return loss_P, metrics


def _log1m_exp(x):
  """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
