"""Preference objectives (DPO, SimPO, ORPO) in the one train step.

`summed_preference_loss` is the preference counterpart of step.summed_loss: chosen and rejected
rows go through ONE forward, stacked along the batch ([2P, T]), their completion log-probs are
summed per row, and the loss of train/preference_losses.py is summed over the batch's real pairs
(all-padding filler pairs of the last eval batch count for nothing). The TRL metrics come back as
sums too, so microbatches accumulate them exactly like the loss.

DPO's reference log-probs are computed once, before training (train/reference.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from mai_jax.config import Config
from mai_jax.data import preference_pipeline as pp
from mai_jax.train import moe_aux
from mai_jax.train.preference_losses import PreferenceLossConfig, preference_loss, sequence_logps


def loss_config(cfg: Config) -> PreferenceLossConfig:
  t = cfg.train
  return PreferenceLossConfig(kind=t.objective, beta=t.preference_beta, gamma=t.simpo_gamma,
                              label_smoothing=t.dpo_label_smoothing)


def pair_logps(model, batch):
  """(chosen sums, rejected sums, chosen lengths, rejected lengths) [P] from one forward over
  the stacked rows; also the MoE statistics of that forward."""
  def stacked(key):
    return jnp.concatenate([batch[key], batch[pp.REJECTED + key]], axis=0)
  logits_BTV, moe = model.forward_with_aux(stacked("inputs"), stacked("segment_ids"),
                                           stacked("positions"))
  weights_BT = stacked("loss_weights") * (stacked("segment_ids") != 0)
  logps_B, lengths_B = sequence_logps(logits_BTV, stacked("targets"), weights_BT)
  p = batch["inputs"].shape[0]
  return (logps_B[:p], logps_B[p:], lengths_B[:p], lengths_B[p:]), moe


def summed_preference_loss(params, batch, model_spec, loss_cfg: PreferenceLossConfig):
  """(sum of pair losses [+ MoE aux], (same without aux, number of real pairs, MoE statistics,
  sums of the TRL metrics))."""
  model = model_spec.merge(params)
  (chosen, rejected, chosen_len, rejected_len), moe = pair_logps(model, batch)
  loss_P, metrics = preference_loss(loss_cfg, chosen, rejected, chosen_len, rejected_len,
                                    batch.get(pp.REFERENCE_KEYS[0]),
                                    batch.get(pp.REFERENCE_KEYS[1]))
  real_P = (chosen_len > 0).astype(jnp.float32)
  pairs = jnp.sum(real_P)
  loss_sum = jnp.sum(loss_P * real_P)
  total = loss_sum + pairs * moe_aux.aux_loss(model.cfg, moe) if moe else loss_sum
  return total, (loss_sum, pairs, moe, {k: jnp.sum(v * real_P) for k, v in metrics.items()})
